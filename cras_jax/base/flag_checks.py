"""Range checks of command-line flags, run when the flags are parsed: a value out of range is a
flag error (one line, exit status 2 under `errors.run`), before anything is loaded."""

from __future__ import annotations

import math
from collections.abc import Iterable

from absl import flags

# The flags defined here (`define_member_flag`) belong to the command that asks for them: its
# `--help` lists them (absl lists a module's own flags; this module defines none of its own).
flags.disclaim_key_flags()


def _fmt(x) -> str:
  return f"{x:g}" if isinstance(x, float) else str(x)


def bounded(
    flag_values: flags.FlagValues, name: str, low=None, high=None, *, item: str = ""
) -> None:
  """--name must be a finite number in [low, high] (None: no bound; an unset flag, None,
  passes). For list flags each element is checked (as a number)."""
  rng = (
      f"from {_fmt(low)} to {_fmt(high)}"
      if low is not None and high is not None
      else (f">= {_fmt(low)}" if low is not None else f"<= {_fmt(high)}")
      if (low is not None or high is not None)
      else "finite"
  )

  def ok(value) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
      if v is None:
        continue
      try:
        x = float(v)
      except (TypeError, ValueError):
        return False
      if not math.isfinite(x) or (low is not None and x < low) or (high is not None and x > high):
        return False
    return True

  what = f"each {item}" if item else "it"
  flags.register_validator(
      name, ok, message=f"--{name}: {what} must be a finite number {rng}", flag_values=flag_values
  )


def positive_ints(flag_values: flags.FlagValues, name: str, high: int) -> None:
  """--name (a list flag) must hold integers from 1 to `high`."""

  def ok(value) -> bool:
    return all(str(v).strip().isdigit() and 1 <= int(v) <= high for v in value or [])

  flags.register_validator(
      name,
      ok,
      message=f"--{name}: each entry must be an integer from 1 to {high}",
      flag_values=flag_values,
  )


def subset(flag_values: flags.FlagValues, name: str, choices: Iterable[str]) -> None:
  """--name (a list flag) must hold only `choices`."""
  choices = tuple(choices)
  flags.register_validator(
      name,
      lambda value: all(v in choices for v in value or []),
      message=f"--{name}: choose from {', '.join(choices)}",
      flag_values=flag_values,
  )


def define_member_flag(fv: flags.FlagValues) -> None:
  """`--member`: the commands that read a trained run pick a population's member with it."""
  flags.DEFINE_string(
      "member",
      None,
      "A population's member (its workdir trained several models, results/<member>/): the "
      "one to use.",
      flag_values=fv,
  )


def define_trained_run_flags(
    fv: flags.FlagValues, what: str = "A trained run's directory."
) -> None:
  """`--workdir` (required: the trained run to read) and `--member`: the flags of every
  command that reads a trained run (predict, export, robustness, figures, submission)."""
  flags.DEFINE_string("workdir", None, what, flag_values=fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)
  define_member_flag(fv)
