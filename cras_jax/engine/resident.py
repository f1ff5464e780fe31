"""Training data resident on the devices (`data.on_device`, docs/training.md "Training data
on the devices").

The training set (the prepared images, uint8 at the crop size, or the stored features in their
dtype) is put on the devices once, its rows split along the mesh's "data" axis (rows padded
with zeros to a multiple of its size; replicated along a population's "model" axis). Each step
then sends only the batch's indices: `Resident.take` gathers the rows in one compiled program,
per device the rows it holds (the others zero), and a reduce-scatter over "data" leaves every
device its share of the batch, laid out as `Devices.put_batch` (or `put_member_batch`, for one
index row per member) lays out the host's. The sum adds zeros to each value, so the batch is
the host's batch exactly, and the step is the same compiled step: results and resume do not
depend on where the data lives. The gather is a program of its own beside the step (one more
dispatch per step, asynchronous) so that every form of the step (jit, shard_map, pmap; a
population's "map" and "vmap") takes it unchanged.

`decide` is "auto"'s rule: on the devices when the rows each device holds plus the compiled
step's footprint (its memory analysis: arguments + outputs + temporaries - aliased) are at most
`MARGIN` of the device's memory; a device that reports no memory limit (the CPU, whose devices
are the host's memory: nothing to save) keeps the data on the host.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cras_jax.base import errors

CHOICES = ("auto", "true", "false")  # schema.choices("data.on_device")
MARGIN = 0.8  # "auto": at most this share of a device's memory
AXIS = "data"


def gb(x: float) -> str:
  return f"{x / 1e9:.3g} GB"


@dataclasses.dataclass(frozen=True)
class Decision:
  on_device: bool
  why: str  # one line: the sizes compared, or why nothing was compared


def rows_per_device(n: int, data_shards: int) -> int:
  """Rows each device holds: n padded to a multiple of the data axis, split evenly."""
  return math.ceil(n / data_shards)


def bytes_per_device(n: int, data_shards: int, row_bytes: int) -> int:
  """Bytes each device holds of `n` rows of `row_bytes` each (`rows_per_device`)."""
  return rows_per_device(n, data_shards) * row_bytes


def decide(
    setting: str,
    what: str,
    resident_bytes_per_device: int,
    step_bytes: int | None,
    limit_bytes: int | None,
    margin: float = MARGIN,
) -> Decision:
  """Whether `what` (e.g. "the stored features") goes on the devices under `data.on_device`
  = `setting`. "true" with a known limit it exceeds is refused (errors.UserValueError, naming
  the field and the sizes); "auto" follows the rule of the module's docstring."""
  if setting not in CHOICES:
    raise errors.UserValueError(f"data.on_device={setting!r}: choose one of {', '.join(CHOICES)}")
  if setting == "false":
    return Decision(False, f"data.on_device=false: {what} read from the host every step")
  need = resident_bytes_per_device + (step_bytes or 0)
  sizes = f"{gb(resident_bytes_per_device)} of {what} per device"
  if step_bytes is not None:
    sizes += f" + the step's {gb(step_bytes)}"
  if limit_bytes and setting == "true" and need > limit_bytes:
    raise errors.UserValueError(
        f"data.on_device=true: {sizes} = {gb(need)} exceed the device's {gb(limit_bytes)}; "
        f"set data.on_device=false (or auto), or use more devices"
    )
  if setting == "true":
    return Decision(True, f"data.on_device=true: {sizes} on the devices")
  if not limit_bytes:
    return Decision(
        False,
        f"data.on_device=auto: {what} stay on the host (the devices report no memory limit: "
        f"on the CPU they are the host's memory)",
    )
  if step_bytes is None:
    return Decision(
        False,
        f"data.on_device=auto: {what} stay on the host (this form of the step has no memory "
        f"analysis to compare with; data.on_device=true puts them on the devices)",
    )
  fits = need <= margin * limit_bytes
  where = "on the devices" if fits else "stay on the host"
  rel = "<=" if fits else ">"
  return Decision(
      fits,
      f"data.on_device=auto: {what} {where}: {sizes} = {gb(need)} {rel} {margin:.0%} of the "
      f"device's {gb(limit_bytes)}",
  )


def device_limit(devices) -> int | None:
  """The smallest memory limit the devices report (memory_stats()["bytes_limit"]); None where
  any reports none (the CPU)."""
  limits = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend implements it
      stats = None
    if not stats or not stats.get("bytes_limit"):
      return None
    limits.append(int(stats["bytes_limit"]))
  return min(limits) if limits else None


def step_footprint(compiled) -> int | None:
  """A compiled program's memory analysis: arguments + outputs + temporaries - aliased."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if isinstance(ma, (list, tuple)):
    ma = ma[0] if ma else None
  if ma is None:
    return None
  return int(
      ma.argument_size_in_bytes
      + ma.output_size_in_bytes
      + ma.temp_size_in_bytes
      - ma.alias_size_in_bytes
  )


class Resident:
  """`n` rows of shape `row_shape` and `dtype`, read by `read(start, stop)` (host rows
  [start, stop) of the training set, start < stop <= n), on the devices of `devices`
  (`engine.sharding.Devices` or a population's), split along "data". `take(indices)`: the
  batch of those global rows ([B] -> a batch split as `put_batch` splits it; [S, B], one row
  per member -> as `put_member_batch`)."""

  def __init__(
      self, devices, n: int, row_shape: tuple, dtype, read: Callable[[int, int], np.ndarray]
  ):
    self.devices, self.n = devices, n
    mesh = devices.mesh
    self.shards = mesh.shape[AXIS]
    per = rows_per_device(n, self.shards)
    shape = (per * self.shards, *row_shape)
    self.dtype = np.dtype(dtype)
    self.bytes_per_device = bytes_per_device(
        n, self.shards, int(np.prod(row_shape)) * self.dtype.itemsize
    )
    read_once: dict[tuple[int, int], np.ndarray] = {}  # a block replicated along "model"

    def block(index) -> np.ndarray:
      lo, hi, _ = index[0].indices(shape[0])
      if (lo, hi) not in read_once:
        out = np.zeros((hi - lo, *row_shape), self.dtype)
        if lo < n:
          out[: min(hi, n) - lo] = read(lo, min(hi, n))
        read_once[(lo, hi)] = out
      return read_once[(lo, hi)]

    self.array = jax.make_array_from_callback(shape, NamedSharding(mesh, P(AXIS)), block)
    self._take = {}  # index rank -> compiled gather
    self._per = per

  def _gather(self, rank: int):
    per = self._per

    def local(rows, idx):  # one device: the rows it holds, zero elsewhere, summed over "data"
      lo = jax.lax.axis_index(AXIS) * per
      mine = (idx >= lo) & (idx < lo + per)
      got = jnp.take(rows, jnp.clip(idx - lo, 0, per - 1), axis=0)
      mask = mine.reshape(mine.shape + (1,) * (got.ndim - mine.ndim))
      got = jnp.where(mask, got, jnp.zeros((), got.dtype))
      return jax.lax.psum_scatter(got, AXIS, scatter_dimension=rank - 1, tiled=True)

    out = P(AXIS) if rank == 1 else P(None, AXIS)
    fn = jax.shard_map(
        local, mesh=self.devices.mesh, in_specs=(P(AXIS), P()), out_specs=out, check_vma=False
    )
    return jax.jit(fn, out_shardings=NamedSharding(self.devices.mesh, out))

  def take(self, indices: np.ndarray):
    """The rows `indices` (global, the same on every process) as a batch on the devices."""
    idx = np.asarray(indices, np.int32)
    if idx.ndim not in self._take:
      self._take[idx.ndim] = self._gather(idx.ndim)
    return self._take[idx.ndim](self.array, self.devices.put_replicated(idx))
