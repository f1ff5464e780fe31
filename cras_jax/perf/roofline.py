"""The scaling model: a step's time on a named system as a roofline of its compiled program.

step time = max(compute, memory traffic, collectives) + host overhead, per device, where
- compute = XLA's FLOPs per device / the system's peak FLOP/s for the step's dtype;
- memory = XLA's bytes accessed per device / the memory bandwidth;
- collectives = sum over the optimised HLO's collectives of a ring algorithm's bytes on the
  wire per device / the collective bandwidth, plus a latency per collective:
  all-reduce 2 (g-1)/g B, all-gather (g-1) B (B: the operand, one device's share),
  reduce-scatter and all-to-all (g-1)/g B, collective-permute B (g: the group size).
On a system of simulated devices sharing one chip (`System.shared`, the CPU) every term is
charged n times: the devices take turns on the same cores and memory.

The max() assumes perfect overlap of the three; the real step is between that and their sum.

End to end (`end_to_end`), a training step also needs the host: per step and chip it sends the
batch (uint8 images at the crop size, or the stored features: patches x feature dim in the
cache's dtype, per image) over the system's host link, a loader produces it (a measured rate
per loader thread, times the host's threads for the image reader, or one thread per host for
the stored features' gather), and the loop's thread dispatches the step and runs its hooks (a
measured time per step). Each is a rate of images/s for all chips together; the projected
end-to-end images/s is the smallest of the step's and these (they overlap: the prefetch thread
and the async dispatch run ahead of the device), and `bound_by` names it.
"""

from __future__ import annotations

import dataclasses
import math

from cras_jax.perf.systems import System

_WIRE = {
    "all-reduce": lambda g: 2 * (g - 1) / g,
    "all-gather": lambda g: g - 1,
    "reduce-scatter": lambda g: (g - 1) / g,
    "all-to-all": lambda g: (g - 1) / g,
    "collective-permute": lambda g: 1.0,
}


def collective_seconds(collectives: list[dict], system: System) -> float:
  """Time of a step's collectives on `system` (module doc), per device."""
  total = 0.0
  for c in collectives:
    g = int(c["group_size"])
    if g <= 1:
      continue
    wire = _WIRE[c["kind"]](g) * c["operand_bytes"]
    total += wire / system.collective_bytes_per_s + system.collective_latency_s
  return total


def project(
    facts: dict,
    system: System,
    dtype: str,
    n_devices: int,
    global_batch: int,
    loader_images_per_s: float | None = None,
) -> dict:
  """Projected step time, images/s and binding resource of one compiled step (`facts`:
  cras_jax/perf/rows.compiled_facts) on `system` with `n_devices` devices."""
  share = n_devices if system.shared else 1
  flops, moved = facts.get("flops"), facts.get("bytes_accessed")
  terms = {
      "compute": share * flops / system.flops_per_s[dtype] if flops else 0.0,
      "memory": share * moved / system.memory_bytes_per_s if moved else 0.0,
      "collectives": share * collective_seconds(facts.get("collective_list", []), system),
  }
  binding = max(terms, key=terms.get)
  step_s = terms[binding] + system.host_overhead_s
  images_per_s = global_batch / step_s
  mem = (facts.get("memory") or {}).get("footprint_bytes")
  cap = system.memory_per_device_bytes
  return {
      "system": system.name,
      "devices": n_devices,
      "global_batch": global_batch,
      "compute_s": terms["compute"],
      "memory_s": terms["memory"],
      "collective_s": terms["collectives"],
      "host_overhead_s": system.host_overhead_s,
      "step_s": step_s,
      "images_per_s": images_per_s,
      "binding": binding,
      # the loader must deliver this many images/s (all hosts together) to keep up
      "input_images_per_s_needed": images_per_s,
      "loader_bound": bool(loader_images_per_s and images_per_s > loader_images_per_s),
      "fits_memory": None if not (mem and cap) else bool(mem <= cap),
  }


def add_efficiency(projections: list[dict]) -> list[dict]:
  """Scaling efficiency of each projection against one device of the same series
  (system, mode, scaling): images/s at n devices / (n x images/s at 1 device). Weak
  scaling (fixed batch per device) and strong scaling (fixed global batch) both use it."""
  base = {}
  for p in projections:
    if p["devices"] == 1:
      base[(p["system"], p["mode"], p["scaling"])] = p["images_per_s"]
  for p in projections:
    one = base.get((p["system"], p["mode"], p["scaling"]))
    p["efficiency"] = p["images_per_s"] / (p["devices"] * one) if one else None
  return projections


@dataclasses.dataclass(frozen=True)
class HostFeed:
  """The host's side of one training mode's step (measured by cras_jax/perf/loop_probe.py).

  bytes_per_image: what the host sends the device per image (`rows.input_bytes_per_image`);
  loader_images_per_s_per_thread: one loader thread's rate (read or gather, and the transfer);
  threads: "host" (the image reader: one worker per host thread, `loader_threads_per_host`
    where given) or "one" (the stored features: gathered by the prefetch thread alone, one per
    host);
  loader_threads_per_host: the reader's workers per host (`data.workers`); None: the host's
    threads;
  dispatch_s: the loop thread's own work per step (the step's dispatch and the hooks' share).
  A None rate or time leaves its term out."""

  bytes_per_image: float
  loader_images_per_s_per_thread: float | None = None
  threads: str = "host"
  loader_threads_per_host: int | None = None
  dispatch_s: float | None = None
  source: str = ""  # where the rates and the time come from


HOST_TERMS = ("host link", "loader", "dispatch")


def _hosts(system: System, n_chips: int) -> int:
  return 1 if not system.chips_per_host else math.ceil(n_chips / system.chips_per_host)


def host_terms(system: System, n_chips: int, global_batch: int, feed: HostFeed) -> dict:
  """images/s of each host term for `n_chips` chips together (module doc); None where the
  system or the feed has no figure for it."""
  link = system.host_link_bytes_per_s
  host_link = n_chips * link / feed.bytes_per_image if link and feed.bytes_per_image else None
  loader = None
  rate = feed.loader_images_per_s_per_thread
  if rate:
    if feed.threads == "one":
      loader = _hosts(system, n_chips) * rate
    else:
      per_host = feed.loader_threads_per_host or system.host_threads
      if per_host:
        # the hosts' threads shared by their chips: a part of a host for fewer chips than one
        share = n_chips / system.chips_per_host if system.chips_per_host else 1.0
        loader = per_host * share * rate
  dispatch = global_batch / feed.dispatch_s if feed.dispatch_s else None
  return {"host link": host_link, "loader": loader, "dispatch": dispatch}


def end_to_end(p: dict, system: System, n_chips: int, global_batch: int, feed) -> dict:
  """A projection `p` (its step's images/s) with the host's terms (`host_terms`): ->
  {host_link_images_per_s, loader_images_per_s, dispatch_images_per_s,
  end_to_end_images_per_s (the smallest of the step's and the host's), bound_by ("step",
  "host link", "loader" or "dispatch")}. No feed (a scoring step): the step's figure, bound
  by the step. A step without images/s (it does not fit) has none end to end either."""
  terms = host_terms(system, n_chips, global_batch, feed) if feed else dict.fromkeys(HOST_TERMS)
  out = {
      "host_link_images_per_s": terms["host link"],
      "loader_images_per_s": terms["loader"],
      "dispatch_images_per_s": terms["dispatch"],
  }
  step = p.get("images_per_s")
  if step is None:
    return {**out, "end_to_end_images_per_s": None, "bound_by": None}
  rates = {"step": step, **{k: v for k, v in terms.items() if v is not None}}
  bound = min(rates, key=rates.get)
  return {**out, "end_to_end_images_per_s": rates[bound], "bound_by": bound}
