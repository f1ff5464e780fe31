"""Scoring: the one Scorer, evaluation, thresholds, predicting new images and their files, the export."""
