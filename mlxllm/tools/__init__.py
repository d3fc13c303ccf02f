"""Tools built on the engine and the format readers: convert/fuse, perplexity, benchmarks, peers."""
