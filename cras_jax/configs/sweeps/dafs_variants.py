"""DAFS variants (Table 6): how the noise is scaled by the distance to the class centre.

python -m cras_jax.sweep --sweep=configs/sweeps/dafs_variants.py --sweep_dir=runs/dafs
python -m cras_jax.report runs/dafs
"""

import collections


def get_sweep():
  return collections.OrderedDict(
      [
          ("beta_0", ["model.dafs_beta=0.0"]),
          ("no_scaling", ["model.dafs_variant=no_scaling"]),
          ("inv_r", ["model.dafs_variant=inv_r"]),
          ("inv_g_r", ["model.dafs_variant=inv_g_r"]),
          ("default", []),  # the paper's DAFS, beta = 0.3
      ]
  )
