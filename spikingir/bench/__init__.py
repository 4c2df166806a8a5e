"""Benchmarks of spikingir's ops, as a library (``spikingir bench ...`` and
``benchmarks/bench_*.py`` are thin shells around it). Timing lives here, never
in a pass/fail test."""
