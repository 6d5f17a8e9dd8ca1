"""Benchmarks of gin_adapter (not installed with the package): see run_benchmarks.py and docs/benchmarks.md."""
