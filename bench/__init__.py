"""Benchmarks: ``python -m bench.<name>``, each writing JSON to ``bench/results/``."""
