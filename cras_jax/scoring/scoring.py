"""Scoring a trained model: the one place where a batch of images is scored.

A `Scorer` holds a model's scoring variables (`steps.make_prepare_step`: the frozen backbone,
the folded BatchNorm and the per-centre terms), prepared once per trained state, and one
jitted, sharded predict step at a fixed batch size, compiled once and reused by every batch.
Evaluation, thresholds, `predict`, `robustness`, `figures`, `export` and the benchmark all
score through it: a batch of uint8 images (`__call__`, padded to the batch size) or a whole
split (`predict_dataset`). `write_thresholds` fits the per-class normalisation and the
thresholds on a scored split, `load_thresholds` reads them for a command, `normalise` applies
them to scored images.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np

from cras_jax import data as data_lib
from cras_jax.base import stop as stop_lib
from cras_jax.engine import sharding, steps
from cras_jax.results import tables as results
from cras_jax.scoring import threshold_fit, thresholds

OUTPUTS = ("scores", "maps", "cls")  # what a scored batch returns by default


def per_image_config(config) -> ml_collections.ConfigDict:
  """The config with model.matching = "per_image" (a copy; the original may be locked).

  Every image is then scored on its own, whatever else is in its batch: the scoring of
  thresholds, `predict` and `export`."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  if cfg.model.matching != "per_image":
    print(
        f"note: this run was configured with model.matching={cfg.model.matching!r} "
        f"(class voting over the batch); predict scores every image on its own "
        f"(per_image), so its scores can differ from the run's evaluation.",
        file=sys.stderr,
    )
    cfg.model.matching = "per_image"
  return cfg


class Scorer:
  """Scores batches of images with one trained model, in batches of `batch_size`.

  step_fn: (scoring variables, uint8 images) -> dict of outputs; default
  `steps.make_predict_step(spec)` (scores, maps, patch, cls; a `step_fn` of one's own is built
  with `axis_name=devices.axis_name`, as in the per-device forms it sees a device's share of
  the batch). The scorer jits it once
  (`Devices.jit_predict`); `set_state` prepares the variables of a (new) trained state with
  a prepare step jitted once too, so scoring after more training compiles nothing again.
  """

  def __init__(
      self,
      spec: steps.ModelSpec,
      devices: sharding.Devices,
      batch_size: int,
      step_fn: Callable | None = None,
      state: steps.TrainState | None = None,
  ):
    self.spec, self.devices, self.batch_size = spec, devices, int(batch_size)
    self.step_fn = step_fn or steps.make_predict_step(spec, axis_name=devices.axis_name)
    self.predict_step = devices.jit_predict(self.step_fn)
    self._prepare = devices.jit_prepare(steps.make_prepare_step(spec))
    self.svars, self.model_step = None, None
    if state is not None:
      self.set_state(state)

  @classmethod
  def for_run(cls, run, batch_size: int | None = None, per_image: bool = False) -> Scorer:
    """The scorer of a loaded run (`trained.load_run`), by default at its eval batch size."""
    scorer = cls(run.spec, run.devices, batch_size or run.config.eval.batch_size, state=run.state)
    return scorer.per_image() if per_image else scorer

  def set_state(self, state: steps.TrainState) -> Scorer:
    """Scores the model of `state` from now on (its variables, prepared here once)."""
    self.svars = self._prepare(state)
    self.model_step = int(state.step)
    return self

  def per_image(self) -> Scorer:
    """This scorer with per-image matching (`per_image_config`): itself when the model
    matches per image already, else a scorer of the same prepared variables (they do not
    depend on the matching mode) with its own predict step."""
    if self.spec.heads.per_image_matching:
      return self
    spec = steps.ModelSpec(per_image_config(self.spec.config), self.spec.num_classes)
    other = Scorer(spec, self.devices, self.batch_size)
    other.svars, other.model_step = self.svars, self.model_step
    return other

  def _score(self, images: np.ndarray, outputs: Sequence[str]) -> dict:
    """One padded global batch of host images -> the outputs as host arrays (every
    process passes the same batch and scores its own share of it)."""
    local = images[self.devices.local_slice(len(images))]
    out = self.predict_step(self.svars, self.devices.put_batch({"image": local})["image"])
    return self.devices.gather({k: out[k] for k in outputs})

  def __call__(self, images: np.ndarray, outputs: Sequence[str] = OUTPUTS) -> dict:
    """uint8 crops [n <= batch_size, c, c, 3] -> numpy outputs [n, ...] (scores [n],
    maps [n, c, c], cls [n] by default); padded to the batch size, so it compiles once."""
    n = len(images)
    idx, _ = data_lib.padded_indices(np.arange(n), self.batch_size, self.devices.count)
    out = self._score(np.asarray(images)[idx], outputs)
    return {k: v[:n] for k, v in out.items()}

  def predict_dataset(self, source, extra_outputs: Sequence[str] = ()) -> dict:
    """Scores a whole split -> dict of numpy arrays: scores, maps, cls, the examples' label,
    is_anomaly, mask, image, name and has_mask, and `extra_outputs` of the step."""
    n = len(source)
    outs = {k: [] for k in (*OUTPUTS, *extra_outputs)}
    meta = {k: [] for k in ("label", "is_anomaly", "mask", "image")}
    names = []
    bar = results.progress(total=n, desc="score", unit="img")
    for start in range(0, n, self.batch_size):
      stop_lib.poll("scoring", "no result of this evaluation is written")
      idx = np.arange(start, min(start + self.batch_size, n))
      batch = data_lib.padded_batch(source, idx, self.batch_size, self.devices.count)
      res = self._score(batch["image"], list(outs))
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


def write_thresholds(
    scorer: Scorer,
    source,
    class_names: Sequence[str],
    workdir: str,
    res: dict | None = None,
    run_id: str | None = None,
    member: str | None = None,
) -> dict:
  """Fits the per-class normalisation and the image and pixel thresholds on a split (the
  test split: `threshold_fit.fit` uses its calibration half) and writes <workdir>/thresholds.json.

  scorer: a per-image scorer (`Scorer.per_image`); res: its `predict_dataset` of `source`
  when already computed, else the split is scored here; run_id: the run whose checkpoint
  `scorer` holds, and member: a population's member it is, recorded in the file (the scoring
  commands accept only their run's, and their member's, thresholds). Every process takes
  part; process 0 writes."""
  if res is None:
    res = scorer.predict_dataset(source)
  d = threshold_fit.fit(res, class_names)
  d.update(
      step=scorer.model_step,
      score_mode=scorer.spec.config.model.score_mode,
      matching="per_image",
      run_id=run_id,
  )
  if member is not None:
    d["member"] = member
  if jax.process_index() == 0:
    thresholds.save(d, thresholds.path(workdir))
  print(thresholds.summary(d) + f" -> {thresholds.path(workdir)}", flush=True)
  return d


def load_thresholds(
    run, workdir: str, image_threshold: float | None = None, pixel_threshold: float | None = None
) -> thresholds.Thresholds:
  """The thresholds a scoring command applies: <workdir>/thresholds.json (identity
  normalisation and no thresholds when the run has none), with the given overrides."""
  run_id = run.meta.get("run_id") if getattr(run, "meta", None) else None
  thr = thresholds.load(workdir, run.class_names, run_id, getattr(run, "member", None))
  thr = thr or thresholds.Thresholds.identity(run.class_names)
  state = getattr(run, "state", None)
  if thr.step is not None and state is not None and thr.step != int(state.step):
    print(
        f"warning: {thresholds.path(workdir)} was calibrated at step {thr.step}, the "
        f"checkpoint is at step {int(state.step)}: recompute it with --calibrate",
        file=sys.stderr,
    )
  if image_threshold is not None or pixel_threshold is not None:
    thr = thr.with_overrides(image_threshold, pixel_threshold)
    thr.source = thr.source + "+override"
  return thr


def normalise(out: dict, thr: thresholds.Thresholds) -> dict:
  """A scored batch in the thresholds' units: z = (s - loc[c]) / scale[c] of every image's
  score ("normalised_scores") and map ("normalised_maps"), c its matched class."""
  return {
      "normalised_scores": thresholds.normalise(out["scores"], out["cls"], thr.loc, thr.scale),
      "normalised_maps": thresholds.normalise_maps(out["maps"], out["cls"], thr.loc, thr.scale),
  }
