"""Benchmarks of the pipeline's stages; each module also runs on its own
(`python -m pipeline.benchmarks.X`, with --help)."""
