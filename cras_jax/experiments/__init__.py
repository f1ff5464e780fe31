"""Experiments over runs: sweeps and their plan (`sweep`, `sweep_plan`), reports over runs and
seeds (`report`, `report_inputs`, `report_curves`, `spread`), robustness to perturbations
(`robustness`) and the paper's figures (`figures`, `plots`)."""
