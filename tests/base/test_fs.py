"""Machine limits become user errors: full disks, read-only folders, FIFOs among inputs."""

import errno
import os
import shutil

import numpy as np
import pytest

from cras_jax.base import errors, fs
from cras_jax.data import layout
from cras_jax.runs import feature_cache
from cras_jax.scoring import predict_inputs


def _full_disk(monkeypatch, free: int):
  usage = shutil.disk_usage("/")
  monkeypatch.setattr(fs.shutil, "disk_usage", lambda p: usage._replace(free=free))


def test_feature_cache_refuses_a_disk_without_room_before_writing(tmp_path, monkeypatch):
  _full_disk(monkeypatch, 10 * 2**20)
  with pytest.raises(errors.UserError, match=r"needs .* MiB .* only 10.0 MiB are free"):
    feature_cache.Writer(str(tmp_path / "f" / "train_0.npy"), (64, 16, 8), "float32")
  assert os.listdir(tmp_path / "f") == []  # nothing left behind


def test_feature_cache_refuses_when_the_blocks_cannot_be_reserved(tmp_path, monkeypatch):
  def no_space(fd, offset, size):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(fs.os, "posix_fallocate", no_space)
  with pytest.raises(errors.UserError, match="no room for"):
    feature_cache.Writer(str(tmp_path / "train_0.npy"), (4, 4, 4), "float16")
  assert os.listdir(tmp_path) == []


def test_feature_cache_file_is_preallocated(tmp_path):
  w = feature_cache.Writer(str(tmp_path / "train_0.npy"), (8, 64, 64), "float32")
  st = os.stat(w.tmp)
  assert st.st_blocks * 512 >= 8 * 64 * 64 * 4  # blocks reserved, not a sparse file
  w.array[:] = 1.0
  np.testing.assert_array_equal(w.commit(), np.ones((8, 64, 64), np.float32))


def test_aborted_feature_cache_write_leaves_nothing(tmp_path):
  w = feature_cache.Writer(str(tmp_path / "train_0.npy"), (2, 2, 2), "float16")
  w.abort()
  assert os.listdir(tmp_path) == []


def test_writable_dir_refuses_a_file_and_a_read_only_folder(tmp_path, monkeypatch):
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(errors.UserError, match="is a file"):
    fs.writable_dir(str(f), "--workdir")
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o500)
  try:
    if os.access(ro, os.W_OK):  # root ignores permissions: the probe write is refused instead

      def refused(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

      monkeypatch.setattr(fs.tempfile, "mkstemp", refused)
    with pytest.raises(errors.UserError, match="cannot be written"):
      fs.writable_dir(str(ro / "sub"), "--workdir")
  finally:
    ro.chmod(0o700)
    monkeypatch.undo()
  assert fs.writable_dir(str(tmp_path / "new" / "dir"), "x") == str(tmp_path / "new" / "dir")


def test_fifos_among_inputs_are_never_read(tmp_path):
  d = tmp_path / "imgs"
  d.mkdir()
  (d / "a.png").write_bytes(b"\x89PNG")
  os.mkfifo(d / "b.png")
  files, errs = predict_inputs.find_images([str(d)])
  assert [n for _, n in files] == ["imgs/a.png"] and errs == []
  files, errs = predict_inputs.find_images([str(d / "b.png")])
  assert files == [] and "not a regular file" in errs[0][1]
  # The dataset scanner lists regular files only, too.
  assert [p.name for p in layout._list_images(d)] == ["a.png"]


@pytest.mark.parametrize("place", ["/", "//", "~", "checkout"])
def test_the_filesystem_root_a_home_and_the_checkout_are_refused_as_run_folders(place, tmp_path):
  path = (
      os.path.dirname(os.path.dirname(os.path.dirname(fs.__file__)))
      if place == "checkout"
      else place
  )
  with pytest.raises(errors.UserError, match=r"--workdir .* give a folder of its own"):
    fs.writable_dir(path, "--workdir")
  assert fs.shared_place(str(tmp_path / "run")) is None
  assert fs.writable_dir(str(tmp_path / "run"), "--workdir") == str(tmp_path / "run")
