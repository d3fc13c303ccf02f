"""The configurable decoder and its config."""
