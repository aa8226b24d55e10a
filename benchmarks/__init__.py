"""Benchmarks of melanoma-dist: each script measures our path and a plain baseline in one run.

Run them all with `python benchmarks/run_all.py [--smoke]`; see benchmarks/README.md.
"""
