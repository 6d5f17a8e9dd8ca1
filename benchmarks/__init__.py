"""Benchmarks of gin_adapter (not installed with the package): run_benchmarks.py runs the suites (one module each); see docs/benchmarks.md."""
