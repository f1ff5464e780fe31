"""A weights file that cannot be used is named by the config check, before any data are
prepared: garbage, truncated, of other keys (the keys it lacks listed), or a .pth that is not
a state dict."""

import flax.serialization
import numpy as np
import pytest

from cras_jax.config import check as config_check
from cras_jax.configs import demo


def _problems(weights):
  cfg = demo.get_config()
  cfg.model.weights = str(weights)
  return [p for p in config_check.problems_of(cfg, check_files=True) if "model.weights" in p]


@pytest.mark.parametrize(
    "name,content,said",
    [
        ("garbage.msgpack", b"\x8d\x01garbage" * 100, "not a Flax weights file"),
        (
            "truncated.msgpack",
            flax.serialization.msgpack_serialize({"params": {"w": np.zeros((64, 64))}})[:500],
            "not a Flax weights file",
        ),
        (
            "other_keys.msgpack",
            flax.serialization.msgpack_serialize({"params": {"w": np.zeros(3, np.float32)}}),
            "does not match backbone 'efficientnet_lite0'",
        ),
        ("garbage.pth", b"not a pickle" * 10, "not a PyTorch state dict"),
        ("empty.pth", b"", "not a PyTorch state dict"),
    ],
)
def test_an_unusable_weights_file_is_a_config_problem(tmp_path, name, content, said):
  path = tmp_path / name
  path.write_bytes(content)
  (problem,) = _problems(path)
  assert problem.startswith(f"model.weights={str(path)!r}: ") and said in problem
  if name == "other_keys.msgpack":
    assert "missing (e.g. [" in problem and "unexpected" in problem


def test_the_shipped_weights_pass_the_check():
  assert _problems("") == []
