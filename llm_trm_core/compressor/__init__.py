"""Compressor stage internals: moments and closed-form solve, metrics, SGD training."""
