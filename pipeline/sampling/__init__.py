"""Drawing pictures: each run's prompt encoder and the base SD pipeline."""
