"""Benchmark scripts (run them as files: ``python benchmarks/NAME.py``); see RESULTS.md."""
