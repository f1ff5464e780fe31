"""Reader leases: live while their process runs (another process's), stale once it ends."""

import os
import subprocess
import sys

from cras_jax.base import leases

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_HOLD = (
    "import sys, time; from cras_jax.base import leases; "
    "[leases.hold(t) for t in sys.argv[1:]]; print('ready', flush=True); time.sleep(600)"
)


def hold_in_another_process(*targets) -> subprocess.Popen:
  """A process that holds leases on `targets` until killed (a run reading them)."""
  proc = subprocess.Popen(
      [sys.executable, "-c", _HOLD, *map(str, targets)],
      stdout=subprocess.PIPE,
      text=True,
      env=dict(os.environ, PYTHONPATH=ROOT),
  )
  assert proc.stdout.readline().strip() == "ready"
  return proc


def end(proc: subprocess.Popen) -> None:
  proc.kill()
  proc.wait(timeout=60)


def test_lease_of_a_live_process_counts_until_it_ends(tmp_path):
  target = tmp_path / "prepared"
  target.mkdir()
  assert not leases.in_use(str(target))
  proc = hold_in_another_process(target)
  try:
    assert leases.in_use(str(target))
    assert len(leases.holders(str(target))) == 1
  finally:
    end(proc)  # killed: no clean-up ran, the kernel dropped its lock
  assert len(os.listdir(tmp_path / leases.LEASE_DIR)) == 1  # its file is still there ...
  assert not leases.in_use(str(target))  # ... but stale: ignored and removed
  assert os.listdir(tmp_path / leases.LEASE_DIR) == []


def test_simulated_lease_of_a_dead_pid_is_ignored(tmp_path):
  dead = subprocess.run(
      [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
  )
  folder = tmp_path / leases.LEASE_DIR
  folder.mkdir()
  (folder / f"x@{leases._HOST}.{int(dead.stdout)}.abcd1234").write_text("{}")
  assert not leases.in_use(str(tmp_path / "x"))
  assert os.listdir(folder) == []


def test_own_lease_is_not_counted_and_is_released(tmp_path):
  target = str(tmp_path / "f.npy")
  path = leases.hold(target)
  assert leases.hold(target) == path and os.path.exists(path)  # once per process
  assert not leases.in_use(target)  # own reads: the process replaced the data itself
  assert os.path.exists(path)  # and is not taken for stale
  leases.release(target)
  assert not os.path.exists(path)


def test_leases_are_per_target(tmp_path):
  proc = hold_in_another_process(tmp_path / "a")
  try:
    assert leases.in_use(str(tmp_path / "a")) and not leases.in_use(str(tmp_path / "ab"))
  finally:
    end(proc)
