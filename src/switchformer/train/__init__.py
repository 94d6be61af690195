"""Training: configuration, data preparation, the loop, checkpoints and plots."""
