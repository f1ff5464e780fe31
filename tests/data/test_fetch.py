"""data/fetch.py: datasets by name, fetched from a loopback server, prepared once."""

import csv
import dataclasses
import hashlib
import io
import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from cras_jax.base import archive, download
from cras_jax.configs import btad, mvtec, visa
from cras_jax.data import fetch
from cras_jax.runs import specs
from tests.fixture_server import FixtureServer, mvtec_tree, tar_bytes


def _config(module, tmp_path, url="", classes=None, sha=""):
  config = module.get_config()
  config.data.data_dir = str(tmp_path / "datasets")
  config.data.download_url = url
  config.data.download_sha256 = sha
  if classes is not None:
    config.data.classes = classes
  return specs.fetch_spec(config)


def test_mvtec_archive_fetched_once_and_found_below_its_top_folder(tmp_path):
  data = tar_bytes(mvtec_tree(str(tmp_path / "src"), ("bottle", "grid")), "mvtec_ad_release")
  with FixtureServer({"mvtec.tar.gz": data}) as s:
    config = _config(mvtec, tmp_path, s.url("mvtec.tar.gz"), ("bottle", "grid"))
    root = fetch.ensure(config)
    assert root == str(tmp_path / "datasets" / "mvtec" / "raw" / "mvtec_ad_release")
    assert sorted(os.listdir(os.path.join(root, "bottle", "test"))) == ["broken", "good"]
    record = json.loads((tmp_path / "datasets" / "mvtec" / "prepared.json").read_text())
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert not (tmp_path / "datasets" / "mvtec" / "downloads").exists()  # archive deleted
    assert fetch.ensure(config) == root and len(s.requests) == 1  # never fetched again


def test_visa_release_is_converted_with_its_split_csv(tmp_path):
  src = tmp_path / "VisA_20220922"
  rows = []
  for kind, n in (("Normal", 4), ("Anomaly", 1)):
    d = src / "candle" / "Data" / "Images" / kind
    d.mkdir(parents=True)
    for i in range(n):
      Image.fromarray(np.full((24, 24, 3), 100 + i, np.uint8)).save(d / f"{kind}{i}.JPG", "JPEG")
      row = {"object": "candle", "split": "train" if kind == "Normal" and i < 3 else "test"}
      row.update(label=kind.lower(), image=f"candle/Data/Images/{kind}/{kind}{i}.JPG", mask="")
      if kind == "Anomaly":
        md = src / "candle" / "Data" / "Masks" / "Anomaly"
        md.mkdir(parents=True)
        Image.fromarray(np.eye(24, dtype=np.uint8)).save(md / f"{kind}{i}.png")
        row["mask"] = f"candle/Data/Masks/Anomaly/{kind}{i}.png"
      rows.append(row)
  (src / "split_csv").mkdir()
  with open(src / "split_csv" / "1cls.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["object", "split", "label", "image", "mask"])
    w.writeheader()
    w.writerows(rows)
  with FixtureServer({"VisA.tar": tar_bytes(str(src), "VisA_20220922", "w")}) as s:
    root = fetch.ensure(_config(visa, tmp_path, s.url("VisA.tar"), ("candle",)))
  assert root == str(tmp_path / "datasets" / "visa" / "mvtec")
  assert len(os.listdir(os.path.join(root, "candle", "train", "good"))) == 3
  assert os.listdir(os.path.join(root, "candle", "ground_truth", "bad")) == ["Anomaly0_mask.png"]


def test_btad_zip_is_read_in_its_own_layout(tmp_path):
  buf = io.BytesIO()
  png = io.BytesIO()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, "PNG")
  with zipfile.ZipFile(buf, "w") as zf:
    for c in ("01", "02", "03"):
      zf.writestr(f"BTech_Dataset_transformed/{c}/train/ok/0000.png", png.getvalue())
      zf.writestr(f"BTech_Dataset_transformed/{c}/test/ok/0000.png", png.getvalue())
  with FixtureServer({"btad.zip": buf.getvalue()}) as s:
    root = fetch.ensure(_config(btad, tmp_path, s.url("btad.zip")))
  assert root.endswith(os.path.join("btad", "raw", "BTech_Dataset_transformed"))


def test_checksum_mismatch_keeps_nothing(tmp_path):
  data = tar_bytes(mvtec_tree(str(tmp_path / "src")), "mvtec")
  with FixtureServer({"m.tgz": data}) as s:
    with pytest.raises(download.FetchError, match="nothing kept"):
      fetch.ensure(_config(mvtec, tmp_path, s.url("m.tgz"), ("bottle",), sha="ab" * 32))
  base = tmp_path / "datasets" / "mvtec"
  assert os.listdir(base / "downloads") == ["m.tgz.lock"] and not (base / "raw").exists()
  assert not (base / "prepared.json").exists()


def test_unsafe_archive_is_refused_before_writing(tmp_path):
  import tarfile

  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tf:
    info = tarfile.TarInfo("mvtec/../../../escaped.txt")
    info.size = 1
    tf.addfile(info, io.BytesIO(b"x"))
  with FixtureServer({"evil.tgz": buf.getvalue()}) as s:
    with pytest.raises(archive.ArchiveError, match="'..'"):
      fetch.ensure(_config(mvtec, tmp_path, s.url("evil.tgz"), ("bottle",)))
  assert not list(tmp_path.rglob("escaped.txt"))
  assert not (tmp_path / "datasets" / "mvtec" / "raw").exists()


def test_licensed_dataset_says_where_to_get_it_and_put_it(tmp_path):
  config = _config(mvtec, tmp_path)
  with pytest.raises(download.FetchError) as e:
    fetch.ensure(config)
  msg = str(e.value)
  base = str(tmp_path / "datasets" / "mvtec")
  assert "mvtec.com" in msg and base in msg and "data.download_url" in msg
  # put there by hand: used as it is, nothing fetched
  mvtec_tree(base, ("bottle",))
  assert fetch.ensure(dataclasses.replace(config, classes=("bottle",))) == base


def test_a_damaged_archive_is_moved_aside_and_the_next_run_fetches_it_again(tmp_path):
  """A transfer that ended short with nothing to tell (no Content-Length, no pinned hash):
  the archive cannot be extracted, so it is moved aside, never kept under its final name;
  once the mirror serves the whole file the next run succeeds without a manual delete."""
  data = tar_bytes(mvtec_tree(str(tmp_path / "src"), ("bottle",)), "release")
  with FixtureServer({"mvtec.tar.gz": data[: len(data) // 2]}) as s:
    config = _config(mvtec, tmp_path, s.url("mvtec.tar.gz"), ("bottle",))
    with pytest.raises(fetch.DatasetFetchError, match="the next run fetches it again") as e:
      fetch.ensure(config)
    downloads = tmp_path / "datasets" / "mvtec" / "downloads"
    assert not (downloads / "mvtec.tar.gz").exists()
    (aside,) = downloads.glob("mvtec.tar.gz.damaged-*")
    assert str(aside) in str(e.value)
    s.files["mvtec.tar.gz"] = data  # the mirror is fixed
    root = fetch.ensure(config)
    assert sorted(os.listdir(os.path.join(root, "bottle", "test"))) == ["broken", "good"]


@pytest.mark.parametrize("record", ['{"root": "raw/rel', "[1, 2]", '{"root": 3}'])
def test_an_unreadable_prepared_record_is_prepared_again(tmp_path, record, capsys):
  data = tar_bytes(mvtec_tree(str(tmp_path / "src"), ("bottle",)), "release")
  with FixtureServer({"mvtec.tar.gz": data}) as s:
    config = _config(mvtec, tmp_path, s.url("mvtec.tar.gz"), ("bottle",))
    root = fetch.ensure(config)
    (tmp_path / "datasets" / "mvtec" / "prepared.json").write_text(record)
    assert fetch.ensure(config) == root and len(s.requests) == 2
  assert "prepared.json is unreadable" in capsys.readouterr().out


def test_a_prepared_record_pointing_outside_its_folder_is_refused(tmp_path):
  base = tmp_path / "datasets" / "mvtec"
  base.mkdir(parents=True)
  (tmp_path / "elsewhere").mkdir()
  (base / "prepared.json").write_text(json.dumps({"root": "../../elsewhere"}))
  with pytest.raises(fetch.DatasetFetchError, match="lies outside"):
    fetch.ensure(_config(mvtec, tmp_path, "http://127.0.0.1:9/x.tar", ("bottle",)))
