"""One model across datasets (data/combined.py): `data.sources` read, the sources' classes
prefixed with their dataset and prepared as one dataset, results per dataset as the means of
their classes; bad sources named in one message."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cras_jax import data as data_lib
from cras_jax.config import check as config_check
from cras_jax.configs import combined as combined_config
from cras_jax.configs import demo
from cras_jax.data import combined, synthetic
from cras_jax.method import metrics
from cras_jax.runs import named_inputs, specs
from tests.conftest import ROOT, TINY
from tests.fixture_server import closed_port_url

SMALL = {"image_size": 32, "n_train": 2, "n_test_good": 1, "n_test_defect_per_type": 1}


def test_sources_are_names_or_name_and_root():
  assert combined.parse(["mvtec_ad:/d/m", "visa", "folder:/x"]) == [
      ("mvtec", "/d/m"),  # an alias is the dataset's own name (the prefix)
      ("visa", ""),
      ("folder", "/x"),
  ]


@pytest.mark.parametrize(
    "sources,why",
    [
        ((), "list the datasets to combine"),
        (("nope",), "no dataset named 'nope'"),
        (("real_iad:/r",), "real_iad has a layout of its own"),
        (("folder",), "folder needs its root"),
        (("visa", "visa:/v"), "visa listed more than once"),
    ],
)
def test_bad_sources_are_named(sources, why):
  with pytest.raises(combined.SourcesError, match=why):
    combined.parse(sources)


def test_the_config_check_names_bad_sources_and_sources_without_combined(tmp_path):
  cfg = combined_config.get_config()
  cfg.data.sources = ("mvtec", f"folder:{tmp_path / 'missing'}")
  problems = config_check.problems_of(cfg)  # mvtec: read by name from data.data_dir
  assert problems == [f"data.sources: folder:{tmp_path / 'missing'}: no such directory"]
  cfg.setting = "single_class"
  assert any(
      "setting=single_class with data.name=combined" in p for p in config_check.problems_of(cfg)
  )
  other = demo.get_config()
  other.data.sources = ("visa",)
  assert any("read only with data.name=combined" in p for p in config_check.problems_of(other))


def _spec(tmp_path, sources, classes=()):
  cfg = demo.get_config()
  cfg.data.name, cfg.data.sources, cfg.data.classes = "combined", tuple(sources), tuple(classes)
  cfg.data.resize = cfg.data.crop = 32
  cfg.data.cache_dir = str(tmp_path / "cache")
  for k, v in SMALL.items():
    cfg.data.synthetic[k] = v
  return specs.data_spec(cfg)


def test_two_datasets_read_as_one_with_prefixed_classes(tmp_path):
  other = tmp_path / "other"
  synthetic.generate(str(other), seed=1, **SMALL)
  spec = _spec(tmp_path, ["synthetic", f"folder:{other}"])
  ds = data_lib.load(spec, str(tmp_path / "work"))
  names = ["chip", "fabric", "gear", "granite"]
  assert ds.class_names == [f"synthetic.{c}" for c in names] + [f"folder.{c}" for c in names]
  assert len(ds.train) == 8 * 2
  labels = data_lib.class_indices(ds.train)
  assert sorted(set(labels.tolist())) == list(range(8))
  # the images are the sources' own: the first of folder.chip is other/chip's first
  first = int(np.flatnonzero(labels == 4)[0])
  batch = data_lib.get_batch(ds.train, [first], ("image", "name"))
  assert batch["name"][0].startswith("folder.chip/train/good/")
  # a second load reuses the links and the prepared copy; a choice of classes picks them
  again = data_lib.load(
      _spec(tmp_path, ["synthetic", f"folder:{other}"], ["folder.gear"]), str(tmp_path / "work")
  )
  assert again.class_names == ["folder.gear"]
  with pytest.raises(combined.SourcesError, match="folder.nope not among the combined classes"):
    data_lib.load(
        _spec(tmp_path, ["synthetic", f"folder:{other}"], ["folder.nope"]), str(tmp_path / "work")
    )


def test_a_source_without_class_folders_is_one_message_and_exit_2(tmp_path):
  (tmp_path / "empty").mkdir()
  out = subprocess.run(
      [
          sys.executable, "-m", "cras_jax.main", "--config=configs/demo.py",
          f"--workdir={tmp_path / 'w'}", "--config.data.name=combined",
          f"--config.data.sources=('folder:{tmp_path / 'empty'}',)",
      ],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert out.returncode == 2, out.stderr[-2000:]
  assert "holds no class folders" in out.stderr and "Traceback" not in out.stderr


def test_per_dataset_rows_are_the_means_of_their_classes():
  table = metrics.summarise(
      {
          "a.x": {"i_auroc": 0.9, "p_auroc": 0.8},
          "a.y": {"i_auroc": 0.7, "p_auroc": float("nan")},
          "b.x": {"i_auroc": 0.5, "p_auroc": 0.6},
      }
  )
  got = metrics.group_means(table, combined.dataset_of)
  assert list(got) == ["a", "b", "mean"]
  assert got["a"]["i_auroc"] == pytest.approx(0.8) and got["a"]["p_auroc"] == pytest.approx(0.8)
  assert got["mean"]["i_auroc"] == pytest.approx((0.8 + 0.5) / 2)  # each dataset counts once


@pytest.mark.slow
def test_the_combined_config_trains_and_reports_per_dataset(tmp_path):
  """`python -m cras_jax.main` on two synthetic datasets at the tiny size: one model, its
  table per class and per dataset."""
  other = tmp_path / "other"
  synthetic.generate(str(other), seed=1, image_size=64, n_train=6, n_test_good=2,
                     n_test_defect_per_type=1)  # fmt: skip
  work = tmp_path / "run"
  out = subprocess.run(
      [
          sys.executable, "-m", "cras_jax.main", "--config=configs/demo.py",
          f"--workdir={work}", "--config.data.name=combined",
          f"--config.data.sources=('synthetic', 'folder:{other}')", *TINY,
          "--config.train.epochs=1",
      ],
      cwd=ROOT, capture_output=True, text=True, timeout=900, env=dict(os.environ),
  )  # fmt: skip
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  record = json.loads((work / "results" / "metrics_final.json").read_text())
  table, by = record["metrics"], record["by_dataset"]
  assert len(table) == 9 and "folder.granite" in table  # 8 classes and the mean
  assert list(by) == ["synthetic", "folder", "mean"]
  for ds in ("synthetic", "folder"):
    want = np.mean([table[c]["i_auroc"] for c in table if c.startswith(ds + ".")])
    assert by[ds]["i_auroc"] == pytest.approx(want)
  md = (work / "results" / "metrics_final.md").read_text()
  assert "per dataset" in md and "| folder |" in md
  assert (work / "results" / "metrics_final_by_dataset.csv").exists()
  assert "per dataset" in out.stdout


def test_a_named_source_that_cannot_be_fetched_is_reported_before_the_workdir_is_made(tmp_path):
  """Offline, `data.sources=("synthetic", "mpdd")` (MPDD fetched by name) stops at the named
  inputs' one message, naming the dataset and where to put it, as a single named dataset
  does: before any data work and before the workdir exists."""
  from cras_jax.training import train  # noqa: PLC0415 - the driver: heavy, this test only

  cfg = combined_config.get_config()
  cfg.data.sources = ("synthetic", "mpdd")
  cfg.model.weights = "random"  # nothing else to fetch
  cfg.data.download_url = closed_port_url("mpdd.tar.gz")
  cfg.cache.dir = str(tmp_path / "cache")
  with pytest.raises(named_inputs.NamedInputsError) as e:
    train.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert "mpdd" in str(e.value) and str(tmp_path / "cache" / "datasets" / "mpdd") in str(e.value)
  assert not (tmp_path / "run").exists()
