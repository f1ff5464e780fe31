"""Named systems for the scaling model (cras_jax/perf/roofline.py): peak compute per dtype,
memory bandwidth and collective bandwidth per device, each figure with its published source.

Figures are vendor peaks (dense, no sparsity). A float32 step runs at the float32 matmul rate
XLA uses by default on that platform: TF32 tensor cores on NVIDIA GPUs (JAX's default matmul
precision allows TF32), one bfloat16 pass on TPUs (the default precision of float32 dots and
convolutions there). "this CPU" is measured in the same run (`cpu_system`).

The host side of a training step (roofline.end_to_end): `host_link_gb_s`, the host-to-device
link per chip and direction; `host_threads`, the hardware threads (vCPUs) of one host;
`chips_per_host`, the chips one host drives. None where no figure is published (the term is
then left out, and the tables say so).
"""

from __future__ import annotations

import dataclasses

TFLOP, GB = 1e12, 1e9


@dataclasses.dataclass(frozen=True)
class System:
  name: str
  flops_per_s: dict  # dtype ("float32", "bfloat16") -> peak FLOP/s per device
  memory_bytes_per_s: float  # per device (HBM, or host DRAM for the CPU)
  collective_bytes_per_s: float  # per device, one direction: a ring step's link rate
  collective_latency_s: float  # per collective (launch and synchronisation)
  host_overhead_s: float  # per step: dispatch of the jitted step by the Python loop
  memory_per_device_bytes: float | None
  source: str
  shared: bool = False  # simulated devices sharing one chip (the CPU): peaks are for all
  host_link_gb_s: float | None = None  # host -> one chip, one direction, GB/s
  host_threads: int | None = None  # hardware threads (vCPUs) of one host
  chips_per_host: int | None = None  # None: every device on one host (this machine)
  host_source: str = ""  # where the three host figures come from

  @property
  def host_link_bytes_per_s(self) -> float | None:
    return None if self.host_link_gb_s is None else self.host_link_gb_s * GB


H100_SXM = System(
    name="H100 SXM",
    flops_per_s={"bfloat16": 989 * TFLOP, "float32": 494 * TFLOP},
    memory_bytes_per_s=3350 * GB,
    collective_bytes_per_s=450 * GB,
    collective_latency_s=10e-6,
    host_overhead_s=100e-6,
    memory_per_device_bytes=80 * GB,
    source=(
        "NVIDIA H100 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOP/s with sparsity = 989 "
        "dense; TF32 989 sparse = 494 dense (FP32 non-tensor 67); HBM3 3.35 TB/s, 80 GB; NVLink "
        "900 GB/s total = 450 GB/s per direction"
    ),
    # PCIe Gen5 x16 per GPU: the datasheet's "PCIe Gen5: 128 GB/s" counts both directions, so
    # 64 GB/s per direction theoretical (about 50 GB/s achieved in host-to-device copies).
    # Host: NVIDIA DGX H100 datasheet, dual Intel Xeon Platinum 8480C, 112 cores (224
    # threads), 8 GPUs.
    host_link_gb_s=64.0,
    host_threads=224,
    chips_per_host=8,
    host_source=(
        "H100 datasheet: PCIe Gen5 128 GB/s both directions = 64 GB/s per direction (x16); "
        "DGX H100 datasheet: 2x Xeon Platinum 8480C, 112 cores = 224 threads, 8 GPUs"
    ),
)
H200 = System(
    name="H200 SXM",
    flops_per_s={"bfloat16": 989 * TFLOP, "float32": 494 * TFLOP},
    memory_bytes_per_s=4800 * GB,
    collective_bytes_per_s=450 * GB,
    collective_latency_s=10e-6,
    host_overhead_s=100e-6,
    memory_per_device_bytes=141 * GB,
    source=(
        "NVIDIA H200 Tensor Core GPU datasheet (SXM): compute as H100 SXM (BF16 989 dense, "
        "TF32 494 dense); HBM3e 4.8 TB/s, 141 GB; NVLink 900 GB/s total = 450 per direction"
    ),
    # PCIe Gen5 x16 per GPU (datasheet: 128 GB/s both directions); host as DGX H200 / the
    # MLPerf Inference v4.1 H200-SXM-141GBx8 system: 2x Xeon Platinum 8480C, 56 cores each.
    host_link_gb_s=64.0,
    host_threads=224,
    chips_per_host=8,
    host_source=(
        "H200 datasheet: PCIe Gen5 128 GB/s both directions = 64 GB/s per direction; MLPerf "
        "Inference v4.1 system H200-SXM-141GBx8: 2x Xeon Platinum 8480C (56 cores each) = 224 "
        "threads, 8 GPUs"
    ),
)
TPU_V5E = System(
    name="TPU v5e",
    flops_per_s={"bfloat16": 197 * TFLOP, "float32": 197 * TFLOP},
    memory_bytes_per_s=819 * GB,
    collective_bytes_per_s=200 * GB,
    collective_latency_s=10e-6,
    host_overhead_s=100e-6,
    memory_per_device_bytes=16 * GB,
    source=(
        "Google Cloud TPU v5e documentation (https://cloud.google.com/tpu/docs/v5e): 197 TFLOP/s bf16, "
        "HBM2 16 GB at 819 GB/s, ICI 1,600 Gbps per chip = 200 GB/s (= the pod's 51.2 TB/s "
        "all-reduce bandwidth / 256 chips)"
    ),
    # ASSUMPTION: Google's v5e page publishes no host-to-chip figure. The JAX Scaling Book
    # ("How to Scale Your Model", part 2, jax-ml.github.io/scaling-book/tpus) gives PCIe
    # "typically around 1.5e10 bytes / second per chip" (TPU v6e 32 GB/s, "about 2x higher than
    # v5"): 15 GB/s is used. Host: the v5e page's VM types, ct5lp-hightpu-8t: 224 vCPUs, 8 chips.
    host_link_gb_s=15.0,
    host_threads=224,
    chips_per_host=8,
    host_source=(
        "host link ASSUMED 15 GB/s per chip (not published for v5e; JAX Scaling Book, part 2: "
        "PCIe typically 1.5e10 B/s per chip); cloud.google.com/tpu/docs/v5e: ct5lp-hightpu-8t, "
        "224 vCPUs, 8 chips"
    ),
)
TPU_V4 = System(
    name="TPU v4",
    flops_per_s={"bfloat16": 275 * TFLOP, "float32": 275 * TFLOP},
    memory_bytes_per_s=1200 * GB,
    collective_bytes_per_s=268 * GB,
    collective_latency_s=10e-6,
    host_overhead_s=100e-6,
    memory_per_device_bytes=32 * 2**30,
    source=(
        "Google Cloud TPU v4 documentation (https://cloud.google.com/tpu/docs/v4): 275 TFLOP/s bf16, "
        "HBM2 32 GiB at 1,200 GB/s; all-reduce bandwidth 1.1 PB/s per 4,096-chip pod = 268 GB/s "
        "per chip"
    ),
    # ASSUMPTION: no published host-link figure; the Scaling Book's typical 1.5e10 B/s per
    # chip. Hosts of 4 chips (Scaling Book's table: host size 2x2x1); vCPUs per host not taken
    # from a published page here: the loader term is left out.
    host_link_gb_s=15.0,
    chips_per_host=4,
    host_source=(
        "host link ASSUMED 15 GB/s per chip (JAX Scaling Book, part 2: PCIe typically 1.5e10 "
        "B/s per chip); 4 chips per host (its host size 2x2x1); vCPUs per host unknown here"
    ),
)
NAMED = (H100_SXM, H200, TPU_V5E, TPU_V4)

# The TPU generations `python -m cras_jax.scaling --target=tpu:<generation>` compiles for: the
# chip's figures from Google Cloud's page per generation (peak bf16 per chip; a float32 dot
# runs one bf16 pass by default, so the same rate; ICI per direction = half the bidirectional
# per-chip figure).
TPU_V5P = System(
    name="TPU v5p",
    flops_per_s={"bfloat16": 459 * TFLOP, "float32": 459 * TFLOP},
    memory_bytes_per_s=2765 * GB,
    collective_bytes_per_s=600 * GB,
    collective_latency_s=10e-6,
    host_overhead_s=100e-6,
    memory_per_device_bytes=95 * 2**30,
    source=(
        "https://cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16 per chip, HBM2e 95 GiB at "
        "2,765 GB/s; https://cloud.google.com/tpu/docs/tpu7x (table of generations): ICI "
        "1,200 GB/s bidirectional per chip = 600 GB/s per direction"
    ),
    # ASSUMPTION: host link as the Scaling Book's typical 1.5e10 B/s per chip. Host: the v5p
    # page, 4-chip VM with 208 vCPUs.
    host_link_gb_s=15.0,
    host_threads=208,
    chips_per_host=4,
    host_source=(
        "host link ASSUMED 15 GB/s per chip (JAX Scaling Book, part 2); "
        "cloud.google.com/tpu/docs/v5p: 208 vCPUs per 4-chip VM"
    ),
)
TPU_V6E = System(
    name="TPU v6e",
    flops_per_s={"bfloat16": 918 * TFLOP, "float32": 918 * TFLOP},
    memory_bytes_per_s=1638 * GB,
    collective_bytes_per_s=400 * GB,
    collective_latency_s=10e-6,
    host_overhead_s=100e-6,
    memory_per_device_bytes=32 * GB,
    source=(
        "https://cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16 per chip, HBM 32 GB at "
        "1,638 GB/s, ICI 800 GB/s bidirectional per chip = 400 GB/s per direction"
    ),
    # JAX Scaling Book, part 2: "Trillium (TPU v6e) has 32GB/s" of PCIe per chip (the v6e page:
    # a PCIe Gen5 interface per chip); 8 chips per host (v6e page). vCPUs per host not taken
    # from a published page here: the loader term is left out.
    host_link_gb_s=32.0,
    chips_per_host=8,
    host_source=(
        "JAX Scaling Book, part 2: v6e PCIe 32 GB/s per chip; cloud.google.com/tpu/docs/v6e: "
        "8 chips per host; vCPUs per host unknown here"
    ),
)
TPU_7X = System(
    name="TPU7x",
    flops_per_s={"bfloat16": 2307 * TFLOP, "float32": 2307 * TFLOP},
    memory_bytes_per_s=7380 * GB,
    collective_bytes_per_s=600 * GB,
    collective_latency_s=10e-6,
    host_overhead_s=100e-6,
    memory_per_device_bytes=192 * 2**30,
    source=(
        "https://cloud.google.com/tpu/docs/tpu7x: 2,307 TFLOP/s bf16 per chip, HBM 192 GiB at "
        "7,380 GB/s, ICI 1,200 GB/s bidirectional per chip = 600 GB/s per direction; two "
        "TensorCores per chip"
    ),
)
# libtpu's generation names -> the chip. TPU_V5E and TPU_V4 (above) cite
# https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 16 GB at 819 GB/s, ICI 400 GB/s
# bidirectional) and https://cloud.google.com/tpu/docs/v4 (275 TFLOP/s, 32 GiB at 1,200 GB/s).
TPU_CHIPS = {"v4": TPU_V4, "v5e": TPU_V5E, "v5p": TPU_V5P, "v6e": TPU_V6E, "tpu7x": TPU_7X}
# The GPUs `--target=gpu:<kind>` compiles for (cras_jax/perf/gpu.py: their target configs).
GPU_CHIPS = {"h100": H100_SXM, "h200": H200}


def per_device(chip: System, devices_per_chip: int) -> System:
  """A chip's figures for one of its `devices_per_chip` devices (libtpu's v4 and TPU7x
  topologies give one device per TensorCore, two per chip): every rate and the HBM divided
  evenly between them."""
  if devices_per_chip == 1:
    return chip
  k = devices_per_chip
  return dataclasses.replace(
      chip,
      name=f"{chip.name} (1 of {k} devices per chip)",
      flops_per_s={d: f / k for d, f in chip.flops_per_s.items()},
      memory_bytes_per_s=chip.memory_bytes_per_s / k,
      collective_bytes_per_s=chip.collective_bytes_per_s / k,
      memory_per_device_bytes=(chip.memory_per_device_bytes or 0) / k or None,
      source=f"{chip.source}; each of the chip's {k} devices gets 1/{k} of every figure",
  )


def measured_system(
    name: str,
    matmul_flops_per_s: float,
    memory_bytes_per_s: float,
    shared: bool,
    host_overhead_s: float = 100e-6,
    host_threads: int | None = None,
) -> System:
  """The local machine, from its matmul peak and memory bandwidth measured in the same run.

  On the CPU, simulated devices share its cores: `shared` makes the model charge every
  device's work to the one chip, and collectives are memory copies. Its devices are on one
  host (`host_threads` of it); a CPU device has no host link (its memory is the host's)."""
  return System(
      name=name,
      flops_per_s={"float32": matmul_flops_per_s, "bfloat16": matmul_flops_per_s},
      memory_bytes_per_s=memory_bytes_per_s,
      collective_bytes_per_s=memory_bytes_per_s / 2,  # read + write
      collective_latency_s=5e-6,
      host_overhead_s=host_overhead_s,
      memory_per_device_bytes=None,
      source="measured in the same run: float32 matmul peak and a streaming copy (probes)",
      shared=shared,
      host_threads=host_threads,
      host_source="this host's threads (os.cpu_count); no host link on a CPU",
  )
