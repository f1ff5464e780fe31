"""Training and evaluation: the jitted, sharded steps and the loop around them."""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cras_jax import backbones, centres as centres_lib, checkpoint, data as data_lib, model
from cras_jax import feature_cache, report
from cras_jax.data import preprocess


# ----------------------------------------------------------------------------- state

@flax.struct.dataclass
class TrainState:
  """The whole training state, one pytree.

  `backbone` holds the frozen feature extractor's variables: they are inputs of
  every step but not in `params`, so the optimiser never sees them.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  centres: jax.Array        # [K, HW, D], fixed after initialisation
  noise_std: jax.Array      # scalar: feature std used by relative noise (1.0 otherwise)
  rng: jax.Array
  backbone: Any = None

  def checkpointable(self) -> dict:
    return {"step": self.step, "params": self.params, "batch_stats": self.batch_stats,
            "opt_state": self.opt_state, "centres": self.centres,
            "noise_std": self.noise_std, "rng": self.rng}


def make_optimizer(lr_adapter: float, wd_adapter: float, lr_disc: float, wd_disc: float):
  """SPEC 8: AdamW for the adapter; Adam with coupled L2 decay for the discriminator."""
  adapter_tx = optax.adamw(lr_adapter, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd_adapter)
  disc_tx = optax.chain(optax.add_decayed_weights(wd_disc),
                        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
                        optax.scale(-lr_disc))
  labels = lambda params: {k: jax.tree.map(lambda _: k, v) for k, v in params.items()}
  return optax.multi_transform({"adapter": adapter_tx, "disc": disc_tx}, labels)


def optimizer_from_config(cfg) -> optax.GradientTransformation:
  t = cfg.train
  return make_optimizer(t.lr_adapter, t.wd_adapter, t.lr_disc, t.wd_disc)


# ----------------------------------------------------------------------------- model pieces

class Pieces:
  """What the steps close over: static modules and settings (no arrays)."""

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
    m = config.model
    self.config = config
    self.num_classes = num_classes
    self.heads = model.HeadsConfig.from_config(m)
    self.backbone = backbones.build_module(m.backbone, m.dtype)
    self.embed = model.make_embed_fn(self.backbone, tuple(m.levels), m.pre_embed_dim,
                                     m.embed_dim, m.patch_size)
    self.tx = optimizer_from_config(config)
    self.image_size = config.data.crop
    self.grid, self.num_patches = self._grid()

  def _grid(self):
    """Patch grid (h, w) of the first level and HW, from shapes alone."""
    levels = tuple(self.config.model.levels)
    x = jax.ShapeDtypeStruct((1, self.image_size, self.image_size, 3), jnp.float32)
    variables = jax.eval_shape(self.backbone.init, jax.random.PRNGKey(0), x)
    feats = jax.eval_shape(lambda v, x: self.backbone.apply(v, x, max_level=max(levels)),
                           variables, x)
    grid = tuple(feats[f"level{levels[0]}"].shape[1:3])
    return grid, grid[0] * grid[1]

  def features(self, backbone_vars, images_uint8):
    return self.embed(backbone_vars, preprocess.normalize(images_uint8))[0]


def create_state(pieces: Pieces, backbone_vars, seed: int) -> TrainState:
  rng = jax.random.PRNGKey(seed)
  init_rng, state_rng = jax.random.split(rng)
  params, batch_stats = model.init_heads(pieces.heads, init_rng)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=pieces.tx.init(params),
      centres=jnp.zeros((pieces.num_classes, pieces.num_patches, pieces.heads.embed_dim), jnp.float32),
      noise_std=jnp.ones((), jnp.float32), rng=state_rng, backbone=backbone_vars)


# ----------------------------------------------------------------------------- steps

def make_train_step(pieces: Pieces) -> Callable:
  cfg = pieces.heads

  def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    if "features" in batch:  # cached frozen-backbone features
      t = batch["features"].astype(jnp.float32)
    else:
      t = pieces.features(state.backbone, batch["image"])
    sigma = cfg.noise_sigma * state.noise_std
    noise = sigma * jax.random.normal(rng, t.shape[:2] + (cfg.embed_dim,), jnp.float32)
    grad_fn = jax.value_and_grad(model.heads_loss, has_aux=True)
    (_, aux), grads = grad_fn(state.params, state.batch_stats, t, batch["label"],
                              state.centres, noise, cfg)
    updates, opt_state = pieces.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(aux["metrics"])
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=aux["batch_stats"], opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_predict_step(pieces: Pieces) -> Callable:
  def predict_step(state: TrainState, images):
    t = pieces.features(state.backbone, images)
    return model.score_features(state.params, state.batch_stats, t, state.centres,
                                pieces.grid, (pieces.image_size, pieces.image_size), pieces.heads)

  return predict_step


def make_embed_step(pieces: Pieces) -> Callable:
  """Patch features t of a batch of images (frozen backbone + aggregation)."""
  def embed_step(state: TrainState, images):
    return pieces.features(state.backbone, images)

  return embed_step


def make_centre_step(pieces: Pieces) -> Callable:
  """Accumulates class sums of u = A(t) (images weighted by centre_weights) and the
  moments of u (images weighted by weights: 0 marks padding)."""
  def centre_step(acc, state: TrainState, t, labels, weights, centre_weights):
    sums, counts, s1, s2 = acc
    u = model.adapt(state.params, t.astype(jnp.float32), pieces.heads)
    sums, counts = centres_lib.accumulate(sums, counts, u, labels, weights * centre_weights)
    s1 = s1 + jnp.sum(u.mean(axis=(1, 2)) * weights)
    s2 = s2 + jnp.sum(jnp.square(u).mean(axis=(1, 2)) * weights)
    return sums, counts, s1, s2

  return centre_step


# ----------------------------------------------------------------------------- devices

class Devices:
  """A 1-D mesh over devices: batches split on 'data', state replicated.

  With several processes (`jax.distributed.initialize`), the mesh spans every
  process's devices; each process passes its own contiguous share of the global
  batch (`local_slice`) and `put_batch` assembles the global array.
  """

  def __init__(self, devices=None):
    devices = list(jax.devices() if devices is None else devices)
    self.mesh = Mesh(np.array(devices), ("data",))
    self.count = len(devices)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch = NamedSharding(self.mesh, P("data"))

  @staticmethod
  def local_slice(global_batch_size: int) -> slice:
    """This process's rows of a global batch (processes own contiguous blocks)."""
    n, i = jax.process_count(), jax.process_index()
    per = global_batch_size // n
    return slice(i * per, (i + 1) * per)

  def put_batch(self, batch: dict):
    """Host arrays (this process's share) -> global arrays sharded on 'data'."""
    return {k: jax.make_array_from_process_local_data(self.batch, v)
            for k, v in batch.items() if isinstance(v, np.ndarray)}

  @staticmethod
  def gather(tree):
    """Batch-sharded global arrays -> full host arrays on every process."""
    if jax.process_count() == 1:
      return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))

  def put_replicated(self, tree):
    """Identical host values on every process -> replicated global arrays."""
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), self.replicated,
                                               lambda idx: np.asarray(x)[idx]), tree)

  def jit_train(self, fn):
    return jax.jit(fn, in_shardings=(self.replicated, self.batch),
                   out_shardings=(self.replicated, self.replicated), donate_argnums=0)

  def jit_predict(self, fn):
    return jax.jit(fn, in_shardings=(self.replicated, self.batch), out_shardings=self.batch)


# ----------------------------------------------------------------------------- data order

def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """Shuffled indices of one epoch, a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(seed: int, step: int, n: int, batch_size: int, multiple: int = 1) -> tuple[int, np.ndarray]:
  """(epoch, indices) of global step `step`; the last batch of an epoch is kept
  (trimmed to a multiple of the device count)."""
  steps_per_epoch = math.ceil(n / batch_size)
  epoch, i = divmod(step, steps_per_epoch)
  idx = epoch_order(seed, epoch, n)[i * batch_size:(i + 1) * batch_size]
  keep = (len(idx) // multiple) * multiple
  return epoch, idx[:max(keep, multiple)] if keep else idx[:0]


class StopRequest:
  """Turns SIGINT/SIGTERM into a request to stop after the current step.

  A KeyboardInterrupt raised inside a blocking JAX call can leave the pending
  computation cancelled and the process hung; instead the handler records the
  signal and the loop checkpoints and exits between steps. A second Ctrl-C
  interrupts at once.
  """

  def __init__(self):
    self.signum = None
    self._old = {}

  def _handle(self, signum, frame):
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum
    print(f"\nsignal {signal.Signals(signum).name}: stopping after this step "
          f"(again to abort at once)", flush=True)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    return False


def prefetch(iterator, size: int = 2):
  """Runs `iterator` in a background thread, `size` items ahead."""
  import queue
  q: queue.Queue = queue.Queue(maxsize=size)
  sentinel = object()

  def worker():
    try:
      for item in iterator:
        q.put(item)
    except BaseException as e:  # surfaced in the consumer
      q.put(e)
    q.put(sentinel)

  threading.Thread(target=worker, daemon=True).start()
  while True:
    item = q.get()
    if item is sentinel:
      return
    if isinstance(item, BaseException):
      raise item
    yield item


# ----------------------------------------------------------------------------- loop

def _meta(config, class_names, pieces) -> dict:
  import cras_jax
  return {"class_names": list(class_names), "config": json.loads(config.to_json_best_effort()),
          "grid": list(pieces.grid), "num_patches": pieces.num_patches,
          "versions": report.versions(), "cras_jax": cras_jax.__version__}


def feature_pass(state: TrainState, pieces: Pieces, devices: Devices, dataset, config,
                 workdir: str):
  """One pass over the training set with the frozen backbone and the current adapter:
  class sums of u (for the centres) and the moments of u. With
  `train.cache_features`, also returns t of every training image (train order) as a
  memory-mapped array, read from the disk cache when present, else computed and stored.
  """
  n = len(dataset.train)
  bs = config.eval.batch_size
  k, hw, d = state.centres.shape
  acc = (jnp.zeros((k, hw, d)), jnp.zeros((k,)), jnp.zeros(()), jnp.zeros(()))
  centre_step = jax.jit(make_centre_step(pieces))
  embed_step = jax.jit(make_embed_step(pieces))
  labels = data_lib.class_indices(dataset.train)
  centre_w = centres_lib.centre_weights(labels, config.model.centre)
  feats = writer = None
  if config.train.cache_features:
    file = feature_cache.path(config, workdir, feature_cache.key(config, dataset))
    feats = feature_cache.load(file, (n, hw, d))
    if feats is not None:
      print(f"feature cache: reusing {file}", flush=True)
    else:
      dtype = config.train.feature_cache_dtype
      print(f"feature cache: writing {feature_cache.describe_size((n, hw, d), dtype)} to "
            f"{file}", flush=True)
      writer = feature_cache.Writer(file, (n, hw, d), dtype)
  for start in range(0, n, bs):
    idx = np.arange(start, min(start + bs, n))
    pad, weight = data_lib.padded_indices(idx, bs, devices.count)
    local = devices.local_slice(len(pad))
    if feats is not None:  # from the cache, as training will see it
      t = devices.put_batch({"t": np.asarray(feats[pad[local]])})["t"]
    else:
      images = data_lib.get_batch(dataset.train, pad[local], ("image",))["image"]
      t = embed_step(state, devices.put_batch({"image": images})["image"])
      if writer is not None:
        writer.array[idx] = devices.gather(t)[:len(idx)].astype(writer.array.dtype)
    lw = devices.put_batch({"label": labels[pad[local]], "weight": weight[local],
                            "centre_weight": centre_w[pad[local]]})
    acc = centre_step(acc, state, t, lw["label"], lw["weight"], lw["centre_weight"])
  if writer is not None:
    feats = writer.commit()
  return acc, feats


def compute_centres(state: TrainState, acc, dataset, config) -> TrainState:
  """MCMC centres and the feature std, with the untrained adapter (SPEC 4)."""
  sums, counts, s1, s2 = acc
  n = len(dataset.train)
  k = sums.shape[0]
  missing = [dataset.class_names[i] for i in np.flatnonzero(np.asarray(counts) == 0)]
  if missing:
    raise ValueError(f"no training images for classes {missing}")
  mean, meansq = s1 / n, s2 / n
  std = jnp.sqrt(jnp.maximum(meansq - mean ** 2, 0.0))
  noise_std = std if config.model.noise_relative else jnp.ones((), jnp.float32)
  how = "means of" if config.model.centre == "mean" else "one image each (w/o MCMC) of"
  print(f"centres: {k} classes, {how} {n} images; adapted-feature std {float(std):.4f}; "
        f"noise sigma {config.model.noise_sigma * float(noise_std):.4f}", flush=True)
  return state.replace(centres=centres_lib.finalise(sums, counts), noise_std=noise_std)


def setup(config, workdir: str, need_train: bool = True):
  dataset = data_lib.load_for_config(config, workdir)
  pieces = Pieces(config, len(dataset.class_names))
  devices = Devices()
  backbone_vars = backbones.load_variables(config.model.backbone, config.model.weights,
                                           config.data.crop, config.seed)
  state = create_state(pieces, backbone_vars, config.seed)
  state = devices.put_replicated(jax.device_get(state))
  return dataset, pieces, devices, state


def restore_latest(mngr, state: TrainState):
  """The newest readable checkpoint; corrupted newer ones are reported and skipped."""
  tree, meta, step, skipped = checkpoint.restore_good(mngr, state.checkpointable())
  for bad, reason in skipped:
    print(f"checkpoint {bad} is unreadable ({reason}); falling back to an earlier one "
          f"(moved to corrupted_checkpoints/)", flush=True)
  if skipped:
    print(f"using checkpoint {step}", flush=True)
  return state.replace(**tree), meta


# Config fields that do not change results: they may differ between a run and its resumption.
NON_RESULT_FIELDS = ("data.root", "data.cache_dir", "train.log_every", "train.eval_every",
                     "train.checkpoint_every_steps", "train.keep_checkpoints",
                     "train.cache_features", "train.feature_cache_dir", "eval.")


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def config_differences(saved: dict, current: dict) -> list[str]:
  """Result-changing fields that differ between a saved and a new config."""
  a, b = _flatten(saved), _flatten(current)
  diffs = []
  for key in sorted(a.keys() | b.keys()):
    if any(key == f or (f.endswith(".") and key.startswith(f)) for f in NON_RESULT_FIELDS):
      continue
    if a.get(key, "<absent>") != b.get(key, "<absent>"):
      diffs.append(f"{key}: saved {a.get(key, '<absent>')!r}, now {b.get(key, '<absent>')!r}")
  return diffs


class WorkdirLock:
  """An exclusive lock on the workdir (flock: released by the OS even on SIGKILL).

  In a multi-process run each process locks its own file (process 0 the same
  file as a single-process run), so the processes of one job share the workdir
  while a second job on it is refused.
  """

  def __init__(self, workdir: str):
    i = jax.process_index()
    self.path = os.path.join(workdir, ".lock" if i == 0 else f".lock.process{i}")
    self._f = None

  def __enter__(self):
    import fcntl
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    self._f = open(self.path, "a+")
    try:
      fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._f.seek(0)
      owner = self._f.read().strip() or "another process"
      self._f.close()
      raise RuntimeError(f"{os.path.dirname(self.path)} is in use by a running job ({owner}); "
                         f"wait for it to finish or use another --workdir") from None
    self._f.seek(0)
    self._f.truncate()
    self._f.write(f"pid {os.getpid()}\n")
    self._f.flush()
    return self

  def __exit__(self, *exc):
    import fcntl
    fcntl.flock(self._f, fcntl.LOCK_UN)
    self._f.close()
    return False


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False) -> dict:
  """Trains CRAS (resuming from the workdir's last checkpoint) and evaluates it.

  SIGINT/SIGTERM stop training after the current step with a checkpoint (exit
  status 128 + signal); rerunning the same command resumes exactly.
  """
  check_setting(config)
  check_protocol(config)  # before any data is prepared or trained on
  os.makedirs(workdir, exist_ok=True)
  if config.setting == "single_class":
    with WorkdirLock(workdir):
      return _single_class(config, workdir, lambda c, w: train_and_evaluate(
          c, w, allow_config_change), "final")
  with WorkdirLock(workdir), StopRequest() as stop:
    return _train_and_evaluate(config, workdir, stop, allow_config_change)


SETTINGS = ("multi_class", "single_class")


def check_setting(config) -> None:
  if config.setting not in SETTINGS:
    raise ValueError(f"config.setting={config.setting!r}: choose 'multi_class' (one model for "
                     f"all classes) or 'single_class' (one model per class)")


def single_class_configs(config, workdir: str) -> dict:
  """The per-class runs of the single-class setting: class -> (config, sub-workdir).

  Every run reads the same data (generated or prepared once, in the parent
  workdir's cache) and trains on one class in <workdir>/classes/<class>.
  """
  from cras_jax.data import datasets, mvtec
  root = data_lib.data_root(config, workdir)
  classes = (datasets.resolve_classes(config.data.name, config.data.classes)
             or mvtec.discover_classes(root))
  runs = {}
  for cls in classes:
    sub = ml_collections.ConfigDict(config.to_dict())
    sub.setting = "multi_class"  # one model, here for a single class
    sub.data.classes = (cls,)
    sub.data.root = root
    sub.data.cache_dir = config.data.cache_dir or os.path.join(workdir, "data_cache")
    runs[cls] = (sub, os.path.join(workdir, "classes", cls))
  return runs


def _single_class(config, workdir: str, run_one: Callable, tag: str) -> dict:
  """Runs (trains or evaluates) one model per class, one after another, and gathers
  their per-class rows into one table in workdir/results (metrics_<tag>.*)."""
  from cras_jax import metrics as metrics_lib
  runs = single_class_configs(config, workdir)
  table, protocols, steps = {}, set(), {}
  for i, (cls, (sub, subdir)) in enumerate(runs.items()):
    print(f"\n=== single-class setting: {cls} ({i + 1}/{len(runs)}) -> {subdir}", flush=True)
    run_one(sub, subdir)
    with open(os.path.join(subdir, "results", f"metrics_{tag}.json")) as f:
      res = json.load(f)
    table[cls] = res["metrics"][cls]
    protocols.add(res["protocol"])
    steps[cls] = res["step"]
  table = metrics_lib.summarise(table)
  extra = {"setting": "single_class", "protocol": " / ".join(sorted(protocols)), "step": steps,
           "runs": {c: os.path.relpath(d, workdir) for c, (_, d) in runs.items()},
           "score_mode": config.model.score_mode, "matching": config.model.matching}
  if jax.process_index() == 0:
    report.write_results(table, os.path.join(workdir, "results"), tag, extra)
  print(f"\n[{tag}] single-class setting, {len(runs)} models (protocol: {extra['protocol']})")
  print(report.markdown(table), flush=True)
  return table


def _train_and_evaluate(config, workdir: str, stop: "StopRequest",
                        allow_config_change: bool) -> dict:
  os.makedirs(workdir, exist_ok=True)
  dataset, pieces, devices, state = setup(config, workdir)
  mngr = checkpoint.manager(workdir, config.train.keep_checkpoints)
  meta = _meta(config, dataset.class_names, pieces)
  if mngr.latest_step() is not None:
    saved_meta = checkpoint.restore_meta(mngr)
    diffs = config_differences(saved_meta["config"], meta["config"])
    if diffs and not allow_config_change:
      raise ValueError(f"{workdir} holds a run with a different configuration:\n  "
                       + "\n  ".join(diffs) + "\nUse a new --workdir, or pass "
                       "--allow_config_change to continue this run with the new values.")
    if diffs:
      print("continuing with changed configuration (--allow_config_change):\n  "
            + "\n  ".join(diffs), flush=True)
    state, saved_meta = restore_latest(mngr, state)
    if saved_meta["class_names"] != meta["class_names"]:
      raise ValueError(f"{workdir}: checkpoint classes {saved_meta['class_names']} differ from the "
                       f"data's {meta['class_names']}; use a new --workdir")
    print(f"resumed from step {int(state.step)} ({mngr.directory})", flush=True)
    cache = (feature_pass(state, pieces, devices, dataset, config, workdir)[1]
             if config.train.cache_features else None)
  else:
    t0 = time.time()
    acc, cache = feature_pass(state, pieces, devices, dataset, config, workdir)
    state = compute_centres(state, acc, dataset, config)
    print(f"feature pass: {time.time() - t0:.1f}s", flush=True)
    checkpoint.save(mngr, 0, state.checkpointable(), meta)
  train_labels = data_lib.class_indices(dataset.train)

  n = len(dataset.train)
  bs = config.train.batch_size
  steps_per_epoch = math.ceil(n / bs)
  total = config.train.epochs * steps_per_epoch
  train_step = devices.jit_train(make_train_step(pieces))
  predict_step = devices.jit_predict(make_predict_step(pieces))
  ckpt_every = config.train.checkpoint_every_steps
  protocol = config.eval.protocol
  eval_every = config.train.eval_every or (1 if protocol == "best_epoch" else 0)

  def batches(start):
    for s in range(start, total):
      _, idx = batch_indices(config.seed, s, n, bs, devices.count)
      idx = idx[devices.local_slice(len(idx))]
      if cache is not None:
        batch = {"features": np.asarray(cache[np.sort(idx)])[np.argsort(np.argsort(idx))],
                 "label": train_labels[idx]}
      else:
        batch = data_lib.get_batch(dataset.train, idx, ("image", "label"))
      yield s, devices.put_batch(batch)

  step = int(state.step)
  history_path = (os.path.join(workdir, "train_log.jsonl") if jax.process_index() == 0
                  else os.devnull)
  bar = report.progress(total=total, initial=step, desc="train")
  window, last_metrics = [], {}
  for s, batch in prefetch(batches(step)):
    t0 = time.time()
    state, metrics = train_step(state, batch)
    window.append((metrics, batch["label"].shape[0], t0))
    done = s + 1
    end_of_epoch = done % steps_per_epoch == 0
    save_now = (end_of_epoch or done == total or (ckpt_every and done % ckpt_every == 0)
                or stop.signum is not None)
    if save_now or len(window) >= config.train.log_every:
      check_finite(window, done)  # before any save: never checkpoint a diverged state
      last_metrics = report.summarise_window(window)
      window = []
      bar.set_postfix_str(report.format_train_metrics(last_metrics))
      with open(history_path, "a") as f:
        f.write(json.dumps({"step": done, "epoch": done / steps_per_epoch, **last_metrics}) + "\n")
    bar.update(1)
    if save_now:
      checkpoint.save(mngr, done, state.checkpointable(), meta)
    if stop.signum is not None:
      bar.close()
      print(f"stopped at step {done}/{total}; checkpoint saved. "
            f"Rerun the same command to resume.", flush=True)
      raise SystemExit(128 + stop.signum)
    epoch = done // steps_per_epoch
    if end_of_epoch and eval_every and epoch % eval_every == 0 and done != total:
      evaluate(state, pieces, devices, dataset, config, workdir, predict_step,
               tag=f"epoch_{epoch:03d}", heatmaps=False)
  bar.close()
  if last_metrics:
    print("final training window: " + report.format_train_metrics(last_metrics), flush=True)
  if protocol == "final":
    return evaluate(state, pieces, devices, dataset, config, workdir, predict_step, tag="final",
                    calibrate=True)
  evaluate(state, pieces, devices, dataset, config, workdir, predict_step,
           tag=f"epoch_{config.train.epochs:03d}", calibrate=True)
  return report_best_epoch(workdir)


PROTOCOLS = ("final", "best_epoch")
BEST_EPOCH_LABEL = "best epoch (reference protocol: selected on the test set)"


def check_protocol(config) -> None:
  if config.eval.protocol not in PROTOCOLS:
    raise ValueError(f"config.eval.protocol={config.eval.protocol!r}: choose 'final' (the last "
                     f"epoch) or 'best_epoch' (the reference code's selection on the test set)")


def report_best_epoch(workdir: str) -> dict:
  """The reference protocol: of the per-epoch results in workdir/results, the epoch
  with the best mean I-AUROC + P-AUROC is written as the run's reported result
  (metrics_final.*, labelled as selected on the test set)."""
  import glob
  import shutil
  from cras_jax import metrics as metrics_lib
  out_dir = os.path.join(workdir, "results")
  files = sorted(glob.glob(os.path.join(out_dir, "metrics_epoch_*.json")))
  if not files:
    raise FileNotFoundError(f"{out_dir}: no per-epoch results to select from")
  runs = [json.load(open(f)) for f in files]
  best = metrics_lib.select_epoch([r["metrics"] for r in runs], "best_epoch")
  chosen = runs[best]
  tag = os.path.basename(files[best])[len("metrics_"):-len(".json")]
  extra = {k: v for k, v in chosen.items() if k not in ("metrics", "versions")}
  extra.update(protocol=BEST_EPOCH_LABEL, selected=tag, selected_step=chosen["step"],
               candidates=[os.path.basename(f)[len("metrics_"):-len(".json")] for f in files])
  if jax.process_index() == 0:
    report.write_results(chosen["metrics"], out_dir, "final", extra)
    scores = os.path.join(out_dir, f"scores_{tag}.csv")
    if os.path.exists(scores):
      shutil.copyfile(scores, os.path.join(out_dir, "scores_final.csv"))
  print(f"\n[final] protocol: {BEST_EPOCH_LABEL}: {tag} (step {chosen['step']}) of "
        f"{len(files)} evaluated epochs")
  print(report.markdown(chosen["metrics"]), flush=True)
  return chosen["metrics"]


def check_finite(window, done: int) -> None:
  """Stops training at the first non-finite loss or gradient of the window."""
  host = jax.device_get([m for m, _, _ in window])
  first = done - len(window) + 1
  for i, m in enumerate(host):
    bad = [k for k in ("loss", "grad_norm") if not np.isfinite(m[k])]
    if bad:
      raise FloatingPointError(
          f"non-finite {' and '.join(bad)} at step {first + i}: training stopped; the last "
          f"checkpoint (before that step) is kept. Lower the learning rates or check the data.")


def predict_dataset(state, pieces, devices, source, batch_size, predict_step,
                    extra_outputs: tuple[str, ...] = ()):
  """Scores a whole split -> dict of numpy arrays (scores, maps, cls, labels...).

  extra_outputs: further keys of predict_step's result to gather (e.g. features)."""
  n = len(source)
  outs = {k: [] for k in ("scores", "maps", "cls", *extra_outputs)}
  meta = {k: [] for k in ("label", "is_anomaly", "mask", "image")}
  names = []
  bar = report.progress(total=n, desc="score", unit="img")
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    batch = data_lib.padded_batch(source, idx, batch_size, devices.count)
    local = batch["image"][devices.local_slice(len(batch["image"]))]
    res = predict_step(state, devices.put_batch({"image": local})["image"])
    res = devices.gather({k: res[k] for k in outs})
    m = len(idx)
    for k in outs:
      outs[k].append(res[k][:m])
    for k in meta:
      meta[k].append(batch[k][:m])
    names += list(batch["name"][:m])
    bar.update(m)
  bar.close()
  result = {k: np.concatenate(v) for k, v in {**outs, **meta}.items()}
  result["name"] = names
  result["has_mask"] = data_lib.has_mask(source)
  return result


def evaluate(state, pieces, devices, dataset, config, workdir, predict_step=None, tag="final",
             heatmaps=True, calibrate=False) -> dict:
  """Per-class metrics of SPEC 10 on the test split, written to workdir/results.

  calibrate: also write workdir/thresholds.json (per-class normalisation, image and pixel
  thresholds; `predict.calibrate`) from these scores; the metrics are unchanged."""
  if predict_step is None:
    predict_step = devices.jit_predict(make_predict_step(pieces))
  t0 = time.time()
  res = predict_dataset(state, pieces, devices, dataset.test, config.eval.batch_size, predict_step)
  seconds = time.time() - t0
  table = report.class_metrics(res, dataset.class_names, config.eval.fpr_limit)
  out_dir = os.path.join(workdir, "results")
  protocol = {"final": "final epoch", "eval": f"checkpoint of step {int(state.step)}"}.get(
      tag, f"per-epoch evaluation ({tag})")
  extra = {"step": int(state.step), "protocol": protocol,
           "score_mode": config.model.score_mode, "matching": config.model.matching,
           "test_images": len(res["scores"]), "score_seconds": seconds}
  if jax.process_index() == 0:
    report.write_results(table, out_dir, tag, extra)
    report.write_scores(res, dataset.class_names, os.path.join(out_dir, f"scores_{tag}.csv"))
  print(f"\n[{tag}] step {int(state.step)}, {len(res['scores'])} test images scored in "
        f"{seconds:.1f}s (protocol: {extra['protocol']}; image score: {config.model.score_mode})")
  print(report.markdown(table), flush=True)
  if heatmaps and jax.process_index() == 0:
    report.save_heatmaps(res, dataset.class_names, os.path.join(out_dir, "heatmaps"),
                         config.eval.num_heatmaps)
  if calibrate:
    from cras_jax import predict as predict_lib
    predict_lib.calibrate(state, config, dataset.class_names, devices, dataset, workdir, res)
  return table


def config_from_meta(meta: dict) -> ml_collections.ConfigDict:
  """The config a checkpoint was trained with (stored in its meta item)."""
  return ml_collections.ConfigDict(meta["config"])


class Run(NamedTuple):
  """A trained run restored from its workdir, ready to score."""
  config: ml_collections.ConfigDict
  pieces: Pieces
  devices: Devices
  state: TrainState
  meta: dict

  @property
  def class_names(self) -> list[str]:
    return list(self.meta["class_names"])


def load_run(workdir: str, config: ml_collections.ConfigDict | None = None) -> Run:
  """Restores the workdir's newest readable checkpoint with its frozen backbone.

  config: defaults to the one the run was trained with (from the checkpoint), so a
  trained workdir alone is enough to score new images.
  """
  classes_dir = os.path.join(workdir, "classes")
  if os.path.isdir(classes_dir) and not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(
        f"{workdir} holds one model per class (setting=single_class): pass one of them, "
        f"--workdir={os.path.join(classes_dir, '<class>')} ({', '.join(sorted(os.listdir(classes_dir)))})")
  mngr = checkpoint.manager(workdir)
  if mngr.latest_step() is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint to evaluate; train first "
                            f"(python -m cras_jax.main --config=... --workdir={workdir})")
  meta = checkpoint.restore_meta(mngr)
  if config is None:
    config = config_from_meta(meta)
  pieces = Pieces(config, len(meta["class_names"]))
  devices = Devices()
  backbone_vars = backbones.load_variables(config.model.backbone, config.model.weights,
                                           config.data.crop, config.seed)
  state = create_state(pieces, backbone_vars, config.seed)
  state = devices.put_replicated(jax.device_get(state))
  state, meta = restore_latest(mngr, state)
  return Run(config, pieces, devices, state, meta)


def load_run_dataset(run: Run, workdir: str, data_root: str | None = None):
  """The dataset of a loaded run (its config's data, or `data_root` instead of the
  recorded root), checked to hold the classes the run was trained on."""
  config = run.config
  if data_root:
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.root = data_root
  dataset = data_lib.load_for_config(config, workdir)
  if run.class_names != list(dataset.class_names):
    raise ValueError(f"checkpoint classes {run.class_names} differ from the data's "
                     f"{list(dataset.class_names)}")
  return dataset


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Scores the workdir's latest checkpoint without training."""
  if config.setting == "single_class":
    return _single_class(config, workdir, evaluate_checkpoint, "eval")
  run = load_run(workdir, config)
  dataset = load_run_dataset(run, workdir)
  return evaluate(run.state, run.pieces, run.devices, dataset, config, workdir, tag="eval")
