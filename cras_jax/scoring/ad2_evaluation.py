"""MVTec AD 2's evaluation of a trained run: thresholds fitted on its validation split only
(`fit_validation`: mean + 3 std of the validation scores per class, the baseline of MVTec's
checker), SegF1 and image F1 at those thresholds on test_public (`segf1_columns`), and the
thresholds file they are written to. `scoring.submission` writes the private test sets."""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Sequence

import numpy as np

from cras_jax.base import errors
from cras_jax.method import metrics as metrics_lib
from cras_jax.scoring import scoring, threshold_fit, thresholds

RULE = "validation_mean_plus_3std"
N_STD = 3.0
RULE_SOURCE = (
    "MVTec AD 2's baseline (MVTecAD2_public_code_utils/check_and_prepare_data_for_upload.py): "
    "threshold = mean + 3 * std of the validation images' anomaly scores"
)


# ----------------------------------------------------------------------------- thresholds


def _mean_std(values: np.ndarray) -> tuple[float, float]:
  """Mean and (population) standard deviation in float64, in chunks (no float64 copy)."""
  flat = values.reshape(-1)
  n, total, chunk = flat.size, 0.0, 1 << 22
  for i in range(0, n, chunk):
    total += float(np.sum(flat[i : i + chunk], dtype=np.float64))
  mean = total / n
  sq = 0.0
  for i in range(0, n, chunk):
    sq += float(np.sum(np.square(flat[i : i + chunk].astype(np.float64) - mean)))
  return mean, math.sqrt(sq / n)


def pixel_normalisation(maps, cls, num_classes: int):
  """(loc [K], scale [K], info): per matched class, the mean and the (population) standard
  deviation of every pixel of its validation images' maps. A class no validation image was
  matched to, or whose pixels all score the same, takes the median of the other classes'
  (1 and 0 when there are none); `info` says which (as `thresholds.normalisation`'s)."""
  maps, cls = np.asarray(maps), np.asarray(cls)
  loc, scale = np.full(num_classes, np.nan), np.full(num_classes, np.nan)
  counts = [int(np.sum(cls == k)) for k in range(num_classes)]
  for k in range(num_classes):
    if counts[k]:
      mean, std = _mean_std(maps[cls == k])
      loc[k] = mean
      if std > 1e-12:
        scale[k] = std
  source = {
      "loc_source": ["class" if np.isfinite(v) else "median_of_classes" for v in loc],
      "scale_source": ["class" if np.isfinite(v) else "median_of_classes" for v in scale],
  }
  loc[np.isnan(loc)] = np.nanmedian(loc) if np.isfinite(loc).any() else 0.0
  scale[np.isnan(scale)] = np.nanmedian(scale) if np.isfinite(scale).any() else 1.0
  return loc, scale, {"n_normal": counts, **source}


def fit_validation(res: dict, class_names: Sequence[str]) -> dict:
  """Normalisation and thresholds fitted on a scored validation split (normal images only).

  res: `Scorer.predict_dataset` of the validation split (scores [N], maps [N, H, W], cls [N]:
  the matched classes). MVTec AD 2's rule, per class: a pixel is anomalous above the mean + 3
  standard deviations of the class's validation pixels. Normalised by those (`pixel_normalisation`:
  z = (s - mean[c]) / std[c]), that is z >= 3 for every class: one pixel threshold serves all,
  as this project's thresholds need. The image threshold is the same rule on the normalised
  image scores, all classes pooled. Both are placed between validation values
  (`threshold_fit.separating_threshold`). Returns the content of thresholds.json
  (`thresholds.save`), its rules `RULE`."""
  scores, cls = np.asarray(res["scores"]), np.asarray(res["cls"])
  if scores.size == 0:
    raise errors.UserValueError("the validation split is empty: no thresholds can be fitted")
  loc, scale, info = pixel_normalisation(res["maps"], cls, len(class_names))
  z = thresholds.normalise(scores, cls, loc, scale)
  zmaps = thresholds.normalise_maps(res["maps"], cls, loc, scale)
  stats = {}
  for what, values in (("image", z), ("pixel", zmaps)):
    mean, std = _mean_std(values)
    # pixels: mean + 3 std of each class's own pixels, which normalised is 3 for every class
    statistic = N_STD if what == "pixel" else mean + N_STD * std
    sample = values.reshape(-1)[threshold_fit._subsample(values.size, thresholds.MAX_PIXELS)]
    placed = threshold_fit.separating_threshold(sample, statistic)
    stats[what] = {
        "pooled_mean": mean,
        "pooled_std": std,
        "statistic": statistic,
        "threshold": placed,
        "flagged_fraction": float(np.mean(sample >= placed)),
        "values": int(values.size),
    }
  del zmaps
  return {
      "format_version": thresholds.FORMAT_VERSION,
      "class_names": list(class_names),
      "image_threshold": stats["image"]["threshold"],
      "pixel_threshold": stats["pixel"]["threshold"],
      "rules": {
          "image": RULE,
          "pixel": RULE,
          "source": RULE_SOURCE,
          "pixel_rule": "per class: mean + 3 std of its validation pixels (z >= 3)",
          "image_rule": "mean + 3 std of the validation images' normalised scores, pooled",
          "decision": "anomalous where normalised value >= threshold",
          "placement": "the statistic moved between validation values: the float32 midway "
          "between the lowest value flagged and the highest one not flagged",
      },
      "calibration_f1": {"image": float("nan"), "pixel": float("nan")},
      "normalisation": {
          "definition": "z = (s - loc[c]) / scale[c], c = matched class; loc: mean, scale: "
          "standard deviation of every pixel of the validation images matched to c (image "
          "scores use the same loc, scale)",
          "loc": loc.tolist(),
          "scale": scale.tolist(),
          **info,
      },
      "split": {
          "definition": "the validation split (normal images only); the test split is never "
          "used for thresholds",
          "validation_images": int(scores.size),
      },
      "validation": stats,
  }


def summary(d: dict) -> str:
  """One line for the log."""
  v = d["validation"]
  return (
      f"thresholds (MVTec AD 2: mean + 3 std of {d['split']['validation_images']} validation "
      f"images; z per class by their pixels' mean and std): image {d['image_threshold']:.3f} "
      f"(flags {100 * v['image']['flagged_fraction']:.1f}% of them), pixel "
      f"{d['pixel_threshold']:.3f} (flags {100 * v['pixel']['flagged_fraction']:.2f}% of their "
      f"pixels)"
  )


def is_validation_fit(d: dict) -> bool:
  """Whether a thresholds dict was fitted on the validation split by `fit_validation`."""
  rules = d.get("rules") if isinstance(d, dict) else None
  return isinstance(rules, dict) and rules.get("pixel") == RULE and rules.get("image") == RULE


# ----------------------------------------------------------------------------- SegF1


def segf1_columns(res: dict, class_names: Sequence[str], thr: thresholds.Thresholds) -> dict:
  """Per class (true class): ``seg_f1`` (`metrics.seg_f1` of the normalised maps at the
  pixel threshold, pooled over the class's images; NaN where masks are missing) and ``i_f1``
  (F1 of normalised score >= image threshold against is_anomaly; NaN where undefined)."""
  label = np.asarray(res["label"])
  is_anomaly = np.asarray(res["is_anomaly"]).astype(bool)
  has_mask = np.asarray(res.get("has_mask", np.ones(len(label))), bool)
  z = thresholds.normalise(res["scores"], res["cls"], thr.loc, thr.scale)
  out = {}
  for k, name in enumerate(class_names):
    sel = np.flatnonzero(label == k)
    if not sel.size:
      continue
    seg = float("nan")
    if has_mask[sel].all():
      zmaps = thresholds.normalise_maps(
          np.asarray(res["maps"])[sel], np.asarray(res["cls"])[sel], thr.loc, thr.scale
      )
      seg = metrics_lib.seg_f1(np.asarray(res["mask"])[sel], zmaps, thr.pixel_threshold)
    image = threshold_fit.prf(z[sel] >= thr.image_threshold, is_anomaly[sel])
    out[name] = {"seg_f1": seg, "i_f1": image["f1"]}
  return out


def with_columns(table: dict, columns: dict) -> dict:
  """The summarised `table` with `columns` added to its class rows, its mean row recomputed."""
  rows = {c: dict(r) for c, r in table.items() if c != metrics_lib.MEAN_ROW}
  for c, extra in columns.items():
    rows.setdefault(c, {}).update(extra)
  return metrics_lib.summarise(rows)


@dataclasses.dataclass
class Evaluation:
  """What MVTec AD 2 adds to an evaluation: its thresholds (thresholds.json's content) and
  the per-class columns."""

  thresholds: dict
  columns: dict

  def extra(self) -> dict:
    """For the results files: the thresholds and how SegF1 was computed."""
    v = self.thresholds["validation"]
    return {
        "mvtec_ad2": {
            "thresholds": {
                "image": self.thresholds["image_threshold"],
                "pixel": self.thresholds["pixel_threshold"],
                "rule": RULE,
                "source": RULE_SOURCE,
                "validation_images": self.thresholds["split"]["validation_images"],
                "validation_pixels_flagged": v["pixel"]["flagged_fraction"],
            },
            "seg_f1": "F1 of (normalised map >= pixel threshold) against the masks, pixels "
            "pooled over each class's test_public images, on the preprocessed crop",
            "i_f1": "F1 of (normalised score >= image threshold) against is_anomaly",
        }
    }


_PER_IMAGE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _per_image(scorer: scoring.Scorer) -> scoring.Scorer:
  """`scorer.per_image()`, made once per scorer (its predict step compiled once, not at every
  evaluation of a run that matches by batch), holding the scorer's current state."""
  other = _PER_IMAGE.get(scorer)
  if other is None:
    other = scorer.per_image()
    if other is scorer:
      return scorer
    _PER_IMAGE[scorer] = other
  other.svars, other.model_step = scorer.svars, scorer.model_step
  return other


def fit_on_validation(scorer: scoring.Scorer, dataset) -> dict:
  """The thresholds of `scorer`'s model fitted on the dataset's validation split, scored per
  image (`fit_validation`), with the step, score mode and matching recorded."""
  per_image = _per_image(scorer)
  d = fit_validation(per_image.predict_dataset(dataset.validation), dataset.class_names)
  d.update(
      step=per_image.model_step,
      score_mode=per_image.spec.config.model.score_mode,
      matching="per_image",
  )
  return d


def evaluate(scorer: scoring.Scorer, dataset, table: dict, res: dict) -> tuple[dict, Evaluation]:
  """MVTec AD 2's part of an evaluation (`scoring/evaluate.py` calls it for a dataset with a
  validation split): the thresholds fitted on the validation split (`fit_on_validation`),
  then SegF1 and I-F1 of the test split at them added to `table`. res: the evaluation's
  scores of the test split (reused when `scorer` matches per image)."""
  d = fit_on_validation(scorer, dataset)
  per_image = _per_image(scorer)
  test = res if per_image is scorer else per_image.predict_dataset(dataset.test)
  columns = segf1_columns(test, dataset.class_names, thresholds.Thresholds.from_dict(d))
  print(summary(d), flush=True)
  return with_columns(table, columns), Evaluation(d, columns)


def write_thresholds(
    d: dict, workdir: str, run_id: str | None = None, member: str | None = None
) -> dict:
  """Writes validation thresholds (`fit_on_validation`; an `Evaluation`'s) to
  <workdir>/thresholds.json (process 0), recording the run (and population member) they
  belong to -> what was written."""
  import jax  # here only: the thresholds and the writer above need no backend

  d = dict(d, run_id=run_id)
  if member is not None:
    d["member"] = member
  if jax.process_index() == 0:
    thresholds.save(d, thresholds.path(workdir))
  print(f"thresholds -> {thresholds.path(workdir)}", flush=True)
  return d
