"""The compile-only `--target`s of `python -m cras_jax.scaling`: a TPU generation compiled by
libtpu (cras_jax/perf/tpu.py) or an NVIDIA GPU compiled by JAX's CUDA plugin
(cras_jax/perf/gpu.py), on a host that has neither; the study over them is
cras_jax/perf/target_study.py."""

from __future__ import annotations

import dataclasses

from cras_jax.perf import gpu, systems, tpu


@dataclasses.dataclass(frozen=True)
class Target:
  """A compile-only `--target`: "tpu:<generation>" or "gpu:<kind>"."""

  platform: str  # "tpu" or "gpu"
  name: str  # the TPU generation (as libtpu spells it) or the GPU kind (gpu.KINDS)

  @property
  def spec(self) -> str:
    return f"{self.platform}:{self.name}"

  @property
  def chip(self) -> systems.System:
    return (systems.TPU_CHIPS if self.platform == "tpu" else systems.GPU_CHIPS)[self.name]

  @property
  def unit(self) -> str:
    """What a count counts, in tables: "chip" (TPU) or "GPU"."""
    return "chip" if self.platform == "tpu" else "GPU"

  def devices(self, count: int) -> tuple[list, str, int]:
    """The compile-only devices of `count` chips, the topology's name, devices per chip."""
    if self.platform == "tpu":
      return tpu.topology_devices(self.name, count)
    return gpu.topology_devices(self.name, count)

  def compiler(self) -> str:
    if self.platform == "tpu":
      return f"libtpu {tpu.libtpu_version()}"
    return f"jax-cuda12-plugin {gpu.plugin_version()}"


def parse(target: str) -> Target | None:
  """`--target`: "cpu" (None: the host's own devices), "tpu:<generation>" or "gpu:<kind>"."""
  kind = gpu.parse_kind(target)
  if kind:
    return Target("gpu", kind)
  generation = tpu.parse_target(target)
  return Target("tpu", generation) if generation else None
