"""The paper's component ablations (Tables 4 and 5): the full model and one component off.

python -m cras_jax.sweep --sweep=configs/sweeps/ablations.py --sweep_dir=runs/ablations
python -m cras_jax.report runs/ablations

The base config is configs/demo.py unless --config=... is given (e.g. configs/mvtec.py with
--config.data.root=... for the paper's setting).
"""

import collections


def get_sweep():
  return collections.OrderedDict(
      [
          ("full", []),
          ("wo_mcmc", ["model.centre=single"]),  # one training image per class as centre
          ("wo_hpi", ["model.hpi=False"]),  # same-position centre vector
          ("wo_dafs", ["model.dafs_variant=none"]),  # alpha = 1: noise not scaled by distance
          ("wo_crd", ["model.crd_input=raw"]),  # discriminator on the feature alone
      ]
  )
