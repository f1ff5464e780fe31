"""cras_jax/perf/hlo.py on the forms of TPU-optimised HLO (written as libtpu prints them:
tiled layouts, mesh replica groups, async start/done pairs whose start returns a tuple)."""

import jax
import jax.numpy as jnp
import pytest

from cras_jax.perf import hlo

TPU_HLO = """
HloModule jit_train_step, entry_computation_layout={()}

ENTRY %main {
  %p0 = f32[32,16]{1,0:T(8,128)} parameter(0)
  %fusion.1 = f32[128]{0:T(128)} fusion(%p0), kind=kLoop
  %fusion.2 = bf16[2,1,1,128]{3,2,1,0:T(2,128)(2,1)} fusion(%p0), kind=kLoop
  %all-reduce = f32[]{:T(128)} all-reduce(%fusion.1), channel_id=1, replica_groups=mesh['axis_0'=4,'axis_1'=1] {'axis_0','axis_1'}, use_global_device_ids=true, to_apply=%add
  %all-reduce.2 = (f32[32,16]{1,0:T(8,128)}, f32[128]{0:T(128)S(1)}) all-reduce(%p0, %fusion.1), channel_id=2, replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, to_apply=%add
  %collective-permute-start = (f32[128]{0:T(128)}, f32[128]{0:T(128)}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%fusion.1), channel_id=3, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %collective-permute-done = f32[128]{0:T(128)} collective-permute-done(%collective-permute-start)
  %all-to-all = bf16[2,1,1,128]{3,2,1,0:T(2,128)(2,1)} all-to-all(%fusion.2), channel_id=4, replica_groups={{0,1,2,3}}, dimensions={0}
  %all-reduce-start = f32[32,16]{1,0:T(8,128)} all-reduce-start(%p0), channel_id=5, replica_groups=[1,4]<=[4], to_apply=%add
  %all-reduce-done = f32[32,16]{1,0:T(8,128)} all-reduce-done(%all-reduce-start)
  ROOT %t = (f32[]) tuple(%all-reduce)
}
"""


def test_tpu_collectives_read_kinds_bytes_and_groups():
  items = hlo.collectives(TPU_HLO, num_devices=4)
  assert [(c["kind"], c["name"]) for c in items] == [
      ("all-reduce", "all-reduce"),
      ("all-reduce", "all-reduce.2"),
      ("collective-permute", "collective-permute-start"),
      ("all-to-all", "all-to-all"),
      ("all-reduce", "all-reduce-start"),
  ]
  scalar, combined, permute, a2a, started = items
  assert scalar["operand_bytes"] == 128 * 4 and scalar["group_size"] == 4
  assert combined["operand_bytes"] == 32 * 16 * 4 + 128 * 4 and combined["group_size"] == 2
  assert combined["result_shapes"] == ["f32[32,16]", "f32[128]"]
  assert a2a["operand_bytes"] == a2a["result_bytes"] == 2 * 128 * 2
  assert started["operand_bytes"] == started["result_bytes"] == 32 * 16 * 4
  assert started["group_size"] == 4


def test_an_async_pair_counts_once_with_the_result_of_its_done():
  (permute,) = [c for c in hlo.collectives(TPU_HLO, 4) if c["kind"] == "collective-permute"]
  # the start's tuple holds the operand, the result and two context scalars: only the
  # done's result is what arrives
  assert permute["operand_bytes"] == permute["result_bytes"] == 128 * 4
  assert permute["result_shapes"] == ["f32[128]"]
  summary = hlo.summarise_collectives(hlo.collectives(TPU_HLO, 4))
  assert summary["collective-permute"] == {"count": 1, "operand_bytes": 512}
  assert summary["all-reduce"]["count"] == 3


LARGEST_WRITES_HLO = """HloModule m, entry_computation_layout={(f32[8,16]{1,0})->f32[8,16]{1,0}}

%fused (p: f32[8,16]) -> f32[8,16,4] {
  %p = f32[8,16]{1,0} parameter(0)
  ROOT %b = f32[8,16,4]{2,1,0} broadcast(%p), dimensions={0,1}
}

ENTRY %main (x: f32[8,16]) -> f32[8,16] {
  %x = f32[8,16]{1,0} parameter(0)
  %c = f32[] constant(0)
  %stack = f32[8,16,4]{2,1,0} fusion(%x), kind=kLoop, calls=%fused, metadata={op_name="jit(step)/aggregate/stack"}
  %ar-start = f32[8,16]{1,0} all-reduce-start(%x), replica_groups={}, to_apply=%add
  %ar-done = f32[8,16]{1,0} all-reduce-done(%ar-start)
  %t = (f32[8,16]{1,0}, f32[]) tuple(%ar-done, %c)
  %g = f32[8,16]{1,0} get-tuple-element(%t), index=0
  ROOT %out = bf16[8,16]{1,0} convert(%g), metadata={op_name="jit(step)/convert_element_type"}
}
"""


def test_largest_writes_counts_the_entry_computations_new_buffers():
  """Fusions, collectives (their -done) and converts write; parameters, constants, tuples and
  views do not; instructions inside fused computations are not counted apart."""
  lw = hlo.largest_writes(LARGEST_WRITES_HLO, k=2)
  assert lw["total_bytes"] == 8 * 16 * 4 * 4 + 8 * 16 * 4 + 8 * 16 * 2
  assert [(o["op"], o["bytes"], o["source"]) for o in lw["ops"]] == [
      ("fusion", 2048, "jit(step)/aggregate/stack"),
      ("all-reduce-done", 512, ""),
  ]
  assert lw["ops"][0]["share"] == pytest.approx(2048 / (2048 + 512 + 256))


def test_largest_writes_of_a_compiled_program_name_its_source():
  x = jax.ShapeDtypeStruct((128, 256), jnp.float32)
  compiled = jax.jit(lambda x: jnp.sin(x) * 2).lower(x).compile()
  lw = hlo.largest_writes(compiled.as_text())
  assert lw["ops"][0]["bytes"] == 128 * 256 * 4
  assert "sin" in lw["ops"][0]["source"] or "mul" in lw["ops"][0]["source"]
