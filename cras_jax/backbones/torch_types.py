"""The torch types a state-dict pickle names, as inert stand-ins (see `torch_pickle`).

Storage classes (``torch.FloatStorage``, ...) and dtype objects (``torch.float32``, ...) are
resolved by the restricted unpickler to the objects here, which only carry a numpy dtype.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes  # shipped with jax: bfloat16 for numpy
import numpy as np


def _bfloat16():
  return np.dtype(ml_dtypes.bfloat16)


# torch storage class name -> numpy dtype (a callable for lazily imported dtypes)
_STORAGE_DTYPES: dict[str, Any] = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": _bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}

# torch dtype objects pickle as GLOBAL 'torch <name>'
_TORCH_DTYPES: dict[str, Any] = {
    "float64": np.float64,
    "double": np.float64,
    "float32": np.float32,
    "float": np.float32,
    "float16": np.float16,
    "half": np.float16,
    "bfloat16": _bfloat16,
    "int64": np.int64,
    "long": np.int64,
    "int32": np.int32,
    "int": np.int32,
    "int16": np.int16,
    "short": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
    "complex64": np.complex64,
    "complex128": np.complex128,
}


def _resolve_dtype(d) -> np.dtype:
  return d() if callable(d) and not isinstance(d, type) else np.dtype(d)


class _StorageType:
  """Stand-in for a ``torch.<X>Storage`` class: only carries the dtype."""

  __slots__ = ("name", "_dtype")

  def __init__(self, name: str, dtype):
    self.name = name
    self._dtype = dtype

  @property
  def dtype(self) -> np.dtype:
    return _resolve_dtype(self._dtype)

  def __repr__(self):
    return f"torch.{self.name}"


class _TorchDType:
  """Stand-in for a ``torch.<dtype>`` object."""

  __slots__ = ("name", "_dtype")

  def __init__(self, name: str, dtype):
    self.name = name
    self._dtype = dtype

  def __repr__(self):
    return f"torch.{self.name}"
