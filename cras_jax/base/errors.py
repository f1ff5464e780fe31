"""User errors and how the commands report them.

A `UserError` is a mistake a person can fix (a bad config field, bad data, missing weights, an
unreadable file): the commands print its message alone and exit with status 2
(`exit_on_user_error`); `--verbose` also prints the traceback. Any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
import traceback

from absl import flags


class UserError(Exception):
  """A mistake in the command's inputs; the message names the field or file and the fix."""


class UserFileNotFoundError(UserError, FileNotFoundError):
  """A missing file or run directory named by the user."""


class UserValueError(UserError, ValueError):
  """A value given by the user (config field, data, file content) that cannot be used."""


USER_ERROR_STATUS = 2


def define_verbose_flag(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  if "verbose" not in flag_values:
    flags.DEFINE_bool(
        "verbose",
        False,
        "On a user error (bad config, data or file) also print the traceback.",
        flag_values=flag_values,
    )


def report(e: BaseException, verbose: bool = False) -> int:
  """Prints a user error's message (and with `verbose` its traceback) -> the exit status."""
  if verbose:
    traceback.print_exception(e)
  print(f"error: {e}", file=sys.stderr, flush=True)
  return USER_ERROR_STATUS


def exit_on_user_error(main, flag_values: flags.FlagValues = flags.FLAGS):
  """`main` for `app.run`: a `UserError` exits with status 2 and its message alone."""

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except UserError as e:
      verbose = "verbose" in flag_values and flag_values["verbose"].value
      raise SystemExit(report(e, verbose)) from None

  return wrapped
