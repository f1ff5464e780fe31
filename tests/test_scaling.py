"""The scaling command (cras_jax/scaling.py) on 1, 2 and 4 simulated CPU devices, tiny."""

import dataclasses
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cras_jax.base import errors, fs
from cras_jax.configs import demo
from cras_jax.engine import steps
from cras_jax.perf import (
    probes,
    roofline,
    rows,
    scaling,
    scaling_model,
    scaling_report,
    systems,
    targets,
)
from tests.conftest import ROOT, run_command, run_module

# The tiny model every command-line study here compiles (64 px, D 32, 3 classes).
TINY = (
    "--config=configs/demo.py",
    "--image_size=64",
    "--embed_dim=32",
    "--pre_embed_dim=48",
    "--num_classes=3",
)


def _gradients(embed_dim: int, num_classes: int) -> tuple[list[str], int]:
  """The adapter's leaves as HLO shapes (its gradients have the same), and the bytes of the
  whole parameter tree (= of its gradients)."""
  config = demo.get_config()
  config.data.crop, config.model.embed_dim, config.model.pre_embed_dim = 64, embed_dim, 48
  spec = steps.ModelSpec(config, num_classes)
  params = jax.eval_shape(lambda: steps._initial_state(spec, 0)).params
  leaves = jax.tree.leaves(params)
  assert all(x.dtype == np.float32 for x in leaves)
  adapter = jax.tree.leaves(params["adapter"])
  return [f"f32[{','.join(map(str, x.shape))}]" for x in adapter], sum(4 * x.size for x in leaves)


@pytest.mark.slow
def test_scaling_tiny_on_simulated_devices(tmp_path):
  out = tmp_path / "scaling"
  log = run_module(
      "cras_jax.scaling",
      *TINY,
      "--devices=1,2,4",
      "--batch_per_device=2",
      "--modes=train_cached",
      "--measure=1",
      "--reps=1",
      "--loader_images_per_s=1",
      f"--out={out}",
      timeout=1200,
  )
  assert "measured / projected" in log
  result = json.loads((out / "scaling.json").read_text())
  assert (out / "scaling.md").exists() and (out / "scaling.png").stat().st_size > 0
  systems = {"this CPU", "H100 SXM", "H200 SXM", "TPU v5e", "TPU v4"}
  ps = result["projections"]
  assert {p["system"] for p in ps} == systems
  # weak scaling (2 per device) at every device count, on every system
  assert {(p["scaling"], p["devices"], p["global_batch"]) for p in ps} == {
      ("weak b2/device", 1, 2),
      ("weak b2/device", 2, 4),
      ("weak b2/device", 4, 8),
  }
  assert all(p["efficiency"] == 1.0 for p in ps if p["devices"] == 1)
  assert all(p["fits"] is True for p in ps)  # a tiny step fits every system, this host too
  assert result["host_memory"]["bytes"] > 0
  assert "| fits |" in (out / "scaling.md").read_text()
  assert not [p.name for p in out.iterdir() if p.name.startswith((".", "worker_"))]
  assert all(p["loader_bound"] for p in ps)  # 1 image/s: every projection is faster
  ratios = result["calibration"]["measured_over_projected"]
  assert list(ratios) == ["train_cached 1 dev batch 2"] and ratios["train_cached 1 dev batch 2"] > 0

  # Data parallel: the gradients are all-reduced once per step, at every device count > 1
  # (XLA combines them with the BatchNorm statistics and the loss's scalars, and may reduce a
  # leaf in parts or transposed: bytes are compared, and the adapter's kernel is found whole).
  adapter, grad_bytes = _gradients(32, 3)
  largest = max(adapter, key=lambda s: np.prod([int(d) for d in s[4:-1].split(",") if d]))
  for r in result["compiled"]:
    reduced = [
        s for c in r["facts"]["collective_list"] if c["kind"] == "all-reduce"
        for s in c["result_shapes"]
    ]  # fmt: skip
    if r["devices"] == 1:
      assert r["facts"]["collectives"] == {}
      continue
    # rows stay on their device: no all-to-all or collective-permute of features
    assert set(r["facts"]["collectives"]) <= {"all-reduce", "all-gather"}, r["facts"]["collectives"]
    assert largest in reduced
    total = r["facts"]["collectives"]["all-reduce"]["operand_bytes"]
    # beyond the gradients: BatchNorm statistics and the loss's scalars only
    assert grad_bytes <= total <= grad_bytes * 1.5, (grad_bytes, total)


def test_weak_and_strong_series():
  assert scaling_model.series([1, 2, 4], [2], [4, 6]) == [
      ("weak b2/device", 1, 2),
      ("weak b2/device", 2, 4),
      ("weak b2/device", 4, 8),
      ("strong B4", 1, 4),
      ("strong B4", 2, 4),
      ("strong B4", 4, 4),
      ("strong B6", 1, 6),
      ("strong B6", 2, 6),  # 4 does not divide 6
  ]


@pytest.mark.slow
def test_parallelism_forms_side_by_side(tmp_path):
  """--parallelism=jit,shard_map,pmap: one study per form and forms.md / forms.json; the
  explicit forms exchange the gradient tree plus the BatchNorm and DAFS statistics and the
  metrics (a few KB), the same in both; the jit form's partitioner exchanges at least that."""
  out = tmp_path / "forms"
  run_module(
      "cras_jax.scaling",
      *TINY,
      "--devices=2",
      "--batch_per_device=2",
      "--modes=train_cached",
      "--measure=",
      "--parallelism=jit,shard_map,pmap",
      f"--out={out}",
      timeout=1200,
  )
  rows = json.loads((out / "forms.json").read_text())
  assert (out / "forms.md").read_text().count("| train_cached |") == 3
  assert "| fits |" in (out / "forms.md").read_text() and all(r["fits"] for r in rows)
  for form in ("jit", "shard_map", "pmap"):
    assert json.loads((out / form / "scaling.json").read_text())["parallelism"] == form
  reduced = {r["form"]: r["collectives"]["all-reduce"]["operand_bytes"] for r in rows}
  _, grad_bytes = _gradients(32, 3)
  assert reduced["shard_map"] == reduced["pmap"]
  assert grad_bytes <= reduced["shard_map"] < grad_bytes + 4096
  assert reduced["jit"] >= reduced["shard_map"]


# ----------------------------------------------------------------------------- fits, refusals


def _facts(footprint_per_device: float) -> dict:
  """A compiled step's facts (rows.compiled_facts) with the given memory per device."""
  return {
      "flops": 1e9, "bytes_accessed": 1e8, "collectives": {}, "collective_list": [],
      "memory": {
          "argument_bytes": 1e6, "output_bytes": 1e6, "temp_bytes": footprint_per_device - 2e6,
          "alias_bytes": 0, "footprint_bytes": footprint_per_device,
      },
      "lower_s": 0.01, "compile_s": 0.02,
  }  # fmt: skip


def test_every_projection_says_whether_the_step_fits_and_one_that_does_not_has_no_images_per_s(
    tmp_path,
):
  """50 GB per device: fits an H100 (80 GB), not a v5e chip (16 GB); on this CPU (the host's
  64 GB shared by its simulated devices) one device fits and two (100 GB) do not. A row that
  does not fit says why, and shows no images/s, step time or efficiency: it could not run."""
  here = systems.measured_system("this CPU", 1e11, 1e10, shared=True)
  plan = scaling_model.series([1, 2], [2], [])
  compiled = [
      {"mode": "train", "devices": n, "global_batch": g, "facts": _facts(50e9)} for _, n, g in plan
  ]
  ps = scaling_model.project_all(
      compiled, plan, (here, systems.H100_SXM, systems.TPU_V5E), "float32", None,
      (64e9, "available host memory"),
  )  # fmt: skip
  fits = {(p["system"], p["devices"]): p["fits"] for p in ps}
  assert fits == {
      ("this CPU", 1): True, ("this CPU", 2): False,
      ("H100 SXM", 1): True, ("H100 SXM", 2): True,
      ("TPU v5e", 1): False, ("TPU v5e", 2): False,
  }  # fmt: skip
  for p in ps:
    assert isinstance(p["fits"], bool)
    if p["fits"]:
      assert p["images_per_s"] > 0 and p["does_not_fit"] is None
    else:
      assert p["images_per_s"] is None and p["efficiency"] is None and not p["loader_bound"]
      assert p["images_per_s_if_it_fit"] > 0  # the roofline's figure, named for what it is
  v5e = next(p for p in ps if p["system"] == "TPU v5e")
  assert v5e["does_not_fit"] == "50 GB > 16 GB per device"
  cpu2 = next(p for p in ps if (p["system"], p["devices"]) == ("this CPU", 2))
  assert cpu2["does_not_fit"].startswith("100 GB > 64 GB of available host memory, for 2 ")
  assert cpu2["memory_needed_bytes"] == 100e9 and cpu2["memory_available_bytes"] == 64e9

  result = {
      "config": "c", "model": "m", "simulated": True, "modes": ["train"],
      "environment": {"platform": "cpu", "jax": jax.__version__},
      "calibration": {"matmul_flops_per_s": 1e11, "memory_bytes_per_s": 1e10},
      "optimiser_note": "", "host_memory": {"bytes": 64e9, "what": "available host memory"},
      "systems": [{"name": "x", "source": "y"}], "compiled": compiled, "projections": ps,
  }  # fmt: skip
  md = scaling_report.markdown(result)
  header = next(line for line in md.splitlines() if line.startswith("| scaling |"))
  assert "| fits |" in header
  fits_col = header.split(" | ").index("fits")
  images_col = header.split(" | ").index("images/s")
  table = [line for line in md.splitlines() if line.startswith("| weak ")]
  assert len(table) == len(ps)
  for line, p in zip(table, ps):
    cells = line.split(" | ")
    assert cells[fits_col] == ("yes" if p["fits"] else "no")
    if not p["fits"]:
      assert cells[images_col] == f"(does not fit: {p['does_not_fit']})", line
      assert cells[images_col - 1] == "–"  # no step time
  assert "64 GB of available host memory" in md
  scaling_report.plot(result, str(tmp_path / "scaling.png"))  # rows without images/s: no points
  assert (tmp_path / "scaling.png").stat().st_size > 0


def test_projections_show_the_step_alone_and_end_to_end_with_what_binds():
  """Training rows end to end: min(step, host link, loader, dispatch), named; a scoring row
  has the step alone. Hand-set feeds, global batch 2 on one chip: images read at 10 per
  thread on 224 / 8 threads per chip = 280 images/s (loader); stored features of 4 MB with
  1 ms of dispatch per step: 2 / 1e-3 = 2,000 images/s (dispatch; the links carry 3,750
  on a v5e chip, 16,000 on an H100)."""
  feeds = {
      "train": roofline.HostFeed(1e6, 10.0, dispatch_s=None),
      "train_cached": roofline.HostFeed(4e6, 1e9, threads="one", dispatch_s=1e-3),
  }
  plan = scaling_model.series([1], [2], [])
  compiled = [
      {"mode": m, "devices": 1, "global_batch": 2, "facts": _facts(1e9)}
      for m in ("train", "train_cached", "score")
  ]
  ps = scaling_model.project_all(
      compiled, plan, (systems.H100_SXM, systems.TPU_V5E), "bfloat16", None, None, feeds
  )
  by = {(p["mode"], p["system"]): p for p in ps}
  for system in ("H100 SXM", "TPU v5e"):
    train, cached, score = (by[(m, system)] for m in ("train", "train_cached", "score"))
    assert (train["end_to_end_images_per_s"], train["bound_by"]) == (280.0, "loader")
    assert (cached["end_to_end_images_per_s"], cached["bound_by"]) == (2000.0, "dispatch")
    assert score["end_to_end_images_per_s"] == score["images_per_s"] > 2000
    assert score["bound_by"] == "step"
    for p in (train, cached):  # the step alone is kept as it was
      assert p["images_per_s"] == 2 / p["step_s"] > p["end_to_end_images_per_s"]
  assert by[("train_cached", "TPU v5e")]["host_link_images_per_s"] == 3750.0
  assert by[("train_cached", "H100 SXM")]["host_link_images_per_s"] == 16000.0

  result = {
      "config": "c", "model": "m", "simulated": False, "modes": ["train", "train_cached"],
      "environment": {"platform": "cpu", "jax": jax.__version__},
      "calibration": {"matmul_flops_per_s": 1e11, "memory_bytes_per_s": 1e10},
      "optimiser_note": "", "host_memory": {"bytes": None, "what": ""},
      "host_feeds": {m: dataclasses.asdict(f) for m, f in feeds.items()},
      "systems": [{"name": "TPU v5e", "source": "y", "host_link_gb_s": 15.0, "host_threads": 224,
                   "chips_per_host": 8, "host_source": "z"}],
      "compiled": compiled, "projections": ps,
  }  # fmt: skip
  md = scaling_report.markdown(result)

  def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]

  header = cells(next(line for line in md.splitlines() if line.startswith("| scaling |")))
  e2e, bound, step = (header.index(k) for k in ("end-to-end images/s", "bound by", "images/s"))
  assert len([line for line in md.splitlines() if line.startswith("| weak ")]) == 4
  train_table = md.split("### train\n")[1].split("### train_cached")[0]
  rows_ = {
      cells(line)[1]: cells(line) for line in train_table.splitlines() if line.startswith("| weak ")
  }
  v5e_train = rows_["TPU v5e"]
  assert (v5e_train[e2e], v5e_train[bound]) == ("280", "loader")
  assert float(v5e_train[step]) == pytest.approx(by[("train", "TPU v5e")]["images_per_s"], 1e-3)
  assert "- train_cached: 4 MB per image over the host link" in md
  assert "- TPU v5e: host link 15 GB/s per chip, 224 host threads, 8 chips per host (z)" in md


REFUSAL = (
    "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory "
    "required for HLO temporaries (23.38G) exceeds available HBM (15.75G)."
)


@pytest.fixture
def fake_tpu(monkeypatch):
  """--target=tpu:v5e without libtpu: this host's CPU device as a 1-chip v5e topology, and a
  compiler whose memory grows by 1 GB per image per device and which refuses (libtpu's
  RESOURCE_EXHAUSTED) more than 24 images per device. -> the batches compiled."""
  batches = []

  def compile_step(mode, config, devs, batch, num_classes):
    batches.append(batch)
    per_device = batch // len(devs)
    if per_device > 24:
      raise jax.errors.JaxRuntimeError(REFUSAL + "\n\nmore lines of the compiler's dump")
    return _facts(1e9 * per_device)

  monkeypatch.setattr(rows, "compile_step", compile_step)
  monkeypatch.setattr(
      targets.Target, "devices", lambda self, n: (jax.devices()[:n], f"{self.name}:1x{n}", 1)
  )
  return batches


def test_a_batch_the_tpu_compiler_refuses_is_a_row_that_does_not_fit_and_the_rest_is_written(
    fake_tpu, tmp_path
):
  out = tmp_path / "v5e"
  run_command(
      scaling, *TINY, "--target=tpu:v5e", "--devices=1", "--batch_per_device=2,20,64",
      "--modes=train_cached", f"--out={out}",
  )  # fmt: skip
  assert fake_tpu == [2, 20, 64]
  result = json.loads((out / "scaling.json").read_text())
  by_batch = {p["global_batch"]: p for p in result["projections"]}
  assert [by_batch[b]["fits"] for b in (2, 20, 64)] == [True, False, False]
  assert by_batch[2]["images_per_s"] > 0
  assert by_batch[20]["does_not_fit"] == "20 GB > 16 GB per chip"  # by its memory analysis
  refused = by_batch[64]
  assert refused["images_per_s"] is None and refused["step_s"] is None
  assert refused["does_not_fit"] == f"the compiler refused it: {REFUSAL}"
  (rec,) = [r for r in result["compiled"] if r["global_batch"] == 64]
  assert rec["facts"]["refused"] == REFUSAL and rec["facts"]["memory"] is None
  md = (out / "scaling.md").read_text()
  (row,) = [line for line in md.splitlines() if line.startswith("| weak b64/device |")]
  assert f"| (does not fit: the compiler refused it: {REFUSAL}) |" in row and "| no |" in row
  assert (out / "scaling.png").stat().st_size > 0
  assert sorted(p.name for p in out.iterdir()) == ["scaling.json", "scaling.md", "scaling.png"]


def test_max_batch_prints_each_compile_to_stderr(fake_tpu, tmp_path, capsys):
  """--max_batch: a line as the search starts, then one per compile: the batch, the step,
  whether it fits (or that the compiler refused it), and the compile's seconds."""
  run_command(
      scaling, *TINY, "--target=tpu:v5e", "--devices=1", "--batch_per_device=2",
      "--modes=train_cached", "--max_batch", "--max_batch_multiple=4", f"--out={tmp_path / 'o'}",
  )  # fmt: skip
  err = capsys.readouterr().err.splitlines()
  lines = [line for line in err if line.startswith("--max_batch train_cached on v5e:1x1: batch")]
  searched = fake_tpu[1:]  # the first compile is the study's own row
  assert len(lines) == len(searched) and len(searched) > 3
  pattern = re.compile(
      r"--max_batch train_cached on v5e:1x1: batch (\d+) \((\d+)/device\): "
      r"(fits: .* GB <= 16 GB/device|does not fit: .* GB > 16 GB/device"
      r"|does not fit: the compiler refused it \(RESOURCE_EXHAUSTED: .*\)), compile \d+\.\d s$"
  )
  for batch, line in zip(searched, lines):
    m = pattern.match(line)
    assert m and int(m[1]) == batch == int(m[2]), line
  said = " ".join(lines)
  assert "fits: " in said and "GB > 16 GB" in said and "refused" in said
  assert any(
      line.startswith("--max_batch train_cached on v5e:1x1: the largest batch") for line in err
  )
  result = json.loads((tmp_path / "o" / "scaling.json").read_text())
  assert result["compiled"][0]["max_batch"]["max_batch_per_chip"] == 16  # 16 GB at 1 GB/image


# ----------------------------------------------------------------------------- --out, Ctrl-C


@pytest.mark.slow
def test_out_naming_a_file_exits_2_with_one_message_before_any_work(tmp_path):
  file = tmp_path / "a_file"
  file.write_text("mine")
  for out in (file, file / "sub"):
    got = subprocess.run(
        [sys.executable, "-m", "cras_jax.scaling", *TINY, f"--out={out}"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    text = got.stdout + got.stderr
    assert got.returncode == 2, text[-2000:]
    assert "Traceback" not in text and "calibration" not in text
    errors_said = [line for line in got.stderr.splitlines() if line.startswith("error:")]
    assert len(errors_said) == 1 and f"--out '{out}'" in errors_said[0], errors_said
  assert file.read_text() == "mine"


def test_out_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
  def no_work(*args, **kwargs):
    raise AssertionError("work started")

  monkeypatch.setattr(probes, "environment", no_work)
  monkeypatch.setattr(scaling_model, "run_count", no_work)
  readonly = tmp_path / "readonly"
  readonly.mkdir()
  real = fs.tempfile.mkstemp

  def mkstemp(*a, dir=None, **k):  # as a read-only folder refuses it (root ignores modes)
    if dir and str(dir).startswith(str(readonly)):
      raise PermissionError(errno.EACCES, "Permission denied")
    return real(*a, dir=dir, **k)

  monkeypatch.setattr(fs.tempfile, "mkstemp", mkstemp)
  with pytest.raises(errors.UserValueError, match=r"^--out .* cannot be written \(Permission"):
    run_command(scaling, *TINY, f"--out={readonly / 'study'}")
  (tmp_path / "x" / "jit" / "scaling.md").mkdir(parents=True)  # a folder where a file goes
  with pytest.raises(errors.UserValueError, match=r"^--out=.*scaling.md is a folder"):
    run_command(scaling, *TINY, "--parallelism=jit,pmap", f"--out={tmp_path / 'x'}")


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_status_130_and_nothing_half_written(tmp_path):
  """SIGINT while the CPU study's worker compiles: the worker is ended, the command prints one
  "stopped: ..." line saying what was written (nothing) and exits 130, no traceback, and --out
  holds no file (no worker file, no temporary)."""
  out = tmp_path / "study"
  proc = subprocess.Popen(
      [sys.executable, "-m", "cras_jax.scaling", *TINY, "--devices=1", "--batch_per_device=2",
       "--modes=train_cached", "--measure=", f"--out={out}"],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1"),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  said = []
  for line in proc.stdout:  # until the worker starts
    said.append(line)
    if line.startswith("--- 1 simulated device(s)"):
      break
  time.sleep(1.0)
  proc.send_signal(signal.SIGINT)
  rest, err = proc.communicate(timeout=300)
  text = "".join(said) + rest + err
  assert proc.returncode == 130, text[-3000:]
  assert "Traceback" not in text and "KeyboardInterrupt" not in text
  stopped = [line for line in err.splitlines() if line.startswith("stopped:")]
  assert stopped == [
      "stopped: SIGINT during the worker compiling on 1 simulated device(s); nothing written "
      "(a study's files are written once all its steps are compiled)"
  ], err[-3000:]
  assert list(out.iterdir()) == []


STOP_SCRIPT = """
import os, signal, sys
import jax
from absl import flags
from cras_jax.base import errors
from cras_jax.perf import rows, scaling, targets
from tests.test_scaling import _facts

def compile_step(mode, config, devs, batch, num_classes):
  if config.train.parallelism == "pmap":  # the second form's first compile: Ctrl-C
    os.kill(os.getpid(), signal.SIGINT)
  return _facts(1e9)

rows.compile_step = compile_step
targets.Target.devices = lambda self, n: (jax.devices()[:n], "v5e:1x1", 1)
scaling.define_flags()
errors.define_verbose_flag()
errors.run(scaling.main)
"""


@pytest.mark.slow
def test_ctrl_c_between_compiles_names_the_files_already_written(tmp_path):
  """A stop inside the second form's study (compiled in this process): the first form's files
  are whole and listed, the second form has none, and forms.md was not written."""
  out = tmp_path / "forms"
  got = subprocess.run(
      [sys.executable, "-c", STOP_SCRIPT, *TINY, "--target=tpu:v5e", "--devices=1",
       "--batch_per_device=2", "--modes=train_cached,score", "--parallelism=jit,pmap",
       f"--out={out}"],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
      timeout=300,
  )  # fmt: skip
  text = got.stdout + got.stderr
  assert got.returncode == 130, text[-3000:]
  assert "Traceback" not in text
  written = ", ".join(str(out / "jit" / n) for n in ("scaling.json", "scaling.md", "scaling.png"))
  stopped = [line for line in got.stderr.splitlines() if line.startswith("stopped:")]
  assert stopped == [
      f"stopped: SIGINT before compiling score for v5e:1x1, batch 2; written: {written}"
  ], got.stderr[-3000:]
  assert json.loads((out / "jit" / "scaling.json").read_text())["parallelism"] == "jit"
  assert sorted(p.name for p in out.iterdir()) == ["jit", "pmap"]
  assert list((out / "pmap").iterdir()) == []
