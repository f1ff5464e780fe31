"""The shipped configs and sweeps by name (`--config=mvtec`, `--sweep=ablations`)."""

import os

from absl import flags

from cras_jax import configs
from cras_jax.configs import demo, mvtec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parse(*args):
  argv = ["cmd", *args]
  fv = flags.FlagValues()
  configs.define_config_flag(flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def test_names_are_the_shipped_files():
  assert configs.names() == [
      "btad",
      "combined",
      "demo",
      "folder",
      "itdd",
      "mpdd",
      "mvtec",
      "mvtec_ad2",
      "real_iad",
      "visa",
  ]
  assert configs.names(configs.SWEEPS) == ["ablations", "crd_inputs", "dafs_variants", "params"]
  # every shipped config has its short form in the repository's configs/
  assert configs.names() == sorted(
      f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py")
  )


def test_a_bare_name_is_the_shipped_file_and_other_values_pass_unchanged():
  assert configs.resolve("mvtec") == os.path.join(configs.FOLDER, "mvtec.py")
  assert configs.resolve("demo:x") == os.path.join(configs.FOLDER, "demo.py") + ":x"
  assert configs.resolve("ablations", configs.SWEEPS) == os.path.join(
      configs.SWEEPS, "ablations.py"
  )
  for value in ("configs/mvtec.py", "mvtec.py", "no_such_config", "./mvtec", "sweeps"):
    assert configs.resolve(value) == value


def test_config_by_name_equals_the_file_with_overrides():
  by_name = _parse("--config=demo", "--config.train.epochs=3", "--config.model.hpi=False")
  expected = demo.get_config()
  expected.train.epochs, expected.model.hpi = 3, False
  assert by_name.to_dict() == expected.to_dict()
  by_path = _parse(f"--config={ROOT}/configs/mvtec.py", "--config.data.crop=224")
  expected = mvtec.get_config()
  expected.data.crop = 224
  assert by_path.to_dict() == expected.to_dict()
