"""json_safe: strict JSON from results and thresholds."""

import json
import math

import numpy as np

from cras_jax.base.jsonio import json_safe


def test_non_finite_floats_become_null_and_numpy_floats_plain():
  x = {"a": [1.5, math.nan, (np.float32(0.25), np.float64(math.inf))], "b": {"c": -math.inf}}
  out = json_safe(x)
  assert out == {"a": [1.5, None, [0.25, None]], "b": {"c": None}}
  assert type(out["a"][2][0]) is float
  assert json.loads(json.dumps(out, allow_nan=False)) == out


def test_other_values_pass_unchanged():
  x = {"n": 3, "s": "x", "t": True, "z": None}
  assert json_safe(x) == x and json_safe(x)["t"] is True
