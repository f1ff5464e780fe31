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
"""

from __future__ import annotations

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
