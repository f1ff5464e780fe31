"""An ONNX file's metadata entries read from its bytes with the standard library alone (the
protobuf wire format: `metadata_props`), so `run_onnx` checks a file before any runtime or the
onnx package sees it."""

from __future__ import annotations


def _varint(data: bytes, i: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    if i >= len(data) or shift > 63:
      raise ValueError("truncated varint")
    byte = data[i]
    value |= (byte & 0x7F) << shift
    i += 1
    if not byte & 0x80:
      return value, i
    shift += 7


def _fields(data: bytes):
  """(field number, wire type, value) of a protobuf message's top-level fields; the value is
  bytes for length-delimited fields (only their length is read: the graph is skipped)."""
  i = 0
  while i < len(data):
    key, i = _varint(data, i)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, i = _varint(data, i)
    elif wire == 2:
      n, i = _varint(data, i)
      if i + n > len(data):
        raise ValueError("truncated field")
      value, i = data[i : i + n], i + n
    elif wire in (1, 5):
      n = 8 if wire == 1 else 4
      value, i = data[i : i + n], i + n
    else:
      raise ValueError(f"wire type {wire}")
    yield field, wire, value


def metadata_props(data: bytes) -> dict[str, str]:
  """An ONNX file's metadata entries (ModelProto field 14), read from its bytes."""
  props = {}
  for field, wire, value in _fields(data):
    if field == 14 and wire == 2:
      entry = {f: v for f, w, v in _fields(value) if w == 2}
      props[entry.get(1, b"").decode("utf-8")] = entry.get(2, b"").decode("utf-8")
  return props
