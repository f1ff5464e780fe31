"""MVTec AD, multi-class, with the paper's defaults (docs/method.md §11).

python -m cras_jax.main --config=configs/mvtec.py --workdir=runs/mvtec

The backbone's torchvision ImageNet weights are fetched by name into the user cache; the
dataset is read from data.root, or, with data.root empty, from <data.data_dir>/<name>
(fetched there when it has a public address or data.download_url gives one; otherwise the
message says where to get it and where to put it). README "Datasets and weights by name".
"""

import ml_collections

from cras_jax.base import registry

MVTEC_CLASSES = registry.MVTEC_CLASSES  # the registry's list (one table)


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # "multi_class": one model for all classes (the paper's main setting);
  # "single_class": one model per class, trained one after another in
  # <workdir>/classes/<class>, results gathered into one table.
  config.setting = "multi_class"

  config.data = ml_collections.ConfigDict()
  config.data.name = "mvtec"
  config.data.root = ""  # the dataset directory (MVTec layout); "": by name, below
  # Where datasets named by data.name are downloaded and prepared; "": <cache.dir>/datasets.
  config.data.data_dir = ""
  # The archive to fetch for data.name instead of the registry's address (a mirror, or the
  # file a licence page gave you); "": the registry's (base/registry.py).
  config.data.download_url = ""
  # The archive's SHA-256 when you know it ("": the registry's pin, if any).
  config.data.download_sha256 = ""
  config.data.classes = MVTEC_CLASSES
  config.data.cache_dir = ""  # prepared TFDS data; default <workdir>/data_cache
  # True: defective test images without masks are allowed; pixel metrics then
  # cover only the images that have masks.
  config.data.allow_image_level_only = False
  config.data.resize = 329
  config.data.crop = 288
  config.data.allow_crop_padding = False  # True: a crop larger than the resize is zero-padded
  # Masks are scaled to [0, 1] and a pixel is a defect where > 0.5 after resizing;
  # "reference_int_cast": the reference code's rule (only pixels that stay exactly 1.0).
  config.data.mask_rule = "binarise"
  # Files larger than this (decoded pixels) or more elongated are reported, not decoded.
  config.data.max_image_pixels = 50_000_000
  config.data.max_aspect_ratio = 10.0
  config.data.synthetic = ml_collections.ConfigDict(
      dict(seed=0, image_size=160, n_train=40, n_test_good=12, n_test_defect_per_type=6)
  )

  config.model = ml_collections.ConfigDict()
  config.model.backbone = "wide_resnet50_2"
  # "torchvision": torchvision's ImageNet weights of the backbone, fetched and verified
  # into <cache.dir>/weights; a path: a .pth or converted .msgpack file; "random" by name only.
  config.model.weights = "torchvision"
  # Where "torchvision" weights are fetched from (a mirror holding the same files);
  # "": torchvision's own address (base/registry.py TORCHVISION_BASE_URL).
  config.model.weights_url = ""
  config.model.levels = (2, 3)
  config.model.patch_size = 3
  config.model.pre_embed_dim = 1536
  config.model.embed_dim = 1536
  config.model.adapter_layers = 1
  config.model.disc_layers = 3
  config.model.centre = "mean"  # MCMC class means; "single": one training image (w/o MCMC)
  config.model.noise_sigma = 0.015
  config.model.noise_relative = False  # True: sigma is a multiple of the adapted-feature std
  config.model.dafs_beta = 0.3
  config.model.dafs_variant = "default"  # "none": alpha = 1 (w/o DAFS); Table 6 variants
  config.model.crd_input = "raw_residual"  # "raw": w/o CRD; Table 6 combinations
  config.model.hpi = True  # False: same-position centre vector (w/o HPI)
  config.model.matching = "per_image"  # or "batch" (the reference's batch-mode)
  config.model.score_mode = "reference"  # max of raw patch scores; "paper": max of the map
  config.model.map_sigma = 4.0
  config.model.dtype = "float32"

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 32
  config.train.epochs = 100
  config.train.lr_adapter = 1e-4
  config.train.wd_adapter = 0.01
  config.train.lr_disc = 2e-4
  config.train.wd_disc = 1e-5
  config.train.eval_every = 0  # evaluate every N epochs (0: only at the end)
  config.train.checkpoint_every_steps = 0  # 0: at each epoch end only
  config.train.keep_checkpoints = 3
  config.train.log_every = 20
  # The backbone is frozen and training has no augmentation: compute its patch
  # features once (host memory) and train the heads on them.
  config.train.cache_features = False
  config.train.feature_cache_dtype = "float16"  # storage; training computes in float32
  config.train.feature_cache_dir = ""  # default <data cache_dir>/features
  # A population of heads trained in one compiled step (README "Populations";
  # cras_jax/runs/population.py): "seed=0,1,2,3", or ";"-separated fields of
  # runs.population.FIELDS, every combination a member. "": one model.
  config.train.population = ""
  config.train.data_seed = -1  # seed of the data order (and a random backbone); -1: seed
  # Devices along the population's members (the 2-D mesh ("model", "data")); the rest split
  # the batch. 1: every device splits the batch, members replicated.
  config.train.population_model_shards = 1

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 32
  # "final": the last epoch (default). "best_epoch": the reference code's protocol,
  # evaluating every train.eval_every (or 1) epochs and reporting the epoch with the
  # best mean I-AUROC + P-AUROC: it selects on the test set, and reports say so.
  config.eval.protocol = "final"
  config.eval.fpr_limit = 0.3
  config.eval.num_heatmaps = 4

  # The user cache (fetched weights and datasets, compiled programs).
  config.cache = ml_collections.ConfigDict()
  # "": $CRAS_JAX_CACHE_DIR, else $XDG_CACHE_HOME/cras_jax, else ~/.cache/cras_jax.
  config.cache.dir = ""
  # XLA's persistent compilation cache, so later starts reuse compiled steps: "auto"
  # ($CRAS_JAX_COMPILATION_CACHE, else <cache.dir>/xla), "off", or a directory.
  config.cache.compilation = "auto"

  config.log = ml_collections.ConfigDict()
  config.log.progress = True  # False: no progress bars (readable CI logs)
  config.log.tensorboard = True  # <workdir>/tensorboard/ event files (no TensorFlow needed)
  return config
