"""Benchmarks: scripts run as `python -m bench.NAME`."""
