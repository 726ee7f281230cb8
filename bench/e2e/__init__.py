"""Helpers of bench/bench_e2e.py (the end-to-end bench)."""
