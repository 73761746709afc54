"""Benchmarks: runnable modules that print measurements (`python -m bench.<name>`)."""
