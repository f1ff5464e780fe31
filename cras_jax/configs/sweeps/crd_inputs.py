"""CRD input combinations (Table 6): what the discriminator sees of a patch.

python -m cras_jax.sweep --sweep=configs/sweeps/crd_inputs.py --sweep_dir=runs/crd
python -m cras_jax.report runs/crd
"""

import collections


def get_sweep():
  return collections.OrderedDict(
      [
          (name, [f"model.crd_input={name}"])
          for name in ("raw", "residual", "raw_raw", "residual_residual", "raw_residual")
      ]
  )
