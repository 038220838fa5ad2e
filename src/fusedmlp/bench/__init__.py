"""Benchmarks: presets, timing, the side-by-side variants and the result files."""
