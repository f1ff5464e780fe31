"""Figures of a trained run: the paper's Fig. 6 (qualitative grid) and Fig. 7 (t-SNE of
sample-level features with the class centres), plus the count of wrong global matches.

python -m cras_jax.figures --workdir=runs/demo [--classes=chip,gear] [--per_class=2]
    [--output_dir=<workdir>/results/figures] [--seed=0]

Writes <output_dir>/qualitative.png, tsne.png and tsne.json (the wrong-match counts, the
protocol and the embedded points), and prints the wrong-match table.

* Qualitative grid: one column per chosen defective test image (``per_class`` of each chosen
  class, cycling through the class's defect types), rows image | ground truth | anomaly-map
  overlay. Maps are min-max normalised per class over all its test images (as
  ``results/heatmaps``), so columns of one class are comparable.
* Sample-level feature: the adapted map u = A(t) of the image flattened to HW*D values and
  L2-normalised, exactly the vector global matching compares (docs/method.md §5); the centres are
  treated the same way. t-SNE (scikit-learn, Euclidean distance between the normalised
  vectors, i.e. a monotone function of the cosine similarity matching uses) embeds the N test
  images and K centres together. Above ``max_values`` values in all (N * HW * D, default
  2^28 = 1 GiB of float32) each patch vector is first projected to fewer dimensions with a
  fixed Gaussian matrix (inner products preserved in expectation); the JSON says so.
* Wrong matches: test images whose predicted class (the ``cls`` of scoring, i.e. the centre
  chosen by global matching in the run's matching mode) differs from the true class.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from cras_jax.base import compile_cache, fileio, flag_checks, markdown
from cras_jax.base import stop as stop_lib
from cras_jax.engine import steps
from cras_jax.experiments import plots
from cras_jax.runs import trained
from cras_jax.runs import workdir as runs
from cras_jax.scoring import evaluate, scoring

# ----------------------------------------------------------------------------- features


def make_sample_step(spec: steps.ModelSpec, projection=None, axis_name: str | None = None):
  """The predict step plus "sample": the L2-normalised flattened u [B, HW*d] (after the
  [D, d] `projection` when given), from the same backbone pass (`axis_name`: the devices'
  per-device axis, `sharding.Devices.axis_name`)."""
  predict_step = steps.make_predict_step(spec, with_u=True, axis_name=axis_name)

  def step(svars, images):
    out = predict_step(svars, images)
    u = out.pop("u").astype(jnp.float32)
    if projection is not None:
      u = jnp.einsum("bnd,de->bne", u, projection, precision=jax.lax.Precision.HIGHEST)
    v = u.reshape(u.shape[0], -1)
    return {**out, "sample": v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-8)}

  return step


def projection_matrix(num_images: int, num_patches: int, dim: int, max_values: int, seed: int):
  """None when N * HW * D <= max_values, else a [D, d] Gaussian projection (std 1/sqrt(d))."""
  if num_images * num_patches * dim <= max_values:
    return None
  d = max(1, min(dim, max_values // max(num_images * num_patches, 1)))
  rng = np.random.default_rng([int(seed), 7])
  return (rng.standard_normal((dim, d)) / math.sqrt(d)).astype(np.float32)


def score_with_features(run: trained.Run, source, batch_size: int, projection=None) -> dict:
  """`Scorer.predict_dataset` of `source` with the normalised sample-level features of every
  example in "sample" [N, HW*d] float32 (one pass over the split)."""
  scorer = scoring.Scorer(
      run.spec,
      run.devices,
      batch_size,
      make_sample_step(run.spec, projection, run.devices.axis_name),
      state=run.state,
  )
  res = scorer.predict_dataset(source, extra_outputs=("sample",))
  res["sample"] = res["sample"].astype(np.float32)
  return res


def centre_features(centres, projection=None) -> np.ndarray:
  """The class centres [K, HW, D] as the same normalised flattened vectors -> [K, HW*d]."""
  c = np.asarray(centres, np.float32)
  if projection is not None:
    c = c @ projection
  c = c.reshape(c.shape[0], -1)
  return c / np.maximum(np.linalg.norm(c, axis=-1, keepdims=True), 1e-8)


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
  """2-D t-SNE of the rows of `features` (deterministic for a seed). Perplexity
  min(30, (M - 1) / 3), so it stays below the number of points for tiny sets."""
  from sklearn.manifold import TSNE  # here only: a heavy import, for this figure alone

  x = np.asarray(features, np.float32)
  m = len(x)
  if m < 3:  # nothing to embed: t-SNE needs perplexity < M
    return np.zeros((m, 2), np.float32) + np.arange(m, dtype=np.float32)[:, None]
  perplexity = float(min(30.0, max(1.0, (m - 1) / 3.0)))
  tsne = TSNE(
      n_components=2,
      perplexity=perplexity,
      init="pca",
      learning_rate="auto",
      random_state=seed,
      method="exact" if m <= 200 else "barnes_hut",
  )
  return tsne.fit_transform(x).astype(np.float32)


# ----------------------------------------------------------------------------- wrong matches


def wrong_matches(labels, matched, class_names, names=None) -> dict:
  """Counts and rates of images whose matched class differs from the true one."""
  labels, matched = np.asarray(labels), np.asarray(matched)
  wrong = labels != matched
  per_class = {}
  for k, c in enumerate(class_names):
    sel = labels == k
    n = int(sel.sum())
    per_class[c] = {
        "wrong": int(wrong[sel].sum()),
        "images": n,
        "rate": float(wrong[sel].mean()) if n else math.nan,
    }
  confusion = {
      c: {d: int(np.sum((labels == k) & (matched == j))) for j, d in enumerate(class_names)}
      for k, c in enumerate(class_names)
  }
  out = {
      "total": {
          "wrong": int(wrong.sum()),
          "images": int(len(labels)),
          "rate": float(wrong.mean()) if len(labels) else math.nan,
      },
      "per_class": per_class,
      "confusion": confusion,
  }
  if names is not None:
    out["wrong_images"] = [
        {
            "name": str(names[i]),
            "class": class_names[labels[i]],
            "matched_class": class_names[matched[i]],
        }
        for i in np.flatnonzero(wrong)
    ]
  return out


def wrong_matches_markdown(w: dict) -> str:
  lines = ["| class | wrongly matched | images | rate (%) |", "|---|---:|---:|---:|"]
  for c, r in [*w["per_class"].items(), ("total", w["total"])]:
    rate = "-" if math.isnan(r["rate"]) else f"{100 * r['rate']:.1f}"
    lines.append(markdown.row([c, r["wrong"], r["images"], rate]))
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- grid (Fig. 6)


def choose_defective(res: dict, class_names, classes, per_class: int) -> list[int]:
  """Up to `per_class` defective test images of each class, cycling through its defect
  types (in name order), in class order."""
  chosen = []
  for c in classes:
    k = list(class_names).index(c)
    idx = [i for i in np.flatnonzero((res["label"] == k) & (res["is_anomaly"] == 1))]
    by_type: dict[str, list[int]] = {}
    for i in sorted(idx, key=lambda i: str(res["name"][i])):
      by_type.setdefault(plots.defect_type(res["name"][i]), []).append(i)
    queues = [by_type[t] for t in sorted(by_type)]
    picked = []
    while len(picked) < per_class and any(queues):
      for q in queues:
        if q and len(picked) < per_class:
          picked.append(q.pop(0))
    chosen += picked
  return chosen


def tsne_record(info, seed, classes, names, res, feats, proj, d, feature_match, wm, emb) -> dict:
  """What tsne.json holds: the protocol, the feature, the wrong matches and the points."""
  return {
      **info,
      "seed": seed,
      "test_images": len(res["label"]),
      "classes": classes,
      "feature": {
          "vector": "flattened adapted map u, L2-normalised (as global matching)",
          "dims": int(feats.shape[1]),
          "projection": None
          if proj is None
          else f"per-patch Gaussian projection {d} -> {proj.shape[1]} (seed {seed})",
      },
      "feature_match_agrees": int(np.sum(feature_match == res["cls"])),
      "wrong_matches": wm,
      "embedding": {
          "images": [
              {
                  "name": str(res["name"][i]),
                  "class": names[res["label"][i]],
                  "matched_class": names[res["cls"][i]],
                  "x": float(emb[i, 0]),
                  "y": float(emb[i, 1]),
              }
              for i in range(len(res["label"]))
          ],
          "centres": [
              {
                  "class": c,
                  "x": float(emb[len(res["label"]) + j, 0]),
                  "y": float(emb[len(res["label"]) + j, 1]),
              }
              for j, c in enumerate(names)
          ],
      },
  }


def write_figures(out: dict, out_dir: str, res, names, classes, per_class: int, emb) -> None:
  """qualitative.png, tsne.png and tsne.json into out_dir (their paths and the grid's images
  added to `out`); prints the wrong-match table."""
  os.makedirs(out_dir, exist_ok=True)
  chosen = choose_defective(res, names, classes, per_class)
  grid = plots.qualitative_grid(res, names, chosen, os.path.join(out_dir, "qualitative.png"))
  wm = out["wrong_matches"]
  t = wm["total"]
  title = (
      f"t-SNE of sample-level features (flattened u) and class centres\n"
      f"{out['protocol']}; {t['wrong']} of {t['images']} test images wrongly matched"
  )
  tsne = plots.tsne_plot(
      emb, res["label"], res["cls"], names, os.path.join(out_dir, "tsne.png"), title
  )
  out["files"] = {"qualitative": grid, "tsne": tsne, "json": os.path.join(out_dir, "tsne.json")}
  out["qualitative_images"] = [str(res["name"][i]) for i in chosen]
  fileio.atomic_write_json(out["files"]["json"], out)
  print(
      f"\n{out['protocol']}; {out['test_images']} test images. Wrong global matches "
      f"(matched class != true class, matching: {out['matching']}):\n"
  )
  print(wrong_matches_markdown(wm))
  print("written: " + ", ".join(out["files"].values()), flush=True)


def make_figures(
    workdir: str,
    classes=None,
    per_class: int = 2,
    output_dir: str | None = None,
    seed: int = 0,
    data_root: str | None = None,
    batch_size: int | None = None,
    max_values: int = 2**28,
    member: str | None = None,
) -> dict:
  """Scores the test split of a trained run (a population's `member`) and writes both figures
  and tsne.json."""
  run = trained.load_run(workdir, member=member)
  dataset = trained.load_run_dataset(run, workdir, data_root)
  note = runs.test_data_note(run.meta.get("data"), dataset.identity)
  if note:
    print(f"note: {note}", flush=True)
  names = list(dataset.class_names)
  classes = list(classes) if classes else names
  unknown = [c for c in classes if c not in names]
  if unknown:
    raise ValueError(f"unknown classes {unknown}; the run's classes: {names}")
  bs = batch_size or run.config.eval.batch_size
  k, hw, d = run.state.centres.shape
  proj = projection_matrix(len(dataset.test), hw, d, max_values, seed)
  res = score_with_features(run, dataset.test, bs, proj)
  feats = res.pop("sample")
  cfeats = centre_features(jax.device_get(run.state.centres), proj)
  # Global matching recomputed from the plotted vectors (equals `cls` for per-image matching
  # without projection: a check that the picture shows what the model compared).
  feature_match = np.argmax(feats @ cfeats.T, axis=1)
  emb = tsne_embedding(np.concatenate([feats, cfeats]), seed)
  wm = wrong_matches(res["label"], res["cls"], names, res["name"])
  info = evaluate.checkpoint_protocol(run, dataset)
  out = tsne_record(info, seed, classes, names, res, feats, proj, d, feature_match, wm, emb)
  if note:
    out["data_note"] = note
  if jax.process_index() == 0:
    out_dir = output_dir or os.path.join(trained.results_dir(run, workdir), "figures")
    write_figures(out, out_dir, res, names, classes, per_class, emb)
  out["_embedding"] = emb
  out["_features"] = np.concatenate([feats, cfeats])
  out["_res"] = res
  return out


# ----------------------------------------------------------------------------- command line


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags (defined when it runs as a command)."""
  fv = flag_values
  flag_checks.define_trained_run_flags(fv)
  flags.DEFINE_list(
      "classes", [], "Classes of the qualitative grid (default: all).", flag_values=fv
  )
  flags.DEFINE_integer(
      "per_class", 2, "Defective images per class in the qualitative grid.", flag_values=fv
  )
  flags.DEFINE_string("output_dir", None, "Default: <workdir>/results/figures.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "t-SNE seed.", flag_values=fv)
  flags.DEFINE_integer("batch_size", None, "Default: the run's eval batch size.", flag_values=fv)
  flags.DEFINE_string(
      "data_root", None, "Default: the data the run was trained on.", flag_values=fv
  )
  flag_checks.bounded(fv, "per_class", 1, 100)
  flag_checks.bounded(fv, "seed", 0)
  flag_checks.bounded(fv, "batch_size", 1, 65536)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  fv = flag_values
  logging.set_verbosity(logging.WARNING)
  compile_cache.setup()  # before anything compiles: later starts reuse the steps
  classes = [c.strip() for c in fv.classes if c.strip()]
  with stop_lib.StopRequest("this batch"):  # SIGINT/SIGTERM: exit 130/143, nothing written
    make_figures(
        fv.workdir,
        classes or None,
        fv.per_class,
        fv.output_dir,
        fv.seed,
        fv.data_root,
        fv.batch_size,
        member=fv.member,
    )
  return 0
