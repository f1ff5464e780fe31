"""Stopping on SIGINT/SIGTERM between units of work, with a non-zero status.

A KeyboardInterrupt raised inside a blocking JAX call can leave the pending computation
cancelled and the process hung; instead `StopRequest` records the signal and the work stops at
its next boundary: the training loop after the current step (with a checkpoint), and every other
long loop (the feature pass, scoring a split, predict) after its current batch, by calling
`poll`. A stopped command exits with status 128 + the signal's number (130 for Ctrl-C, 143 for
SIGTERM) after leaving consistent outputs (what its files list exists). A second signal
interrupts at once. Outside a `StopRequest` (and off the main thread), `poll` does nothing and
signals keep their default behaviour.
"""

from __future__ import annotations

import signal
import sys
import threading

_ACTIVE: list[StopRequest] = []  # innermost last


class Stopped(SystemExit):
  """Raised at a work boundary after SIGINT/SIGTERM; exits with status 128 + signal."""

  def __init__(self, signum: int):
    super().__init__(128 + signum)
    self.signum = signum


class StopRequest:
  """Turns SIGINT/SIGTERM into a request to stop at the next boundary (module docstring)."""

  def __init__(self, what: str = "this step"):
    self.signum: int | None = None
    self.what = what
    self._old = {}

  def _handle(self, signum, frame):
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum
    print(
        f"\nsignal {signal.Signals(signum).name}: stopping after {self.what} "
        f"(again to abort at once)",
        flush=True,
    )

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._old[sig] = signal.signal(sig, self._handle)
    _ACTIVE.append(self)
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}
    if self in _ACTIVE:
      _ACTIVE.remove(self)
    return False


def requested() -> int | None:
  """The signal received inside the innermost active `StopRequest`, or None."""
  return _ACTIVE[-1].signum if _ACTIVE else None


def poll(where: str, note: str = "") -> None:
  """At a work boundary: raises `Stopped` (printing where, and `note`: what was kept) when a
  signal arrived."""
  signum = requested()
  if signum is None:
    return
  print(
      f"stopped during {where} by {signal.Signals(signum).name}" + (f"; {note}" if note else ""),
      file=sys.stderr,
      flush=True,
  )
  raise Stopped(signum)
