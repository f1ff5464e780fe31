"""Convert VisA's original release to the MVTec layout (`cras_jax.data.visa`, where the
layouts are described). Running it again skips every output that is already up to date.
Usage (from the repository root)::

    python -m tools.convert_visa <visa> <out> [--classes=candle,pcb1,...] [--split_csv=PATH]
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import app, flags

if __package__ in (None, ""):  # `python tools/convert_visa.py`: the repository root on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cras_jax.base import errors
from cras_jax.data.visa import (  # noqa: F401 - the conversion, re-exported for its users
    COLUMNS,
    SPLIT_CSV,
    ConversionError,
    convert,
    read_split,
)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags (defined when it runs as a command); its two arguments are VisA as
  released (holding split_csv/ and one folder per class) and the output folder."""
  flags.DEFINE_list(
      "classes", None, "Only these classes (comma-separated).", flag_values=flag_values
  )
  flags.DEFINE_string(
      "split_csv", None, f"Default <visa_root>/{SPLIT_CSV}.", flag_values=flag_values
  )


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
  if len(argv) != 3:
    raise app.UsageError("give two arguments: <visa_root> <out_root>")
  convert(argv[1], argv[2], flag_values.classes, flag_values.split_csv)  # errors: exit 2
  return 0


if __name__ == "__main__":
  define_flags()
  errors.define_verbose_flag()
  errors.run(main)
