"""base/download.py against a loopback server: fetch, resume, checksums, no network."""

import hashlib
import os

import pytest

from cras_jax.base import download
from tests.fixture_server import FixtureServer, closed_port_url

DATA = bytes(range(256)) * 4096  # 1 MiB, not a multiple of the read size's halves
SHA = hashlib.sha256(DATA).hexdigest()


def test_fetch_stores_verified_file_once(tmp_path):
  dest = str(tmp_path / "d" / "file.bin")
  with FixtureServer({"file.bin": DATA}) as s:
    path, seen = download.fetch(s.url("file.bin"), dest, "the file", sha256=SHA)
    assert seen == SHA and open(path, "rb").read() == DATA
    again, seen2 = download.fetch(s.url("file.bin"), dest, "the file", sha256=SHA)
    assert again == dest and seen2 is None
    assert len(s.requests) == 1  # already there: never fetched again
  assert not os.path.exists(dest + ".part")


def test_interrupted_transfer_resumes_with_range(tmp_path):
  dest = str(tmp_path / "file.bin")
  with FixtureServer({"file.bin": DATA}, cut_once=("file.bin",)) as s:
    with pytest.raises(download.FetchError, match="the next try resumes"):
      download.fetch(s.url("file.bin"), dest, "the file", sha256=SHA)
    kept = os.path.getsize(dest + ".part")
    assert 0 < kept < len(DATA) and not os.path.exists(dest)
    path, seen = download.fetch(s.url("file.bin"), dest, "the file", sha256=SHA)
    assert s.requests[-1] == ("file.bin", f"bytes={kept}-")
  assert seen == SHA and open(path, "rb").read() == DATA


def test_server_without_range_restarts_from_zero(tmp_path):
  dest = str(tmp_path / "file.bin")
  with open(dest + ".part", "wb") as f:
    f.write(b"x" * 1000)  # a stale partial file the server will not continue
  with FixtureServer({"file.bin": DATA}, ranges=False) as s:
    path, _ = download.fetch(s.url("file.bin"), dest, "the file", sha256=SHA)
  assert open(path, "rb").read() == DATA


def test_checksum_mismatch_keeps_nothing(tmp_path):
  dest = str(tmp_path / "file.bin")
  with FixtureServer({"file.bin": DATA}) as s:
    with pytest.raises(download.FetchError, match=f"has SHA-256 {SHA}.*nothing kept"):
      download.fetch(s.url("file.bin"), dest, "the file", sha256="0" * 64)
  assert sorted(os.listdir(tmp_path)) == ["file.bin.lock"]


def test_hash_prefix_of_the_name_is_checked(tmp_path):
  dest = str(tmp_path / "w-0123abcd.pth")
  with FixtureServer({"w.pth": DATA}) as s:
    with pytest.raises(download.FetchError, match="0123abcd"):
      download.fetch(s.url("w.pth"), dest, "weights", sha256_prefix="0123abcd")
    path, _ = download.fetch(s.url("w.pth"), dest, "weights", sha256_prefix=SHA[:8])
  assert open(path, "rb").read() == DATA


def test_no_network_names_what_where_and_how_by_hand(tmp_path):
  url, dest = closed_port_url("file.bin"), str(tmp_path / "file.bin")
  with pytest.raises(download.FetchError) as e:
    download.fetch(url, dest, "the file")
  msg = str(e.value)
  assert url in msg and dest in msg and "by hand" in msg and "refused" in msg.lower()
  assert not os.path.exists(dest)
