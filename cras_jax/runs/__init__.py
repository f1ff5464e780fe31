"""Runs and scoring: a workdir, its config check and checkpoints, the one Scorer, evaluation and result files."""
