"""Parameter sensitivity (Fig. 8): noise sigma, DAFS beta, patch size and backbone levels,
one at a time, around the base config's values (a `default` run holds them all at default).

python -m cras_jax.sweep --sweep=configs/sweeps/params.py --sweep_dir=runs/params
python -m cras_jax.report runs/params --curve=model.noise_sigma --curve=model.dafs_beta \\
    --curve=model.patch_size --curve=model.levels

The sigma values are multiples of the base config's (1/3 ... 5/3: 0.005 ... 0.025 for the
paper's 0.015), so they suit both absolute (mvtec) and relative (demo) noise.
"""

import collections

SIGMA_FACTORS = (1 / 3, 2 / 3, 4 / 3, 5 / 3)
BETAS = (0.1, 0.5, 0.7)
PATCH_SIZES = (1, 5)
LEVELS = ((2,), (3,), (1, 2), (3, 4), (1, 2, 3))


def get_sweep(config=None):
  sigma = 0.015 if config is None else config["model"]["noise_sigma"]
  runs = collections.OrderedDict([("default", [])])
  for f in SIGMA_FACTORS:
    s = float(f"{sigma * f:.4g}")
    runs[f"sigma_{s:g}"] = [f"model.noise_sigma={s!r}"]
  for b in BETAS:
    runs[f"beta_{b:g}"] = [f"model.dafs_beta={b!r}"]
  for p in PATCH_SIZES:
    runs[f"patch_{p}"] = [f"model.patch_size={p}"]
  for levels in LEVELS:
    runs["levels_" + "_".join(map(str, levels))] = [
        "model.levels=(" + ",".join(map(str, levels)) + ("," if len(levels) == 1 else "") + ")"
    ]
  return runs
