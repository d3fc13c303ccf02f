"""Errors the CLI reports as one line (no traceback unless --verbose)."""


class UserError(Exception):
    """A problem with the user's input (model path, config, weights, options), not a bug."""
