"""base/archive.py: safe extraction refuses every member that could land outside the target
or exceed the bounds, and writes nothing then."""

import io
import os
import stat
import tarfile
import zipfile

import pytest

from cras_jax.base import archive


def _tar(path, members, mode="w:gz"):
  """members: (name, kind, payload): kind file | dir | symlink | hardlink | fifo."""
  with tarfile.open(path, mode) as tf:
    for name, kind, payload in members:
      info = tarfile.TarInfo(name)
      if kind == "file":
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
        continue
      info.type = {
          "dir": tarfile.DIRTYPE,
          "symlink": tarfile.SYMTYPE,
          "hardlink": tarfile.LNKTYPE,
          "fifo": tarfile.FIFOTYPE,
      }[kind]
      info.linkname = payload or ""
      tf.addfile(info)
  return str(path)


def _zip(path, members):
  with zipfile.ZipFile(path, "w") as zf:
    for name, kind, payload in members:
      info = zipfile.ZipInfo(name)
      if kind == "symlink":
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
      zf.writestr(info, payload)
  return str(path)


def _tree(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


GOOD = [("ds/a/train/good/0.png", "file", b"png0"), ("ds/a/test", "dir", None)]


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_plain_archive_is_extracted(tmp_path, kind):
  src = _tar(tmp_path / "a.tgz", GOOD) if kind == "tar" else _zip(tmp_path / "a.zip", GOOD[:1])
  out = archive.extract(src, str(tmp_path / "out"))
  assert open(os.path.join(out, "ds/a/train/good/0.png"), "rb").read() == b"png0"
  assert not [p for p in os.listdir(tmp_path) if "extracting" in p]


# Stands for an absolute path outside the target (a member name or a link target), made under
# the test's own tmp_path: `_outside` puts it in.
OUTSIDE = "<absolute path outside the target>"


def _outside(members, tmp_path):
  """`members` with OUTSIDE replaced by <tmp_path>/outside/evil_abs.txt (absolute)."""
  path = str(tmp_path / "outside" / "evil_abs.txt")
  sub = lambda v: path if v == OUTSIDE else (path.encode() if v == OUTSIDE.encode() else v)
  return [(sub(name), kind, sub(payload)) for name, kind, payload in members], path


BAD_TAR = {
    "traversal": ([("../evil.txt", "file", b"x")], "'..'"),
    "nested traversal": ([("ds/../../evil.txt", "file", b"x")], "'..'"),
    "absolute": ([(OUTSIDE, "file", b"x")], "absolute"),
    "symlink": ([("ds/link", "symlink", OUTSIDE)], "link"),
    "hard link": ([("ds/f", "file", b"x"), ("ds/hard", "hardlink", "ds/f")], "link"),
    "fifo": ([("ds/fifo", "fifo", None)], "plain file"),
    "oversized": ([("ds/big.bin", "file", b"y" * 5000)], "limit"),
}


@pytest.mark.parametrize("case", sorted(BAD_TAR))
def test_unsafe_tar_member_is_refused_and_nothing_written(tmp_path, case):
  members, why = BAD_TAR[case]
  members, outside = _outside(members, tmp_path)
  src = _tar(tmp_path / "bad.tgz", GOOD + members)
  before = _tree(tmp_path)
  with pytest.raises(archive.ArchiveError, match=why):
    archive.extract(src, str(tmp_path / "work" / "out"), archive.Limits(max_member_bytes=4096))
  assert _tree(tmp_path) == before  # nothing inside, beside or outside the target
  assert not os.path.exists(tmp_path.parent / "evil.txt") and not os.path.exists(outside)


BAD_ZIP = {
    "traversal": ([("../evil.txt", "file", b"x")], "'..'"),
    "absolute": ([(OUTSIDE, "file", b"x")], "absolute"),
    "symlink": ([("ds/link", "symlink", OUTSIDE.encode())], "link"),
    "backslash": ([("..\\evil.txt", "file", b"x")], "backslash"),
}


@pytest.mark.parametrize("case", sorted(BAD_ZIP))
def test_unsafe_zip_member_is_refused(tmp_path, case):
  members, why = BAD_ZIP[case]
  members, outside = _outside(members, tmp_path)
  src = _zip(tmp_path / "bad.zip", GOOD[:1] + members)
  before = _tree(tmp_path)
  with pytest.raises(archive.ArchiveError, match=why):
    archive.extract(src, str(tmp_path / "out"))
  assert _tree(tmp_path) == before and not os.path.exists(outside)


def test_total_size_and_member_count_are_bounded(tmp_path):
  files = [(f"ds/{i}.bin", "file", b"z" * 100) for i in range(5)]
  src = _tar(tmp_path / "many.tgz", files)
  with pytest.raises(archive.ArchiveError, match="total"):
    archive.extract(src, str(tmp_path / "o1"), archive.Limits(max_total_bytes=450))
  with pytest.raises(archive.ArchiveError, match="members"):
    archive.extract(src, str(tmp_path / "o2"), archive.Limits(max_members=3))
  assert not os.path.exists(tmp_path / "o1") and not os.path.exists(tmp_path / "o2")


def test_damaged_archive_is_a_user_error(tmp_path):
  src = tmp_path / "broken.tar.gz"
  src.write_bytes(b"\x1f\x8b\x08" + b"\x00" * 50)
  with pytest.raises(archive.ArchiveError, match="unreadable"):
    archive.extract(str(src), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
