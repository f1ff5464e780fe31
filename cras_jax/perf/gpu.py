"""NVIDIA GPU programs compiled on a host without a GPU: compile-only CUDA devices from JAX's
CUDA plugin (`jax.experimental.topologies`, a GPU described by a target config shipped in
cras_jax/perf/gpu_targets/), and where the FLOPs and bytes of their steps come from.

The plugin is optional (requirements-gpu-compile.txt, no CUDA libraries): it is found by JAX
when a topology is first asked for, never at import time here. It compiles for the GPU (the
optimised HLO with its collectives, memory analysis per device) but gives no cost analysis:
the FLOPs and bytes accessed per device are taken from another compiler's cost analysis of the
same step at the same batch per device (`borrowed_cost`), and every figure says which.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import time
from collections.abc import Callable

import jax

from cras_jax.base import errors
from cras_jax.perf import rows, tpu

# --target=gpu:<kind> -> the target config (a stream_executor.GpuTargetConfigProto in text form)
# in cras_jax/perf/gpu_targets/.
KINDS = {"h100": "h100_sxm.txtpb", "h200": "h200_sxm.txtpb"}
# GPUs per host of the compiled topology (an HGX board: 8 GPUs on NVLink); more are more hosts.
GPUS_PER_HOST = 8
_INSTALL = "pip install -r requirements-gpu-compile.txt"


def parse_kind(target: str) -> str | None:
  """`--target`: "gpu:<kind>" -> the kind; anything else is not a GPU target (None)."""
  kind, _, name = target.partition(":")
  if kind != "gpu":
    return None
  if name not in KINDS:
    raise errors.UserError(
        f"--target={target!r}: GPU targets are gpu:<kind>, kinds {sorted(KINDS)}"
    )
  return name


def target_config(kind: str) -> str:
  """The shipped target config of `kind`, as text."""
  path = importlib.resources.files("cras_jax.perf").joinpath("gpu_targets", KINDS[kind])
  return path.read_text()


def topology_name(count: int) -> str:
  """The CUDA topology string ("<slices>x<hosts>x<GPUs per host>") of `count` GPUs: one host
  up to GPUS_PER_HOST, else whole hosts of GPUS_PER_HOST."""
  if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
    raise errors.UserError(
        f"GPU counts are 1 to {GPUS_PER_HOST} (one host) or multiples of {GPUS_PER_HOST} "
        f"(hosts of {GPUS_PER_HOST}), got {count}"
    )
  if count <= GPUS_PER_HOST:
    return f"1x1x{count}"
  return f"1x{count // GPUS_PER_HOST}x{GPUS_PER_HOST}"


def plugin_version() -> str | None:
  try:
    from importlib import metadata

    return metadata.version("jax-cuda12-plugin")
  except Exception:  # noqa: BLE001 - not installed
    return None


def plugin_installed() -> bool:
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # no jax_plugins at all
    return False


def cpu_backends_only() -> None:
  """JAX's own backends stay the CPU's. Where `jax_platforms` is unset and no backend has
  started yet, it is set to "cpu": the CUDA plugin is then registered for compiling without
  checking for a CUDA installation (which would fail here, and leave the plugin out), and the
  CPU devices the rest of the tool uses are unchanged. A setting made by the user (e.g.
  JAX_PLATFORMS=cpu) is kept."""
  from jax._src import xla_bridge  # no public way to ask whether backends have started

  if not jax.config.jax_platforms and not xla_bridge.backends_are_initialized():
    jax.config.update("jax_platforms", "cpu")


def topology_devices(kind: str, count: int) -> tuple[list, str, int]:
  """The compile-only devices of `count` GPUs of `kind`, the topology's name and the devices
  per GPU (1). Needs the CUDA plugin (requirements-gpu-compile.txt); no GPU, no CUDA."""
  if not plugin_installed():
    raise errors.UserError(
        f"compiling for GPUs needs JAX's CUDA plugin (no CUDA libraries): {_INSTALL}"
    )
  cpu_backends_only()
  from jax.experimental import topologies  # here only: the path that needs the plugin

  name = topology_name(count)
  try:
    topo = topologies.get_topology_desc(
        platform="cuda", target_config=target_config(kind), topology=name
    )
    devs = list(topo.devices)
  except Exception as e:  # noqa: BLE001 - the plugin not registered, or the config refused
    raise errors.UserError(
        f"GPU topology {kind}:{name} is not available: {e}. The CUDA plugin is registered for "
        "compiling only when JAX starts with JAX_PLATFORMS=cpu on a host without CUDA (set it "
        f"before JAX is first used); it is installed with {_INSTALL}"
    ) from e
  if len(devs) != count:
    raise errors.UserError(f"GPU topology {name}: {len(devs)} devices for {count} GPUs")
  return devs, f"{kind}:{name}", 1


def cost_devices(source: str) -> tuple[list, str]:
  """The devices whose compiler gives a GPU step's FLOPs and bytes accessed (the GPU compiler
  gives none), and how a table names that source: "cpu", one device of XLA:CPU (this host's);
  "tpu:<generation>", one chip of that generation compiled by libtpu (its cost analysis)."""
  cpu_backends_only()  # before the CPU backend starts: the GPU topologies need it
  if source == "cpu":
    try:
      devs = jax.devices("cpu")[:1]
    except RuntimeError as e:
      raise errors.UserError(
          f"--cost_from=cpu needs JAX's CPU backend ({e}): run with JAX_PLATFORMS=cpu"
      ) from e
    return devs, "XLA:CPU cost analysis"
  platform, _, generation = source.partition(":")
  if platform != "tpu" or generation not in tpu.GENERATIONS:
    raise errors.UserError(
        f"--cost_from={source!r}: 'cpu' or 'tpu:<generation>' with a generation of "
        f"{sorted(tpu.GENERATIONS)}"
    )
  devs, name, _ = tpu.topology_devices(generation, 1)
  return devs, f"libtpu {tpu.libtpu_version()} cost analysis ({name})"


def borrowed_cost(source: str, config, num_classes: int) -> Callable[[str, int], dict]:
  """cost(mode, batch_per_device): the FLOPs and bytes accessed per device of `mode`'s step
  at `batch_per_device` images per device, from `source`'s compile of the same step (same
  config and form) on its own devices (`cost_devices`) at that batch per device, with the
  source's name and its compile seconds. Each (mode, batch) is compiled once: 1 and 8 GPUs at
  the same batch per GPU share it. The other compiler's program is the same step; its
  arithmetic per device is the GPU's (the GPU step's collectives add no FLOPs to speak of),
  its bytes accessed are its own fusion's."""
  devs, label = cost_devices(source)
  cache: dict[tuple[str, int], dict] = {}

  def cost(mode: str, batch_per_device: int) -> dict:
    key = (mode, batch_per_device)
    if key not in cache:
      tpu.boundary(f"compiling {mode} at {batch_per_device} per device for its cost ({label})")
      t0 = time.perf_counter()
      facts = rows.compile_step(mode, config, devs, batch_per_device * len(devs), num_classes)
      cache[key] = {
          "flops": facts["flops"],
          "bytes_accessed": facts["bytes_accessed"],
          "cost_source": label,
          "cost_compile_s": time.perf_counter() - t0,
      }
      print(
          f"{mode} at {batch_per_device} per device, for its FLOPs and bytes: {label}, "
          f"compiled in {cache[key]['cost_compile_s']:.1f} s",
          flush=True,
      )
    return cache[key]

  return cost
