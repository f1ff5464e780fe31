"""Figures of a trained run (Fig. 6 grid, Fig. 7 t-SNE) and the wrong-match count, on the
tiny trained run."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from cras_jax.experiments import figures


@pytest.fixture(scope="module")
def figs(tiny_run, tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("figures")
  out = figures.make_figures(
      str(tiny_run["workdir"]),
      classes=["chip", "gear"],
      per_class=1,
      output_dir=str(out_dir),
      seed=0,
  )
  return out, out_dir


def test_qualitative_grid_size(figs):
  out, out_dir = figs
  path = os.path.join(out_dir, "qualitative.png")
  assert out["files"]["qualitative"] == path
  # 2 classes x 1 image: 2 columns of 160 px after 40 px of row labels; 3 rows of 160 px
  # under 50 px of titles.
  assert len(out["qualitative_images"]) == 2
  assert [n.split("/")[0] for n in out["qualitative_images"]] == ["chip", "gear"]
  assert all("/good/" not in n for n in out["qualitative_images"])
  with Image.open(path) as im:
    assert im.size == (40 + 2 * 160, 50 + 3 * 160)


def test_wrong_match_count_equals_scores_csv(figs, tiny_run):
  out, out_dir = figs
  with open(os.path.join(tiny_run["workdir"], "results", "scores_final.csv")) as f:
    rows = list(csv.DictReader(f))
  wrong = [r for r in rows if r["class"] != r["matched_class"]]
  with open(os.path.join(out_dir, "tsne.json")) as f:
    report = json.load(f)
  wm = report["wrong_matches"]
  assert wm["total"]["images"] == len(rows)
  assert wm["total"]["wrong"] == len(wrong)
  assert wm["total"]["rate"] == pytest.approx(len(wrong) / len(rows))
  for c, r in wm["per_class"].items():
    assert r["wrong"] == sum(w["class"] == c for w in wrong)
    assert r["images"] == sum(row["class"] == c for row in rows)
  assert sorted(w["name"] for w in wm["wrong_images"]) == sorted(w["name"] for w in wrong)
  # The plotted vectors are the ones global matching compares.
  assert report["feature_match_agrees"] == len(rows)
  assert report["feature"]["projection"] is None


def test_tsne_has_all_points_and_is_deterministic(figs):
  out, out_dir = figs
  n, k = out["test_images"], 4
  emb, feats = out["_embedding"], out["_features"]
  assert emb.shape == (n + k, 2) and feats.shape[0] == n + k
  np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
  with open(os.path.join(out_dir, "tsne.json")) as f:
    report = json.load(f)
  assert len(report["embedding"]["images"]) == n and len(report["embedding"]["centres"]) == k
  np.testing.assert_array_equal(figures.tsne_embedding(feats, seed=0), emb)
  assert not np.array_equal(figures.tsne_embedding(feats, seed=1), emb)
  assert os.path.getsize(os.path.join(out_dir, "tsne.png")) > 0


def test_tsne_handles_tiny_sets_and_projection():
  rng = np.random.default_rng(0)
  for m in (1, 2, 3, 5):
    assert figures.tsne_embedding(rng.normal(size=(m, 8)), seed=0).shape == (m, 2)
  assert figures.projection_matrix(10, 4, 8, max_values=320, seed=0) is None
  p = figures.projection_matrix(10, 4, 8, max_values=200, seed=0)
  assert p.shape == (8, 5)
  c = figures.centre_features(rng.normal(size=(3, 4, 8)), p)
  assert c.shape == (3, 20)
  np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, rtol=1e-5)


def test_wrong_matches_counts():
  w = figures.wrong_matches([0, 0, 1, 1, 1], [0, 1, 1, 0, 0], ["a", "b"], list("vwxyz"))
  assert w["total"] == {"wrong": 3, "images": 5, "rate": 0.6}
  assert w["per_class"]["a"]["wrong"] == 1 and w["per_class"]["b"]["wrong"] == 2
  assert w["confusion"] == {"a": {"a": 1, "b": 1}, "b": {"a": 2, "b": 1}}
  assert [x["name"] for x in w["wrong_images"]] == ["w", "y", "z"]


def test_a_stop_request_ends_figures_with_143_and_writes_nothing(tiny_run, tmp_path, monkeypatch):
  import signal

  from absl import flags

  from cras_jax.base import stop

  monkeypatch.setattr(stop, "requested", lambda: signal.SIGTERM)  # as if SIGTERM had come
  fv = flags.FlagValues()
  figures.define_flags(fv)
  fv(["figures", f"--workdir={tiny_run['workdir']}", f"--output_dir={tmp_path / 'out'}"])
  with pytest.raises(SystemExit) as e:
    figures.main(["figures"], fv)
  assert e.value.code == 128 + signal.SIGTERM
  assert not (tmp_path / "out").exists()
