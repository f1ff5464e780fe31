"""Progress bars for every stage a person waits on (data preparation, the feature pass,
training, scoring), and the one switch that silences them for logs: `config.log.progress`
(`--config.log.progress=false`; `configure`), or tqdm's own `TQDM_DISABLE=1`."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

_enabled = True


def configure(config) -> None:
  """Shows or hides the bars as `config.log.progress` says (shown in the config of a run saved
  before the field existed: `schema.filled`)."""
  set_enabled(bool(config.log.progress))


def set_enabled(enabled: bool) -> None:
  global _enabled
  _enabled = enabled


def enabled() -> bool:
  return _enabled


def bar(total: int | None, desc: str, initial: int = 0, unit: str = "step", **kwargs):
  """A tqdm bar on stdout; a no-op one (same methods) in quiet mode. `kwargs` go to tqdm
  (e.g. unit_scale=True for bytes)."""
  extra = {} if _enabled else {"disable": True}  # else tqdm's TQDM_* environment applies
  return tqdm(
      total=total,
      initial=initial,
      desc=desc,
      unit=unit,
      dynamic_ncols=True,
      mininterval=1.0,
      file=sys.stdout,
      **kwargs,
      **extra,
  )
