"""Benchmarks of the pipeline's stages; each file runs on its own (`python benchmarks/X.py`)."""
