"""Training infrastructure shared by every algorithm: loop, checkpoints, logs, evaluation, plots."""
