"""User errors and how the commands report them.

A `UserError` is a mistake a person can fix (a bad config field, bad data, missing weights, an
unreadable file): the commands print its message alone and exit with status 2
(`exit_on_user_error`); `--verbose` also prints the traceback. Any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import functools
import locale
import os
import shutil
import sys
import traceback

from absl import app, flags


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
    except app.UsageError as e:  # a wrong argument: its message, not the whole usage text
      print(f"error: {e} (--help lists the flags)", file=sys.stderr, flush=True)
      raise SystemExit(USER_ERROR_STATUS) from None
    except OSError as e:
      if e.errno not in DISK_FULL:
        raise
      print(f"error: {disk_full_message(e)}", file=sys.stderr, flush=True)
      raise SystemExit(USER_ERROR_STATUS) from None

  return wrapped


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full_message(e: OSError) -> str:
  """One line for a write that failed for space: the file, the free space of its disk, the
  fix. (Result files are written to temporaries and renamed: nothing half-written is kept.)"""
  where = e.filename or ""
  free = ""
  folder = os.path.dirname(os.path.abspath(where)) if where else ""
  while folder and not os.path.isdir(folder):
    folder = os.path.dirname(folder)
  if folder:
    with contextlib.suppress(OSError):
      free = f", {shutil.disk_usage(folder).free / 2**20:.1f} MiB free there"
  what = f" writing {where}" if where else ""
  return (
      f"the disk is full{what} ({e.strerror or e}{free}); nothing half-written was kept under a "
      f"final name. Free some space, or write to another disk, and run the command again"
  )


def _flag_error_message(e: BaseException) -> str:
  text = str(e.args[0]) if e.args else str(e)
  return " ".join(text.replace("\\'", "'").strip("'\"").split())


def parse_flags_or_exit(argv, flag_values: flags.FlagValues = flags.FLAGS, parser=None):
  """Parses the command line (with `parser(argv, flag_values)` when given) -> the remaining
  arguments. A bad flag or value, or a `--config.<field>` override naming no field of the
  config, prints one line and exits with status 2."""
  try:
    return parser(argv, flag_values) if parser is not None else flag_values(argv)
  except flags.Error as e:
    print(f"error: {_flag_error_message(e)} (--help lists the flags)", file=sys.stderr)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of no config field
    if not any(str(a).startswith("--config.") for a in argv[1:]):
      raise
    print(
        f"error: a --config.<field> override names no field of the config: "
        f"{_flag_error_message(e)}",
        file=sys.stderr,
    )
  raise SystemExit(USER_ERROR_STATUS)


def locale_problem() -> str | None:
  """Why the process cannot write file, class and image names outside ASCII (a locale whose
  text encoding is not UTF-8, with Python's UTF-8 mode off), or None."""
  if sys.flags.utf8_mode:
    return None
  enc = locale.getpreferredencoding(False)
  if (
      codecs.lookup(enc).name == "utf-8"
      and codecs.lookup(sys.getfilesystemencoding()).name == "utf-8"
  ):
    return None
  return (
      f"the locale's text encoding is {enc!r}, not UTF-8: names outside ASCII (files, classes, "
      f"images) could not be read or written. Run with PYTHONUTF8=1 (or LC_ALL=C.UTF-8)"
  )


def run(main, parser=None, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """`app.run` for a command: user errors, usage errors and bad flags exit with status 2 and
  one message (`exit_on_user_error`, `parse_flags_or_exit`); so does a locale that is not
  UTF-8 (`locale_problem`), before anything runs."""
  why = locale_problem()
  if why:
    print(f"error: {why}", file=sys.stderr, flush=True)
    raise SystemExit(USER_ERROR_STATUS)
  try:
    app.run(
        exit_on_user_error(main, flag_values),
        flags_parser=lambda argv: parse_flags_or_exit(argv, flag_values, parser),
    )
  except SystemExit as e:
    if e.code == 1 and asked_for_help(sys.argv[1:]):
      raise SystemExit(0) from None  # absl's help flags exit 1; help that was asked for is no error
    raise


_HELP_FLAGS = {"help", "?", "helpshort", "helpfull", "helpxml"}


def asked_for_help(args) -> bool:
  """Whether the command line holds one of absl's help flags (before a `--`)."""
  for a in args:
    if a == "--":
      return False
    if a.startswith("-") and a.lstrip("-").split("=", 1)[0] in _HELP_FLAGS:
      return True
  return False
