"""A run's state: its workdir (`workdir`), checkpoints (`checkpoint`), the specs built from its
config (`specs`), a trained run loaded for scoring (`trained`), one-model-per-class runs
(`single_class`), named datasets and weights fetched before work (`named_inputs`) and the
stored backbone features (`feature_cache`)."""
