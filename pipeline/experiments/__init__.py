"""Ablations and sweeps whose records live in docs/records/
(`python -m pipeline.experiments.NAME`)."""
