"""Facts read from a compiled program: collectives with their bytes (from the optimised HLO
text), XLA's cost analysis (FLOPs, bytes accessed) and memory analysis, per device."""

from __future__ import annotations

import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")

_DTYPE_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
    "c64": 8,
    "c128": 16,
}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")


def shape_bytes(shape_text: str) -> int:
  """Bytes of every array shape in an HLO shape string (a tuple counts all its parts)."""
  total = 0.0
  for dtype, dims in _SHAPE.findall(shape_text):
    if dtype not in _DTYPE_BYTES:
      continue
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES[dtype]
  return int(total)


def array_shapes(shape_text: str) -> list[str]:
  """The array shapes of an HLO shape string, as "f32[32,16]" (a tuple gives all its parts)."""
  return [f"{d}[{dims}]" for d, dims in _SHAPE.findall(shape_text) if d in _DTYPE_BYTES]


def group_size(attrs: str, default: int) -> int:
  """Devices per replica group of a collective (several HLO spellings), else `default`."""
  m = re.search(r"replica_groups=\{\{([0-9,]*)\}", attrs)
  if m:
    return len([x for x in m.group(1).split(",") if x]) or default
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    axes = re.findall(r"'([^']+)'", m.group(2))
    n = 1
    for a in axes:
      n *= int(sizes.get(a, 1))
    return n
  return default


def _split_operands(rest: str) -> tuple[list[str], str]:
  """The operand names of an instruction's argument list and the attributes after it."""
  depth, i = 1, 0
  while i < len(rest) and depth:
    depth += {"(": 1, ")": -1}.get(rest[i], 0)
    i += 1
  args, attrs = rest[: i - 1], rest[i:]
  return re.findall(r"%([\w.\-]+)", args), attrs


def collectives(hlo_text: str, num_devices: int) -> list[dict]:
  """Every collective of a compiled module: kind, operand bytes (summed over a combined
  collective's operands), result bytes and group size. Async pairs count once (their
  `-start`, with the result of their `-done`: a start's own result is a tuple that may hold
  the operand and context scalars too, as TPU's collective-permute-start does); operand sizes
  come from the operands' own result shapes in the module."""
  sizes: dict[str, int] = {}
  done: dict[str, str] = {}  # a -start's name -> the shape of its -done
  found = []
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, op, rest = m.groups()
    sizes[name] = shape_bytes(shape)
    kind = op[: -len("-start")] if op.endswith("-start") else op
    if op.endswith("-done"):
      starts, _ = _split_operands(rest)
      if starts:
        done[starts[0]] = shape
      continue
    if kind not in COLLECTIVES:
      continue
    operands, attrs = _split_operands(rest)
    group = group_size(attrs, num_devices)
    found.append((kind, name, operands, shape, group))
  out = []
  for kind, name, operands, shape, group in found:
    shape = done.get(name, shape)
    result_bytes, shapes = shape_bytes(shape), array_shapes(shape)
    known = [sizes[o] for o in operands if o in sizes]
    operand_bytes = sum(known) if len(known) == len(operands) and known else None
    if operand_bytes is None:  # operands not in the text: infer from the result
      operand_bytes = {
          "all-gather": result_bytes // max(group, 1),
          "reduce-scatter": result_bytes * group,
      }.get(kind, result_bytes)
    out.append(
        {
            "kind": kind,
            "name": name,
            "operand_bytes": int(operand_bytes),
            "result_bytes": int(result_bytes),
            "group_size": int(group),
            "result_shapes": shapes,
        }
    )
  return out


def summarise_collectives(items: list[dict]) -> dict:
  """{kind: {'count', 'operand_bytes'}} over a module's collectives."""
  out: dict[str, dict] = {}
  for c in items:
    s = out.setdefault(c["kind"], {"count": 0, "operand_bytes": 0})
    s["count"] += 1
    s["operand_bytes"] += c["operand_bytes"]
  return out


def cost(compiled) -> dict:
  """XLA's cost analysis of a compiled program, per device: flops and bytes accessed (None
  where the backend gives none)."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    ca = None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  ca = ca or {}
  get = lambda k: float(ca[k]) if ca.get(k) is not None and ca[k] >= 0 else None
  return {"flops": get("flops"), "bytes_accessed": get("bytes accessed")}


def memory(compiled) -> dict | None:
  """XLA's memory analysis per device: argument, output, temporary, aliased bytes and the
  footprint (arguments + outputs + temporaries - aliased)."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    return None
  if isinstance(ma, (list, tuple)):
    ma = ma[0] if ma else None
  if ma is None:
    return None
  out = {
      "argument_bytes": int(ma.argument_size_in_bytes),
      "output_bytes": int(ma.output_size_in_bytes),
      "temp_bytes": int(ma.temp_size_in_bytes),
      "alias_bytes": int(ma.alias_size_in_bytes),
  }
  out["footprint_bytes"] = (
      out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
  )
  return out


# Top-level instructions that write no new buffer (views, tuples, parameters, constants), and
# the -start halves of async pairs (their -done is counted).
_NO_WRITE = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all")


def largest_writes(hlo_text: str, k: int = 8) -> dict:
  """Where a compiled step's bytes go: the top-level instructions of the entry computation
  (fusions, convolutions, copies, collectives, ...) by the bytes of their results, the k
  largest with their source op name (HLO metadata, the JAX code's name scope) and their share
  of all the bytes the entry computation's instructions write. Instructions inside fusions and
  loop bodies are not counted apart: a fusion's result is what it writes to memory.
  -> {"total_bytes", "ops": [{"name", "op", "shape", "bytes", "share", "source"}]}."""
  lines = hlo_text.splitlines()
  start = next((i for i, l in enumerate(lines) if l.startswith("ENTRY")), None)
  if start is None:
    return {"total_bytes": 0, "ops": []}
  found, total = [], 0
  for line in lines[start + 1 :]:
    if line.startswith("}"):
      break
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, op, _ = m.groups()
    if op in _NO_WRITE or op.endswith("-start"):
      continue
    b = shape_bytes(shape)
    total += b
    src = re.search(r'op_name="([^"]*)"', line)
    found.append({
        "name": name,
        "op": op,
        "shape": " ".join(array_shapes(shape))[:120],
        "bytes": b,
        "source": src.group(1) if src else "",
    })  # fmt: skip
  found.sort(key=lambda r: -r["bytes"])
  for r in found:
    r["share"] = r["bytes"] / total if total else 0.0
  return {"total_bytes": total, "ops": found[:k]}
