"""Atomic whole-file writes: a reader sees the old file or the new one, never a part."""

import json
import os
import stat

import pytest

from cras_jax.base import fileio


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "metrics.json"
  fileio.atomic_write_json(path, {"a": 1})
  with pytest.raises(RuntimeError):
    with fileio.atomic_write(path) as f:
      f.write('{"a": ')  # half written, then the writer dies
      raise RuntimeError("killed")
  assert json.loads(path.read_text()) == {"a": 1}
  assert os.listdir(tmp_path) == ["metrics.json"]


def test_written_files_are_complete_and_follow_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    fileio.atomic_write_text(tmp_path / "sub" / "a.md", "text\n")
    fileio.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    fileio.atomic_copy(tmp_path / "b.bin", tmp_path / "c.bin")
  finally:
    os.umask(old)
  assert (tmp_path / "sub" / "a.md").read_text() == "text\n"
  assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
  assert stat.S_IMODE(os.stat(tmp_path / "b.bin").st_mode) == 0o644


@pytest.mark.parametrize(
    "text,ok", [("", False), ('{"metrics": {', False), ("[1]", False), ('{"metrics": 1}', True)]
)
def test_read_json_object_refuses_empty_truncated_and_non_objects(tmp_path, text, ok):
  p = tmp_path / "m.json"
  p.write_text(text)
  assert (fileio.read_json_object(p, ("metrics",)) is not None) == ok
  assert fileio.read_json_object(tmp_path / "missing.json") is None


def test_a_full_disk_is_one_message_with_the_file_and_nothing_kept(tmp_path, capsys):
  """A command whose result write meets a full disk (ENOSPC): the temporary is removed, the
  old file stays, and the command prints one line naming the file and the free space (exit 2,
  no traceback)."""
  import errno

  from cras_jax.base import errors

  target = tmp_path / "results" / "metrics_final.json"
  target.parent.mkdir()
  target.write_text('{"old": true}')

  def main(argv):
    with fileio.atomic_write(target, "w") as f:
      f.write("{")
      raise OSError(errno.ENOSPC, "No space left on device", str(target))

  with pytest.raises(SystemExit) as e:
    errors.exit_on_user_error(main)(["cmd"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and len(err.strip().splitlines()) == 1
  assert f"the disk is full writing {target}" in err and "MiB free there" in err
  assert "Traceback" not in err
  assert target.read_text() == '{"old": true}' and os.listdir(target.parent) == [target.name]

  def other(argv):
    raise OSError(errno.EACCES, "Permission denied", str(target))

  with pytest.raises(PermissionError):  # other OS errors are not taken for a full disk
    errors.exit_on_user_error(other)(["cmd"])
