"""TPU programs compiled on a host without a TPU: a generation's topology of N chips from
libtpu (`jax.experimental.topologies`, compile-only devices), a step compiled for it
(`rows.compile_step`), and the largest batch whose compiled memory fits a budget.

libtpu is optional (requirements-tpu-compile.txt): it is imported by JAX when a topology is
first asked for, never at import time here. What a topology is made of is libtpu's: v5e, v6e
and v5p give one device per chip; v4 and TPU7x give two (one per TensorCore), so their steps
are compiled for 2 N devices and every per-device figure is half a chip's.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable

from cras_jax.base import errors, stop
from cras_jax.perf import rows

# Generation name (as libtpu spells it) -> the number of axes of its topology: a 2D torus
# (v5e, v6e) or a 3D one. Topologies are named "<generation>:<x>x<y>[x<z>]" in chips.
GENERATIONS = {"v4": 3, "v5e": 2, "v5p": 3, "v6e": 2, "tpu7x": 3}
# libtpu's default chips-per-host bounds (2x2x1): smaller slices pass their own.
_DEFAULT_HOST_BOUNDS = (2, 2, 1)


def parse_target(target: str) -> str | None:
  """`--target`: "cpu" (None: the host's own devices, as before) or "tpu:<generation>"."""
  if target in ("", "cpu", "host"):
    return None
  kind, _, generation = target.partition(":")
  if kind != "tpu" or generation not in GENERATIONS:
    raise errors.UserError(
        f"--target={target!r}: use 'cpu' or 'tpu:<generation>' with a generation of "
        f"{sorted(GENERATIONS)}"
    )
  return generation


def topology_shape(generation: str, chips: int) -> tuple[str, dict]:
  """The topology name libtpu accepts for `chips` chips of `generation` (a power of two,
  shaped as Cloud TPU slices are: 4 -> 2x2, 16 -> 4x4, 64 -> 8x8 on 2D tori; 4 -> 2x2x1,
  16 -> 2x2x4, 64 -> 4x4x4 on 3D ones) and the keyword arguments it needs: slices smaller than libtpu's
  default host (2x2x1 chips, e.g. one chip) give their own `chips_per_host_bounds`."""
  if chips < 1 or chips & (chips - 1):
    raise errors.UserError(f"TPU chip counts must be powers of two, got {chips}")
  dims = [1] * GENERATIONS[generation]
  while math.prod(dims) < chips:
    dims[dims.index(min(dims))] *= 2
  dims = sorted(d for d in dims if d > 1) + [d for d in dims if d == 1]  # 2x2x1, 2x2x4
  name = f"{generation}:{'x'.join(map(str, dims))}"
  bounds = tuple(dims + [1] * (3 - len(dims)))
  fits_default = all(b % d == 0 for b, d in zip(bounds, _DEFAULT_HOST_BOUNDS))
  return name, {} if fits_default else {"chips_per_host_bounds": bounds}


def topology_devices(generation: str, chips: int) -> tuple[list, str, int]:
  """The compile-only devices of `chips` chips of `generation`, the topology's name and the
  devices per chip. Needs libtpu (requirements-tpu-compile.txt); no TPU."""
  # libtpu asks a metadata server for the machine's TPU unless told not to (no TPU here), and
  # takes a host-wide lock file that a second process compiling at the same time would fail
  # on (no TPU is driven, so several may load it).
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # here only: the path that needs libtpu

  name, kwargs = topology_shape(generation, chips)
  try:
    devs = list(topologies.get_topology_desc(name, "tpu", **kwargs).devices)
  except Exception as e:  # noqa: BLE001 - libtpu missing or the shape refused: say which
    raise errors.UserError(
        f"TPU topology {name} {kwargs or ''} is not available: {e}. Compiling for TPUs needs "
        "libtpu: pip install -r requirements-tpu-compile.txt"
    ) from e
  if len(devs) % chips:
    raise errors.UserError(f"topology {name}: {len(devs)} devices for {chips} chips")
  return devs, name, len(devs) // chips


def libtpu_version() -> str | None:
  try:
    from importlib import metadata

    return metadata.version("libtpu")
  except Exception:  # noqa: BLE001 - not installed
    return None


def compile_for_chips(
    mode: str, config, generation: str, chips: int, batch_per_chip: int, num_classes: int
) -> dict:
  """One step compiled for `chips` chips of `generation` at `batch_per_chip` images per chip
  (split evenly over a chip's devices): `rows.compile_step`'s facts per device, with the
  topology, the devices per chip and the per-device batch."""
  devs, name, per_chip = topology_devices(generation, chips)
  if batch_per_chip % per_chip:
    raise errors.UserError(
        f"{generation} has {per_chip} devices per chip here: the batch per chip "
        f"({batch_per_chip}) must be a multiple of it"
    )
  facts = rows.compile_step(mode, config, devs, batch_per_chip * chips, num_classes)
  return {
      **facts,
      "topology": name,
      "chips": chips,
      "devices_per_chip": per_chip,
      "batch_per_device": batch_per_chip // per_chip,
  }


def per_chip(facts: dict) -> dict:
  """A compiled step's per-device figures as per-chip ones (x devices per chip): FLOPs,
  bytes accessed and memory footprint."""
  k = facts.get("devices_per_chip", 1)
  scale = lambda x: None if x is None else x * k
  mem = facts.get("memory") or {}
  return {
      "flops": scale(facts.get("flops")),
      "bytes_accessed": scale(facts.get("bytes_accessed")),
      **{name: scale(mem.get(name)) for name in rows_memory_fields()},
  }


def rows_memory_fields() -> tuple[str, ...]:
  return ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "footprint_bytes")


def largest_fitting(footprint: Callable[[int], float], budget: float, limit: int) -> int:
  """The largest b in 1..limit with footprint(b) <= budget (0 when b = 1 does not fit), by
  doubling and then bisection: O(log limit) calls of `footprint`. That is the largest one
  where `footprint` is non-decreasing in b; a compiled program's memory need not be (libtpu
  compiled a tiny step to 16.7 MB at 4 images per device and to 13.4 MB at 32), and then the
  answer still fits and is the largest on the search's path. Either way a larger budget never
  gives a smaller answer: every probe that fitted still fits, so each branch taken is the
  same one or one further right."""
  if footprint(1) > budget:
    return 0
  lo, hi = 1, 2
  while hi <= limit and footprint(hi) <= budget:
    lo, hi = hi, hi * 2
  hi = min(hi, limit + 1)  # lo fits; hi does not, or lies past the limit
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if footprint(mid) <= budget:
      lo = mid
    else:
      hi = mid
  return lo


def footprint_search(
    mode: str,
    config,
    devs,
    num_classes: int,
    multiple: int = 1,
    budget: float | None = None,
    label: str = "",
) -> Callable[[int], float]:
  """footprint(k): the compiled step's memory footprint per device at k x `multiple` images
  per device on `devs` (memory analysis: arguments + outputs + temporaries - aliased), each
  batch compiled once (cached across budgets). Each compile prints one line to stderr: the
  batch, the step (`mode`; `label`, e.g. the topology), the footprint, whether it fits
  `budget` (bytes per device) when one is given, and the compile's seconds."""
  cache: dict[int, float] = {}
  where = f"{mode} on {label}" if label else mode

  def footprint(k: int) -> float:
    if k not in cache:
      b = k * multiple * len(devs)
      what = f"--max_batch {where}: batch {b} ({k * multiple}/device)"
      boundary(what)
      t0 = time.perf_counter()
      try:
        facts = rows.compile_step(mode, config, devs, b, num_classes)
      except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory is an answer
        if not out_of_memory(e):
          raise
        cache[k] = math.inf  # libtpu refuses to compile a step that cannot fit its HBM
        verdict = f"does not fit: the compiler refused it ({oom_reason(e)})"
      else:
        mem = facts["memory"]
        if mem is None:
          raise errors.UserError("this compiler gives no memory analysis: no batch limit")
        cache[k] = mem["footprint_bytes"]
        verdict = f"{cache[k] / 1e9:.3g} GB/device"
        if budget is not None:
          fits = cache[k] <= budget
          verdict = (
              f"{'fits' if fits else 'does not fit'}: {cache[k] / 1e9:.3g} GB "
              f"{'<=' if fits else '>'} {budget / 1e9:.3g} GB/device"
          )
      seconds = time.perf_counter() - t0
      print(f"{what}: {verdict}, compile {seconds:.1f} s", file=sys.stderr, flush=True)
    return cache[k]

  footprint.cache = cache
  return footprint


def out_of_memory(e: Exception) -> bool:
  """Whether a compile failed because the step cannot fit the device's memory (libtpu:
  "RESOURCE_EXHAUSTED: ... CompileTimeHbmOom: Ran out of memory on HBM")."""
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text and ("HbmOom" in text or "out of memory" in text.lower())


def oom_reason(e: Exception, limit: int = 240) -> str:
  """The compiler's out-of-memory refusal in one line: the line of its message from
  RESOURCE_EXHAUSTED on (which says how much was needed and how much there is; the lines
  after it list the buffers), at most `limit` characters."""
  text = str(e)
  text = text[max(text.find("RESOURCE_EXHAUSTED"), 0) :].strip()
  line = " ".join(text.splitlines()[0].split()) if text else type(e).__name__
  return line if len(line) <= limit else line[: limit - 1] + "…"


def refused_facts(e: Exception, seconds: float) -> dict:
  """The facts of a step the compiler refused for memory (`out_of_memory`): no program, so no
  FLOPs, bytes, memory analysis or collectives; `refused` holds the compiler's reason and
  `compile_s` the seconds until the refusal (lowering included)."""
  return {
      "flops": None,
      "bytes_accessed": None,
      "memory": None,
      "collectives": {},
      "collective_list": [],
      "lower_s": 0.0,
      "compile_s": seconds,
      "refused": oom_reason(e),
  }


# What the study is doing (the last compile boundary passed): a stop's message names it.
_DOING = {"what": "starting"}


def compile_or_refusal(mode: str, config, devs, batch: int, num_classes: int) -> dict:
  """`rows.compile_step`'s facts of the step, or, where the compiler refuses it for memory, the
  facts of a step that does not fit (`refused_facts`); any other error is raised."""
  t0 = time.perf_counter()
  try:
    return rows.compile_step(mode, config, devs, batch, num_classes)
  except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory is a row
    if not out_of_memory(e):
      raise
    return refused_facts(e, time.perf_counter() - t0)  # the step cannot fit


def boundary(what: str) -> None:
  """A compile boundary of the scaling study, before `what` starts (a compile, a worker):
  where SIGINT/SIGTERM arrived inside a `stop.StopRequest` (cras_jax/base/stop.py), raises
  `stop.Stopped` (its `where`: the work that was about to start); else records `what` as the
  work under way (`doing`)."""
  stop_if_requested(f"before {what}")
  _DOING["what"] = what


def stop_if_requested(where: str) -> None:
  """Raises `stop.Stopped`, its `where` set to `where`, when SIGINT/SIGTERM arrived inside a
  `stop.StopRequest`."""
  signum = stop.requested()
  if signum is not None:
    e = stop.Stopped(signum)
    e.where = where
    raise e


def doing() -> str:
  """The work under way: what the last `boundary` passed was about to start."""
  return _DOING["what"]


def max_batch_per_chip(
    mode: str,
    config,
    devs,
    devices_per_chip: int,
    hbm_per_chip: float,
    num_classes: int,
    multiple: int = 8,
    limit_per_chip: int = 4096,
    label: str = "",
) -> dict:
  """The largest batch per chip (a multiple of `multiple` x devices per chip) whose compiled
  footprint fits the chip's HBM (each device gets HBM / devices per chip), with the
  compiles it took. Prints a line to stderr as it starts (`label`: the topology) and one per
  compile (`footprint_search`)."""
  budget = hbm_per_chip / devices_per_chip
  limit = max(1, limit_per_chip // (multiple * devices_per_chip))
  print(
      f"--max_batch {mode}{f' on {label}' if label else ''}: the largest batch per chip whose "
      f"compiled memory fits {hbm_per_chip / 1e9:.3g} GB of HBM, in multiples of "
      f"{multiple * devices_per_chip} up to {limit * multiple * devices_per_chip} (at most about "
      f"{2 * math.ceil(math.log2(limit + 1))} compiles)",
      file=sys.stderr,
      flush=True,
  )
  footprint = footprint_search(mode, config, devs, num_classes, multiple, budget, label)
  k = largest_fitting(footprint, budget, limit)
  best = footprint.cache.get(k)
  return {
      "max_batch_per_chip": k * multiple * devices_per_chip,
      "at_limit": k == limit,  # the search stopped at limit_per_chip: the batch may go higher
      "footprint_per_chip_bytes": None if best is None else best * devices_per_chip,
      "hbm_per_chip_bytes": hbm_per_chip,
      "compiles": len(footprint.cache),
  }
