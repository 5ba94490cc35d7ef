"""Checks and timings on a CUDA GPU (fall back to CPU where they can)."""
