"""Runs and scoring, in three sub-packages layered state <- scoring <- reporting.

`state`: a workdir, its config check, checkpoints and specs, a trained run, its result files.
`scoring`: the one Scorer, evaluation, thresholds, predicting new images, the export.
`reporting`: results over seeds, a sweep's plan, the report's inputs and curves, plots.
"""
