"""Specialize a small model on one task, quantize it, and measure what that bought."""

__version__ = "0.1.0"
