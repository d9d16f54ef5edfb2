"""Benchmarks, run from the repository root as modules (``python -m benchmarks.<name>``); results and the
commands that made them go to ``benchmarks/RESULTS.md``."""
