"""Readers of a checkpoint folder that a training saves into and prunes at the same time."""

import logging as py_logging
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cras_jax.runs import checkpoint

TREE = {"w": np.arange(64 * 16, dtype=np.float32).reshape(64, 16)}
META = {"class_names": ["a"], "config": {}}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_readers_survive_steps_pruned_while_they_list_them(tmp_path):
  """A writer that saves a step and prunes the previous one as fast as it can (keep 1), and a
  reader that opens, lists and restores meanwhile: a step deleted between orbax's listing and
  its reading of the step's metadata is listed again, never surfaces as FileNotFoundError or
  NotADirectoryError, and every read returns a complete step."""
  writer = checkpoint.manager(str(tmp_path), max_to_keep=1)
  checkpoint.save(writer, 1, TREE, META)
  stop = threading.Event()
  saved = []

  def train():
    step = 2
    while not stop.is_set():
      checkpoint.save(writer, step, TREE, META)
      saved.append(step)
      step += 1
      # A save every 20 ms at most: a writer that saves faster than a loaded reader lists and
      # reads starves every reader (each listed step is pruned before it is read: the reader
      # then says so, `restore_meta` and `restore_good`'s UserValueError). Trainings save
      # seconds apart; at this pace the prunes still land inside the readers' listings.
      time.sleep(0.02)

  thread = threading.Thread(target=train)
  thread.start()
  reads, failures = 0, []
  try:
    end = time.monotonic() + 4.0
    while time.monotonic() < end:
      try:
        reader = checkpoint.manager(str(tmp_path), read_only=True)
        assert checkpoint.restore_meta(reader)["class_names"] == ["a"]
        tree, _, step, skipped = checkpoint.restore_good(reader, TREE, quarantine=False)
        np.testing.assert_array_equal(tree["w"], TREE["w"])
        assert step >= 1 and not skipped
        reads += 1
      except Exception as e:  # noqa: BLE001 - collected: every one is a reader's bug
        failures.append(f"{type(e).__name__}: {e}")
  finally:
    stop.set()
    thread.join()
  assert len(saved) > 10, "the writer barely ran: the race was not exercised"
  assert reads > 10 and not failures, (reads, failures[:3])


READER = """
import sys, time
import jax.numpy as jnp
from cras_jax.base import errors
from cras_jax.runs import checkpoint
tree = {"w": jnp.zeros((64, 16)), "b": jnp.zeros((300, 300))}
end, reads = time.monotonic() + float(sys.argv[2]), 0
while time.monotonic() < end:
  try:
    reader = checkpoint.manager(sys.argv[1], read_only=True)
    checkpoint.restore_meta(reader)
    checkpoint.restore_good(reader, tree, quarantine=False)
    reads += 1
  except errors.UserError:  # starved by the writer on a loaded machine: said, and tried again
    pass
print("reads", reads)
"""


@pytest.mark.slow
def test_a_reader_beside_a_pruning_writer_prints_nothing_of_the_reads_it_abandons(tmp_path):
  """A reader process of device arrays whose steps are pruned while it reads them: the aborted
  reads' coroutines (collected after their event loop closed) and orbax's missing-metadata
  warnings are not printed; the reader exits 0 having read complete steps."""
  tree = {"w": np.ones((64, 16), np.float32), "b": np.ones((300, 300), np.float32)}
  writer = checkpoint.manager(str(tmp_path), max_to_keep=1)
  checkpoint.save(writer, 1, tree, META)
  stop = threading.Event()

  def train():
    step = 2
    while not stop.is_set():
      checkpoint.save(writer, step, tree, META)
      step += 1
      time.sleep(0.02)  # as the test above: a writer much faster than the reader starves it

  thread = threading.Thread(target=train)
  thread.start()
  try:
    out = subprocess.run(
        [sys.executable, "-c", READER, str(tmp_path), "6"],
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    )
  finally:
    stop.set()
    thread.join()
  assert out.returncode == 0, out.stderr[-3000:]
  assert int(out.stdout.split()[-1]) > 2
  for noise in ("Traceback", "Event loop is closed", "Exception ignored", "Metadata file"):
    assert noise not in out.stderr, out.stderr[-3000:]


def test_a_pruned_read_task_reported_by_asyncio_is_dropped_and_other_reports_pass():
  """asyncio's report of an aborted read's task (collected after its step was pruned: its
  TensorStore open NOT_FOUND, or orbax's step directory gone) is dropped once readers' filters are on; its other reports, and
  other errors of tasks, pass."""
  checkpoint._quiet_pruned_reads()
  asyncio_logger = py_logging.getLogger("asyncio")
  pruned = ValueError(
      'NOT_FOUND: Error opening "cast" driver: Error opening "zarr" driver: Metadata at '
      '"b/.zarray" in OCDBT database at local file "run/checkpoints/93/state/" does not exist'
  )

  def record(message, error):
    info = (type(error), error, None) if error is not None else None
    return py_logging.LogRecord("asyncio", py_logging.ERROR, "", 0, message, None, info)

  task = "Task exception was never retrieved\nfuture: <Task finished name='Task-7'>"
  assert not asyncio_logger.filter(record(task, pruned))
  gone = ValueError("Checkpoint directory does not exist: run/checkpoints/48/state.")
  assert not asyncio_logger.filter(record(task, gone))
  assert asyncio_logger.filter(record(task, ValueError("NOT_FOUND: Error opening the door")))
  assert asyncio_logger.filter(record(task, RuntimeError("a bug")))
  assert asyncio_logger.filter(record("Unhandled exception in event loop", pruned))


def test_a_metadata_file_pruned_between_check_and_read_is_dropped_and_other_read_errors_pass():
  """orbax's "Failed to read Metadata file" (the file there when it checked, pruned when it
  read it: FileNotFoundError) is dropped once readers' filters are on; the same message for
  another error (a permission, a bad file) passes."""
  checkpoint._quiet_pruned_reads()
  absl_logger = py_logging.getLogger("absl")
  path = "run/checkpoints/77/_CHECKPOINT_METADATA"

  def record(error):
    return py_logging.LogRecord(
        "absl", py_logging.ERROR, "", 0, "Failed to read Metadata file: %s, error: %s",
        (path, error), None,
    )  # fmt: skip

  assert not absl_logger.filter(record(FileNotFoundError(2, "No such file or directory", path)))
  assert absl_logger.filter(record(PermissionError(13, "Permission denied", path)))
  assert absl_logger.filter(record(ValueError("bad bytes")))
