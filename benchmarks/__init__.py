"""Benchmark scripts (run them as scripts) and the importable task suite, ``benchmarks.suite``."""
