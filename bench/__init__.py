"""Benchmarks of one optimizer iteration (``pytest bench``) and their report (``python -m bench.report``)."""
