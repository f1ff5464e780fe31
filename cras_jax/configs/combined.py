"""One CRAS model across datasets: the classes of MVTec AD, VisA and MPDD trained together
(`data.name=combined`; class names `<dataset>.<class>`; results per class, per dataset and
overall), with the paper's settings. Give each dataset's folder:

python -m cras_jax.main --config=configs/combined.py --workdir=runs/combined \\
    --config.data.sources='("mvtec:/data/mvtec_ad", "visa:/data/visa_mvtec_layout", "mpdd:/data/mpdd")'

A named source without a root is read from `data.data_dir` (fetched there where it can be).
"""

from cras_jax.configs import mvtec


def get_config():
  config = mvtec.get_config()
  config.data.name = "combined"
  config.data.classes = ()  # every class of every source
  config.data.sources = ("mvtec", "visa", "mpdd")
  return config
