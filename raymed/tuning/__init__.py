"""Hyperparameter sweeps: Ray Tune trials of Ray Train runs, OptunaSearch (TPE) and ASHA."""
