"""Every command's command line: a bad value exits with status 2 and one message naming it,
never a traceback. Cases run in this process (as `errors.run` runs a command: flags parsed by
`errors.parse_flags_or_exit`, `main` under `errors.exit_on_user_error`); those that need a
trained run use the session's `tiny_run`."""

import errno
import importlib
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from absl import flags

from cras_jax.base import errors, fs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = "--config=configs/demo.py"


def run_cli(module: str, args) -> int:
  """`python -m cras_jax.<module> args` in this process -> its exit status."""
  package = "tools" if module.startswith("convert_") else "cras_jax"  # tool scripts
  command = importlib.import_module(f"{package}.{module}")
  # a thin entry point (`command.run(X)`): X, the module it imports under its own name
  inner = getattr(command, module.rsplit(".", 1)[-1], None)
  command = inner if isinstance(inner, types.ModuleType) else command
  argv = [module, *map(str, args)]
  if module == "run_exported":  # argparse, jax and numpy only
    try:
      command.main(argv[1:])
    except SystemExit as e:
      return e.code
    return 0
  fv = flags.FlagValues()
  saved, sys.argv = sys.argv, argv  # config_flags reads the --config.* overrides from sys.argv
  try:
    command.define_flags(fv)
    errors.define_verbose_flag(fv)
    rest = errors.parse_flags_or_exit(argv, fv, getattr(command, "parse_flags", None))
    status = errors.exit_on_user_error(lambda a: command.main(a, fv), fv)(rest)
  except SystemExit as e:
    return e.code
  finally:
    sys.argv = saved
  return status or 0


# (command, argv with {t}: a fresh folder, {file}: an existing file, {dir}: an existing folder,
#  {run}: the tiny trained run; the expected part of the message)
CASES = [
    ("main", [DEMO, "--workdir={t}/w", "--config.train.epoch=3"], 'Did you mean "epochs"'),
    ("main", [DEMO, "--workdir={t}/w", "--config.train.epochs=abc"], "config.train.epochs=abc"),
    ("main", [DEMO, "--workdir={t}/w", "--config.model.noise_sigma=inf"], "finite"),
    ("main", [DEMO, "--workdir={t}/w", "--config.model.embed_dim=200000"], "1 to 16384"),
    ("main", [DEMO, "--workdir={t}/w", "--config.model.map_sigma=1e8"], "model.map_sigma"),
    ("main", [DEMO, "--workdir={t}/w", "--config.train.lr_adapter=1e10"], "train.lr_adapter"),
    ("main", [DEMO, "--workdir={t}/w", "--config.data.synthetic.image_size=60000"], "4096"),
    ("main", [DEMO, "--workdir={file}"], "is a file"),
    ("main", [DEMO, "--workdir=/"], "is the filesystem root"),
    ("main", [DEMO, "--workdir={readonly}/w"], "cannot be written"),
    ("main", [DEMO, "--workdir={t}/w", "--config.data.cache_dir={file}"], "data cache"),
    ("main", [DEMO, "--workdir={t}/w", "--config.data.cache_dir={readonly}/c"], "data cache"),
    (
        "main",
        [
            DEMO,
            "--workdir={t}/w",
            "--config.train.cache_features=True",
            "--config.train.feature_cache_dir={readonly}/f",
        ],
        "feature_cache_dir",
    ),
    ("main", [DEMO, "--workdir={t}/w", "--num_processes=0"], "num_processes"),
    ("main", [DEMO, "--workdir={t}/w", "--mode=fit"], "mode"),
    ("main", [DEMO, "--workdir={t}/w", "extra"], "Unexpected arguments"),
    ("predict", ["--workdir={t}/w", "--batch_size=-1", "{file}"], "--batch_size=-1"),
    ("predict", ["--workdir={t}/w", "--workers=-2", "{file}"], "--workers=-2"),
    ("predict", ["--workdir={t}/w", "--image_threshold=nan", "{file}"], "image_threshold"),
    ("predict", ["--workdir={t}/nowhere", "{file}"], "nowhere"),
    ("predict", ["--workdir={run}", "--output_dir={file}", "{image}"], "is a file"),
    ("predict", ["--workdir={run}", "--batch_size=1000000", "{image}"], "lower --batch_size"),
    ("main", [DEMO, "--workdir={t}/w", "--config.cache.compilation={file}"], "compilation cache"),
    ("main", [DEMO, "--workdir={t}/w", "--config.seed=4294967296"], "seed=4294967296"),
    ("main", [DEMO, "--workdir={t}/w", "--config.eval.batch_size=65536"], "eval.batch_size"),
    ("export", ["--workdir={t}/w", "--platforms=cpu,foo"], "unknown 'foo'"),
    ("export", ["--workdir={t}/w", "--platforms="], "choose from"),
    ("export", ["--workdir={t}/w", "--output={dir}"], "is a folder"),
    ("export", ["--workdir={t}/w", "--output={t}/no/x.npz"], "does not exist"),
    ("robustness", ["--workdir={t}/w", "--noise_std=-1"], "noise_std"),
    ("robustness", ["--workdir={t}/w", "--max_angle=inf"], "max_angle"),
    ("robustness", ["--workdir={t}/w", "--perturbations=blur"], "perturbations"),
    ("robustness", ["--workdir={t}/w", "--batch_size=0"], "batch_size"),
    ("figures", ["--workdir={t}/w", "--per_class=0"], "per_class"),
    ("figures", ["--workdir={t}/w", "--batch_size=-3"], "batch_size"),
    ("report", ["--digits=-1", "{t}"], "digits"),
    ("report", [], "give workdirs"),
    ("sweep", ["--sweep_dir={t}/s", "--run=../x:"], "run name"),
    ("sweep", ["--sweep_dir={t}/s", "--run=a:", "--only=b"], "no run named b"),
    ("sweep", ["--sweep_dir={t}/s", "--run=nocolon"], "name:override"),
    ("sweep", ["--sweep_dir={t}/s", "--sweep={t}/none.py"], "not found"),
    ("sweep", ["--sweep_dir={t}/s"], "no runs"),
    ("benchmark", ["--out={t}/b", "--batch_sizes=-8"], "batch_sizes"),
    ("benchmark", ["--out={t}/b", "--modes=fly"], "modes"),
    ("benchmark", ["--out={t}/b", "--reps=0"], "reps"),
    ("benchmark", ["--out={t}/b", "--min_rep_seconds=nan"], "min_rep_seconds"),
    ("data.synthetic.cli", ["--root={t}/s", "--image_size=60000"], "image_size"),
    ("convert_torchvision", ["--output={t}/x.msgpack", "--arch=resnet99"], "arch"),
    ("convert_visa", ["{t}"], "two arguments"),
    ("convert_visa", ["{t}", "{t}/out"], "not found"),
    ("run_exported", ["{t}/m.npz", "{empty}", "--batch_size=-1"], "--batch_size=-1"),
    ("run_exported", ["{t}/m.npz", "{empty}"], "no images"),
    ("run_exported", ["{t}/m.npz", "{empty}", "--output={dir}"], "is a folder; name the .npz"),
    ("run_exported", ["{t}/m.npz", "{empty}", "--output={t}/no/s.npz"], "does not exist"),
    ("run_exported", ["{t}/m.npz", "{empty}", "--image_threshold=nan"], "finite number"),
]


@pytest.fixture
def places(tmp_path, monkeypatch):
  file = tmp_path / "a_file.png"
  file.write_bytes(b"not an image")
  ro = tmp_path / "readonly"
  ro.mkdir()
  ro.chmod(0o500)
  if os.access(ro, os.W_OK):  # root: permissions are not enforced, the write is refused here
    real = fs.tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):
      if dir and str(dir).startswith(str(ro)):
        raise PermissionError(errno.EACCES, "Permission denied")
      return real(*a, dir=dir, **k)

    monkeypatch.setattr(fs.tempfile, "mkstemp", mkstemp)
  empty = tmp_path / "empty.npy"
  np.save(empty, np.zeros((0, 8, 8, 3), np.uint8))
  yield {"t": tmp_path, "file": file, "dir": tmp_path, "readonly": ro, "empty": empty}
  ro.chmod(0o700)


@pytest.mark.parametrize(
    "module, args, said", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_bad_command_line_exits_2_with_one_message(module, args, said, places, capsys, request):
  if any("{run}" in a or "{image}" in a for a in args):
    tiny = request.getfixturevalue("tiny_run")
    images = sorted((tiny["data_root"]).glob("*/test/good/*.png"))
    places = {**places, "run": tiny["workdir"], "image": images[0]}
  status = run_cli(module, [a.format(**places) for a in args])
  out = capsys.readouterr()
  text = out.out + out.err
  assert status == 2, text[-2000:]
  assert said in out.err, out.err[-2000:]
  assert "Traceback" not in text
  assert "error:" in out.err


def test_a_locale_without_utf8_is_refused_with_the_fix(tmp_path):
  env = dict(
      os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", PYTHONPATH=ROOT
  )
  out = subprocess.run(
      [sys.executable, "-m", "tools.convert_visa", str(tmp_path / "é"), str(tmp_path / "o")],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert out.returncode == 2, out.stderr[-2000:]
  assert "PYTHONUTF8=1" in out.stderr and "Traceback" not in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "batch,extra",
    [
        (8, []),
        pytest.param(2, [], marks=pytest.mark.slow),
        pytest.param(8, ["--config.train.population=seed=0,1"], marks=pytest.mark.slow),
    ],
)
def test_a_batch_the_devices_do_not_split_evenly_is_refused_before_any_work(batch, extra, tmp_path):
  """8 on 3 devices would drop 2 images a batch; 2 on 3 would leave a device empty; a
  population splits its batch over the same devices."""
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "cras_jax.main",
          DEMO,
          f"--workdir={tmp_path}/w",
          f"--config.train.batch_size={batch}",
          "--config.data.cache_dir=" + str(tmp_path / "c"),
      ],
      cwd=ROOT,
      env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3"),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode == 2, out.stderr[-3000:]
  assert f"train.batch_size={batch}: the batch is split evenly over the 3 devices" in out.stderr
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("*.array_record*"))
