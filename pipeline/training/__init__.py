"""The training loop of every architecture (epochs, checkpoints, early stopping)."""
