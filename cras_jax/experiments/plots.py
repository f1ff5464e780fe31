"""Drawing the figures of a trained run (`cras_jax.figures` gathers what they show): the
qualitative grid of the paper's Fig. 6 and the t-SNE plot of its Fig. 7."""

from __future__ import annotations

import os

import numpy as np

from cras_jax.base import fileio
from cras_jax.results import render

CELL_PX = 160  # one image cell of the grid
LEFT_PX = 40  # row labels
TOP_PX = 50  # column titles
ROWS = ("image", "ground truth", "anomaly map")


def defect_type(name: str) -> str:
  """<class>/test/<defect type>/<file> -> the defect type."""
  parts = str(name).replace("\\", "/").split("/")
  return parts[-2] if len(parts) >= 2 else "defect"


def grid_size(columns: int) -> tuple[int, int]:
  """(width, height) in pixels of a qualitative grid with `columns` images."""
  return LEFT_PX + columns * CELL_PX, TOP_PX + len(ROWS) * CELL_PX


def qualitative_grid(res: dict, class_names, indices, path: str, dpi: int = 100) -> str:
  """image | ground truth | heatmap overlay, one column per index, one PNG."""
  import matplotlib  # here only (and in tsne_plot): plotting, for the figures alone

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if not len(indices):
    raise ValueError("no defective test images to show")
  w, h = grid_size(len(indices))
  fig = plt.figure(figsize=(w / dpi, h / dpi), dpi=dpi)
  ranges = {k: render.class_range(res, k) for k in {int(res["label"][i]) for i in indices}}
  pad = 3 / CELL_PX
  for col, i in enumerate(indices):
    k = int(res["label"][i])
    lo, hi = ranges[k]
    for row in range(len(ROWS)):
      x0 = (LEFT_PX + col * CELL_PX) / w
      y0 = 1 - (TOP_PX + (row + 1) * CELL_PX) / h
      ax = fig.add_axes(
          [
              x0 + pad * CELL_PX / w,
              y0 + pad * CELL_PX / h,
              (1 - 2 * pad) * CELL_PX / w,
              (1 - 2 * pad) * CELL_PX / h,
          ]
      )
      ax.set_axis_off()
      if row == 0:
        ax.imshow(res["image"][i])
        ax.set_title(f"{class_names[k]}\n{defect_type(res['name'][i])}", fontsize=8, pad=3)
      elif row == 1:
        render.draw_mask(ax, res["mask"][i], interpolation="nearest")
      else:
        render.draw_overlay(ax, res["image"][i], res["maps"][i], lo, hi)
        ax.text(
            0.03,
            0.04,
            f"{res['scores'][i]:.3f}",
            transform=ax.transAxes,
            fontsize=7,
            color="white",
            bbox=dict(facecolor="black", alpha=0.6, pad=1, lw=0),
        )
  for row, label in enumerate(ROWS):
    y = 1 - (TOP_PX + (row + 0.5) * CELL_PX) / h
    fig.text(0.5 * LEFT_PX / w, y, label, rotation=90, ha="center", va="center", fontsize=9)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with fileio.atomic_write(path, "wb") as f:
    fig.savefig(f, format="png", dpi=dpi)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------- t-SNE (Fig. 7)


def _tsne_legend(class_names, colour, n_wrong: int) -> list:
  """The t-SNE plot's legend: a dot per class, the centre star and the wrong-match ring."""
  from matplotlib.lines import Line2D  # here only: plotting, for the figures alone

  handles = [
      Line2D([], [], marker="o", ls="", color=colour(j), label=c) for j, c in enumerate(class_names)
  ]
  handles += [
      Line2D(
          [], [], marker="*", ls="", markersize=12, color="grey", mec="black", label="class centre"
      ),
      Line2D(
          [],
          [],
          marker="o",
          ls="",
          markersize=8,
          mfc="none",
          mec="red",
          label=f"wrongly matched ({n_wrong})",
      ),
  ]
  return handles


def tsne_plot(
    embedding: np.ndarray, labels, matched, class_names, path: str, title: str, dpi: int = 120
) -> str:
  """Test images (dots, coloured by true class; wrong matches ringed in red with the
  matched class named) and the K centres (stars) from one embedding [N + K, 2]."""
  import matplotlib  # here only (and in qualitative_grid): plotting, for the figures alone

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import patheffects

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
    ax.annotate(
        f"-> {class_names[matched[i]]}",
        pts[i],
        fontsize=6,
        color="red",
        xytext=(5, -5),
        textcoords="offset points",
        va="top",
        zorder=5,
        path_effects=[patheffects.withStroke(linewidth=2, foreground="white")],
    )
  for j in range(k):
    ax.scatter(
        cen[j, 0],
        cen[j, 1],
        s=260,
        marker="*",
        color=colour(j),
        edgecolors="black",
        lw=1.0,
        zorder=3,
    )
    ax.annotate(
        class_names[j],
        cen[j],
        fontsize=8,
        fontweight="bold",
        xytext=(0, 9),
        textcoords="offset points",
        ha="center",
        va="bottom",
        zorder=4,
        path_effects=[patheffects.withStroke(linewidth=2.5, foreground="white")],
    )
  ax.legend(
      handles=_tsne_legend(class_names, colour, int(wrong.sum())),
      fontsize=7,
      loc="best",
      framealpha=0.8,
  )
  ax.set_title(title, fontsize=9)
  ax.set_xticks([])
  ax.set_yticks([])
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with fileio.atomic_write(path, "wb") as f:
    fig.savefig(f, format="png", dpi=dpi)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------- all
