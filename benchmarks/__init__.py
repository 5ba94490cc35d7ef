"""Benchmarks, checks and experiments; run each as ``python -m benchmarks.<group>.<name>`` from the repository root (see benchmarks/README.md)."""
