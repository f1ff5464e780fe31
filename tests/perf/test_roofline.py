"""The scaling model's pure parts: HLO collectives, the roofline, the system table."""

import dataclasses

import pytest

from cras_jax.perf import hlo, roofline, systems

HLO = """
HloModule jit_train_step, entry_computation_layout={()}

ENTRY %main {
  %p0 = f32[32,16]{1,0} parameter(0)
  %dot.1 = f32[32,16]{1,0} fusion(%p0), kind=kLoop
  %dot.3 = bf16[8,32]{1,0} fusion(%p0), kind=kLoop
  %wrapped = f32[] fusion(%p0), kind=kLoop
  %all-reduce.3 = (f32[32,16]{1,0}, bf16[8,32]{1,0}, f32[]) all-reduce(%dot.1, %dot.3, %wrapped), channel_id=1, replica_groups=mesh['axis_0'=4,'axis_1'=1] {'axis_0'}, to_apply=%add
  %ag = f32[64,16]{1,0} all-gather(%dot.1), channel_id=2, replica_groups={{0,1},{2,3}}, dimensions={0}
  %rs-start = ((f32[32,16]{1,0}), f32[8,16]{1,0}) reduce-scatter-start(%dot.1), replica_groups=[1,4]<=[4], dimensions={0}
  %rs-done = f32[8,16]{1,0} reduce-scatter-done(%rs-start)
  %cp = f32[32,16]{1,0} collective-permute(%dot.1), source_target_pairs={{0,1},{1,0}}
  ROOT %t = (f32[]) tuple(%wrapped)
}
"""


def test_collectives_read_kinds_bytes_and_groups():
  items = hlo.collectives(HLO, num_devices=4)
  assert [c["kind"] for c in items] == [
      "all-reduce",
      "all-gather",
      "reduce-scatter",
      "collective-permute",
  ]
  ar, ag, rs, cp = items
  assert ar["operand_bytes"] == 32 * 16 * 4 + 8 * 32 * 2 + 4 and ar["group_size"] == 4
  assert ar["result_shapes"] == ["f32[32,16]", "bf16[8,32]", "f32[]"]
  assert ag["operand_bytes"] == 32 * 16 * 4 and ag["group_size"] == 2
  assert rs["operand_bytes"] == 32 * 16 * 4 and rs["group_size"] == 4
  assert cp["operand_bytes"] == 32 * 16 * 4 and cp["group_size"] == 4  # default: all devices
  summary = hlo.summarise_collectives(items)
  assert summary["all-reduce"] == {"count": 1, "operand_bytes": 2564}


def test_roofline_takes_the_binding_term_and_ring_bytes():
  s = systems.System(
      name="toy",
      flops_per_s={"float32": 1e12},
      memory_bytes_per_s=1e11,
      collective_bytes_per_s=1e10,
      collective_latency_s=1e-6,
      host_overhead_s=1e-4,
      memory_per_device_bytes=1e9,
      source="test",
  )
  ar = {"kind": "all-reduce", "operand_bytes": 10**8, "group_size": 4}
  facts = {
      "flops": 2e9,
      "bytes_accessed": 1e8,
      "collective_list": [ar],
      "memory": {"footprint_bytes": 2e9},
  }
  p = roofline.project(facts, s, "float32", 4, 32, loader_images_per_s=10.0)
  assert p["compute_s"] == pytest.approx(2e-3)
  assert p["memory_s"] == pytest.approx(1e-3)
  assert p["collective_s"] == pytest.approx(2 * 3 / 4 * 1e8 / 1e10 + 1e-6)
  assert p["binding"] == "collectives"
  assert p["step_s"] == pytest.approx(p["collective_s"] + 1e-4)
  assert p["images_per_s"] == pytest.approx(32 / p["step_s"])
  assert p["loader_bound"] and p["fits_memory"] is False
  # one device: no collective time; a shared chip charges every device's work
  one = roofline.project(
      {**facts, "collective_list": [{**ar, "group_size": 1}]}, s, "float32", 1, 8
  )
  assert one["collective_s"] == 0 and one["binding"] == "compute"
  shared = roofline.project(
      facts, systems.measured_system("cpu", 1e12, 1e11, True), "float32", 4, 32
  )
  assert shared["compute_s"] == pytest.approx(4 * 2e-3)


def test_efficiency_is_against_one_device_of_the_same_series():
  ps = [
      {"system": "a", "mode": "m", "scaling": "weak", "devices": 1, "images_per_s": 100.0},
      {"system": "a", "mode": "m", "scaling": "weak", "devices": 4, "images_per_s": 300.0},
      {"system": "a", "mode": "m", "scaling": "strong", "devices": 2, "images_per_s": 10.0},
  ]
  out = roofline.add_efficiency(ps)
  assert [p["efficiency"] for p in out] == [1.0, 0.75, None]


def test_named_systems_have_sources_and_both_dtypes():
  names = {s.name for s in systems.NAMED}
  assert names == {"H100 SXM", "H200 SXM", "TPU v5e", "TPU v4"}
  for s in systems.NAMED:
    assert s.source and set(s.flops_per_s) == {"float32", "bfloat16"}
    assert s.memory_bytes_per_s > 0 and s.collective_bytes_per_s > 0


def _host_system(**kw):
  return systems.System(
      name="toy", flops_per_s={"bfloat16": 1e14}, memory_bytes_per_s=1e12,
      collective_bytes_per_s=1e11, collective_latency_s=1e-6, host_overhead_s=1e-4,
      memory_per_device_bytes=1e10, source="test", host_link_gb_s=10.0, host_threads=16,
      chips_per_host=4, **kw,
  )  # fmt: skip


def test_end_to_end_is_the_smallest_of_the_step_and_the_host_terms_and_names_it():
  """8 chips (2 hosts of 4, 16 threads each), global batch 256, the step at 5,000 images/s;
  1 MB per image over a 10 GB/s link per chip: 8 x 1e10 / 1e6 = 80,000 images/s; 100 images/s
  per loader thread on 2 x 16 threads: 3,200; 1 ms of dispatch per step: 256,000."""
  s = _host_system()
  feed = roofline.HostFeed(bytes_per_image=1e6, loader_images_per_s_per_thread=100.0,
                           dispatch_s=1e-3)  # fmt: skip
  e = roofline.end_to_end({"images_per_s": 5000.0}, s, 8, 256, feed)
  assert e == {
      "host_link_images_per_s": 80_000.0, "loader_images_per_s": 3_200.0,
      "dispatch_images_per_s": 256_000.0, "end_to_end_images_per_s": 3_200.0,
      "bound_by": "loader",
  }  # fmt: skip
  # stored features: 8 MB per image (10,000 images/s over the links), gathered by one thread
  # per host (2 x 100 = 200 images/s)
  cached = roofline.HostFeed(8e6, 100.0, threads="one", dispatch_s=1e-3)
  e = roofline.end_to_end({"images_per_s": 5000.0}, s, 8, 256, cached)
  assert (e["host_link_images_per_s"], e["loader_images_per_s"]) == (10_000.0, 200.0)
  assert (e["end_to_end_images_per_s"], e["bound_by"]) == (200.0, "loader")
  # each term binds in its turn
  fast = roofline.HostFeed(1e6, 1e6, dispatch_s=1e-6)
  assert roofline.end_to_end({"images_per_s": 5000.0}, s, 8, 256, fast)["bound_by"] == "step"
  big = roofline.HostFeed(64e6, 1e6, dispatch_s=1e-6)  # 8 x 1e10 / 64e6 = 1,250
  e = roofline.end_to_end({"images_per_s": 5000.0}, s, 8, 256, big)
  assert (e["end_to_end_images_per_s"], e["bound_by"]) == (1_250.0, "host link")
  slow = roofline.HostFeed(1e6, 1e6, dispatch_s=0.128)  # 256 / 0.128 = 2,000
  e = roofline.end_to_end({"images_per_s": 5000.0}, s, 8, 256, slow)
  assert (e["end_to_end_images_per_s"], e["bound_by"]) == (2_000.0, "dispatch")
  # 8 loader workers per host instead of the host's 16 threads: 2 x 8 x 100
  fixed = roofline.HostFeed(1e6, 100.0, loader_threads_per_host=8, dispatch_s=1e-3)
  assert roofline.end_to_end({"images_per_s": 5e3}, s, 8, 256, fixed)["loader_images_per_s"] == 1600
  # one chip: a quarter of a host's threads; one gather thread
  assert roofline.host_terms(s, 1, 32, feed)["loader"] == 400.0
  assert roofline.host_terms(s, 1, 32, cached)["loader"] == 100.0
  # a term the system has no figure for is left out; no feed (scoring): the step alone
  unknown = dataclasses.replace(s, host_link_gb_s=None, host_threads=None)
  e = roofline.end_to_end({"images_per_s": 5000.0}, unknown, 8, 256, feed)
  assert e["host_link_images_per_s"] is None and e["loader_images_per_s"] is None
  assert (e["end_to_end_images_per_s"], e["bound_by"]) == (5000.0, "step")
  assert roofline.end_to_end({"images_per_s": 7.0}, s, 8, 256, None)["bound_by"] == "step"
  # a step that does not fit has no images/s, end to end neither
  e = roofline.end_to_end({"images_per_s": None}, s, 8, 256, feed)
  assert e["end_to_end_images_per_s"] is None and e["bound_by"] is None


def test_named_systems_have_host_figures_with_sources():
  for s in (systems.H100_SXM, systems.H200, systems.TPU_V5E):
    assert s.host_link_gb_s > 0 and s.host_threads > 0 and s.chips_per_host == 8
    assert s.host_source
  assert systems.H100_SXM.host_link_bytes_per_s == 64e9
  assert "ASSUMED" in systems.TPU_V5E.host_source  # no published figure
