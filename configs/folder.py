"""Any dataset in the MVTec layout; the classes are discovered from the root's sub-folders
(those holding train/ or test/), unless --config.data.classes is given."""

from configs import mvtec


def get_config():
  config = mvtec.get_config()
  config.data.name = "folder"
  config.data.classes = ()
  return config
