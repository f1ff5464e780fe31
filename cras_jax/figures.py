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
  L2-normalised, exactly the vector global matching compares (SPEC 5); the centres are
  treated the same way. t-SNE (scikit-learn, Euclidean distance between the normalised
  vectors, i.e. a monotone function of the cosine similarity matching uses) embeds the N test
  images and K centres together. Above ``max_values`` values in all (N * HW * D, default
  2^28 = 1 GiB of float32) each patch vector is first projected to fewer dimensions with a
  fixed Gaussian matrix (inner products preserved in expectation); the JSON says so.
* Wrong matches: test images whose predicted class (the ``cls`` of scoring, i.e. the centre
  chosen by global matching in the run's matching mode) differs from the true class.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

CELL_PX = 160      # one image cell of the grid
LEFT_PX = 40       # row labels
TOP_PX = 50        # column titles
ROWS = ("image", "ground truth", "anomaly map")


# ----------------------------------------------------------------------------- features

def make_sample_step(pieces, projection=None):
  """The predict step plus "sample": the L2-normalised flattened u [B, HW*d] (after the
  [D, d] `projection` when given), from the same backbone pass."""
  import jax
  import jax.numpy as jnp
  from cras_jax import model

  def step(state, images):
    t = pieces.features(state.backbone, images)
    out = model.score_features(state.params, state.batch_stats, t, state.centres, pieces.grid,
                               (pieces.image_size, pieces.image_size), pieces.heads)
    u = model.adapt(state.params, t, pieces.heads).astype(jnp.float32)
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


def score_with_features(run, source, batch_size: int, projection=None) -> dict:
  """`train.predict_dataset` of `source` with the normalised sample-level features of every
  example in "sample" [N, HW*d] float32 (one pass over the split)."""
  from cras_jax import train
  step = run.devices.jit_predict(make_sample_step(run.pieces, projection))
  res = train.predict_dataset(run.state, run.pieces, run.devices, source, batch_size, step,
                              extra_outputs=("sample",))
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
  from sklearn.manifold import TSNE
  x = np.asarray(features, np.float32)
  m = len(x)
  if m < 3:  # nothing to embed: t-SNE needs perplexity < M
    return np.zeros((m, 2), np.float32) + np.arange(m, dtype=np.float32)[:, None]
  perplexity = float(min(30.0, max(1.0, (m - 1) / 3.0)))
  tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
              random_state=seed, method="exact" if m <= 200 else "barnes_hut")
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
    per_class[c] = {"wrong": int(wrong[sel].sum()), "images": n,
                    "rate": float(wrong[sel].mean()) if n else math.nan}
  confusion = {c: {d: int(np.sum((labels == k) & (matched == j)))
                   for j, d in enumerate(class_names)} for k, c in enumerate(class_names)}
  out = {"total": {"wrong": int(wrong.sum()), "images": int(len(labels)),
                   "rate": float(wrong.mean()) if len(labels) else math.nan},
         "per_class": per_class, "confusion": confusion}
  if names is not None:
    out["wrong_images"] = [{"name": str(names[i]), "class": class_names[labels[i]],
                            "matched_class": class_names[matched[i]]}
                           for i in np.flatnonzero(wrong)]
  return out


def wrong_matches_markdown(w: dict) -> str:
  lines = ["| class | wrongly matched | images | rate (%) |", "|---|---:|---:|---:|"]
  for c, r in [*w["per_class"].items(), ("total", w["total"])]:
    rate = "-" if math.isnan(r["rate"]) else f"{100 * r['rate']:.1f}"
    lines.append(f"| {c} | {r['wrong']} | {r['images']} | {rate} |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- grid (Fig. 6)

def defect_type(name: str) -> str:
  """<class>/test/<defect type>/<file> -> the defect type."""
  parts = str(name).replace("\\", "/").split("/")
  return parts[-2] if len(parts) >= 2 else "defect"


def choose_defective(res: dict, class_names, classes, per_class: int) -> list[int]:
  """Up to `per_class` defective test images of each class, cycling through its defect
  types (in name order), in class order."""
  chosen = []
  for c in classes:
    k = list(class_names).index(c)
    idx = [i for i in np.flatnonzero((res["label"] == k) & (res["is_anomaly"] == 1))]
    by_type: dict[str, list[int]] = {}
    for i in sorted(idx, key=lambda i: str(res["name"][i])):
      by_type.setdefault(defect_type(res["name"][i]), []).append(i)
    queues = [by_type[t] for t in sorted(by_type)]
    picked = []
    while len(picked) < per_class and any(queues):
      for q in queues:
        if q and len(picked) < per_class:
          picked.append(q.pop(0))
    chosen += picked
  return chosen


def grid_size(columns: int) -> tuple[int, int]:
  """(width, height) in pixels of a qualitative grid with `columns` images."""
  return LEFT_PX + columns * CELL_PX, TOP_PX + len(ROWS) * CELL_PX


def qualitative_grid(res: dict, class_names, indices, path: str, dpi: int = 100) -> str:
  """image | ground truth | heatmap overlay, one column per index, one PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  if not len(indices):
    raise ValueError("no defective test images to show")
  w, h = grid_size(len(indices))
  fig = plt.figure(figsize=(w / dpi, h / dpi), dpi=dpi)
  ranges = {}
  for k in {int(res["label"][i]) for i in indices}:
    maps = res["maps"][res["label"] == k]
    ranges[k] = (float(maps.min()), float(maps.max()))
  pad = 3 / CELL_PX
  for col, i in enumerate(indices):
    k = int(res["label"][i])
    lo, hi = ranges[k]
    for row in range(len(ROWS)):
      x0 = (LEFT_PX + col * CELL_PX) / w
      y0 = 1 - (TOP_PX + (row + 1) * CELL_PX) / h
      ax = fig.add_axes([x0 + pad * CELL_PX / w, y0 + pad * CELL_PX / h,
                         (1 - 2 * pad) * CELL_PX / w, (1 - 2 * pad) * CELL_PX / h])
      ax.set_axis_off()
      if row == 0:
        ax.imshow(res["image"][i])
        ax.set_title(f"{class_names[k]}\n{defect_type(res['name'][i])}", fontsize=8, pad=3)
      elif row == 1:
        ax.imshow(res["mask"][i], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
      else:
        ax.imshow(res["image"][i])
        ax.imshow((res["maps"][i] - lo) / max(hi - lo, 1e-12), cmap="jet", alpha=0.5,
                  vmin=0, vmax=1)
        ax.text(0.03, 0.04, f"{res['scores'][i]:.3f}", transform=ax.transAxes, fontsize=7,
                color="white", bbox=dict(facecolor="black", alpha=0.6, pad=1, lw=0))
  for row, label in enumerate(ROWS):
    y = 1 - (TOP_PX + (row + 0.5) * CELL_PX) / h
    fig.text(0.5 * LEFT_PX / w, y, label, rotation=90, ha="center", va="center", fontsize=9)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------- t-SNE (Fig. 7)

def tsne_plot(embedding: np.ndarray, labels, matched, class_names, path: str, title: str,
              dpi: int = 120) -> str:
  """Test images (dots, coloured by true class; wrong matches ringed in red with the
  matched class named) and the K centres (stars) from one embedding [N + K, 2]."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import patheffects
  from matplotlib.lines import Line2D
  k = len(class_names)
  labels, matched = np.asarray(labels), np.asarray(matched)
  pts, cen = embedding[:-k], embedding[-k:]
  cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
  colour = lambda j: cmap(j % cmap.N)
  fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=dpi)
  for j in range(k):
    sel = labels == j
    ax.scatter(pts[sel, 0], pts[sel, 1], s=14, color=colour(j), alpha=0.8, lw=0)
  wrong = labels != matched
  ax.scatter(pts[wrong, 0], pts[wrong, 1], s=70, facecolors="none", edgecolors="red", lw=1.4)
  for i in np.flatnonzero(wrong):
    ax.annotate(f"-> {class_names[matched[i]]}", pts[i], fontsize=6, color="red",
                xytext=(5, -5), textcoords="offset points", va="top", zorder=5,
                path_effects=[patheffects.withStroke(linewidth=2, foreground="white")])
  for j in range(k):
    ax.scatter(cen[j, 0], cen[j, 1], s=260, marker="*", color=colour(j), edgecolors="black",
               lw=1.0, zorder=3)
    ax.annotate(class_names[j], cen[j], fontsize=8, fontweight="bold", xytext=(0, 9),
                textcoords="offset points", ha="center", va="bottom", zorder=4,
                path_effects=[patheffects.withStroke(linewidth=2.5, foreground="white")])
  handles = [Line2D([], [], marker="o", ls="", color=colour(j), label=c)
             for j, c in enumerate(class_names)]
  handles += [Line2D([], [], marker="*", ls="", markersize=12, color="grey", mec="black",
                     label="class centre"),
              Line2D([], [], marker="o", ls="", markersize=8, mfc="none", mec="red",
                     label=f"wrongly matched ({int(wrong.sum())})")]
  ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.8)
  ax.set_title(title, fontsize=9)
  ax.set_xticks([])
  ax.set_yticks([])
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------- all

def make_figures(workdir: str, classes=None, per_class: int = 2, output_dir: str | None = None,
                 seed: int = 0, data_root: str | None = None, batch_size: int | None = None,
                 max_values: int = 2 ** 28) -> dict:
  """Scores the test split of a trained run and writes both figures and tsne.json."""
  import jax
  from cras_jax.robustness import load_run_and_test_data, protocol
  run, dataset = load_run_and_test_data(workdir, data_root)
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
  info = protocol(run, dataset)
  out = {**info, "seed": seed, "test_images": len(res["label"]), "classes": classes,
         "feature": {"vector": "flattened adapted map u, L2-normalised (as global matching)",
                     "dims": int(feats.shape[1]),
                     "projection": None if proj is None else
                     f"per-patch Gaussian projection {d} -> {proj.shape[1]} (seed {seed})"},
         "feature_match_agrees": int(np.sum(feature_match == res["cls"])),
         "wrong_matches": wm, "embedding": {
             "images": [{"name": str(res["name"][i]), "class": names[res["label"][i]],
                         "matched_class": names[res["cls"][i]], "x": float(emb[i, 0]),
                         "y": float(emb[i, 1])} for i in range(len(res["label"]))],
             "centres": [{"class": c, "x": float(emb[len(res['label']) + j, 0]),
                          "y": float(emb[len(res['label']) + j, 1])} for j, c in enumerate(names)]}}
  if jax.process_index() == 0:
    out_dir = output_dir or os.path.join(workdir, "results", "figures")
    os.makedirs(out_dir, exist_ok=True)
    chosen = choose_defective(res, names, classes, per_class)
    grid = qualitative_grid(res, names, chosen, os.path.join(out_dir, "qualitative.png"))
    t = wm["total"]
    title = (f"t-SNE of sample-level features (flattened u) and class centres\n"
             f"{info['protocol']}; {t['wrong']} of {t['images']} test images wrongly matched")
    tsne = tsne_plot(emb, res["label"], res["cls"], names, os.path.join(out_dir, "tsne.png"),
                     title)
    out["files"] = {"qualitative": grid, "tsne": tsne, "json": os.path.join(out_dir, "tsne.json")}
    out["qualitative_images"] = [str(res["name"][i]) for i in chosen]
    with open(out["files"]["json"], "w") as f:
      json.dump(out, f, indent=2)
    print(f"\n{info['protocol']}; {out['test_images']} test images. Wrong global matches "
          f"(matched class != true class, matching: {info['matching']}):\n")
    print(wrong_matches_markdown(wm))
    print("written: " + ", ".join(out["files"].values()), flush=True)
  out["_embedding"] = emb
  out["_features"] = np.concatenate([feats, cfeats])
  out["_res"] = res
  return out


def main(argv=None) -> dict:
  import argparse
  ap = argparse.ArgumentParser(prog="python -m cras_jax.figures", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True, help="a trained run's workdir")
  ap.add_argument("--classes", default="", help="comma-separated classes (default: all)")
  ap.add_argument("--per_class", type=int, default=2,
                  help="defective images per class in the qualitative grid")
  ap.add_argument("--output_dir", default=None, help="default: <workdir>/results/figures")
  ap.add_argument("--seed", type=int, default=0, help="t-SNE seed")
  ap.add_argument("--batch_size", type=int, default=None, help="default: the run's eval batch size")
  ap.add_argument("--data_root", default=None, help="default: the data the run was trained on")
  args = ap.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  classes = [c.strip() for c in args.classes.split(",") if c.strip()]
  return make_figures(args.workdir, classes or None, args.per_class, args.output_dir, args.seed,
                      args.data_root, args.batch_size)


if __name__ == "__main__":
  main()
