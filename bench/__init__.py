"""Micro-benchmarks of the engine (``python -m bench.core_ratios`` compares the core twins)."""
