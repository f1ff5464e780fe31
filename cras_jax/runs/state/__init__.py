"""Run state: a workdir, its config check, checkpoints and specs, a trained run read back, its result files."""
