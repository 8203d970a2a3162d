"""Helpers of scripts/bench.py: the benchmark service, the bare loops, the Huey task, the sections."""
