"""cras_jax.sweep and cras_jax.report: tables of hand-written results (exact values, order,
protocols, CSV), curves, sweep resumption / failures / Ctrl-C with a fake trainer, the sweep
files, and one real two-run sweep at the tiny size."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cras_jax.experiments import report, sweep
from tests.conftest import ROOT, TINY, run_command, run_module

FINAL = "final epoch"
BEST = "best epoch (reference protocol: selected on the test set)"


def write_run(workdir, metrics, protocol=FINAL, tag="final", record=None, config=None):
  os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
  res = {"metrics": metrics, "step": 10, "protocol": protocol}
  if config is not None:
    res["config"] = config
  with open(os.path.join(workdir, "results", f"metrics_{tag}.json"), "w") as f:
    json.dump(res, f)
  if record is not None:
    with open(os.path.join(workdir, "sweep_run.json"), "w") as f:
      json.dump(record, f)


def row(i_auroc, i_ap, p_auroc, p_ap, aupro):
  return dict(i_auroc=i_auroc, i_ap=i_ap, p_auroc=p_auroc, p_ap=p_ap, aupro=aupro, match_acc=1.0)


@pytest.fixture
def three_runs(tmp_path):
  """A sweep directory: runs in the order zeta, alpha, mid (sweep.json), a failed run."""
  d = tmp_path / "sw"
  write_run(
      d / "alpha",
      {
          "a": row(0.9, 0.8, 0.95, 0.3, 0.85),
          "b": row(1.0, 1.0, 0.97, 0.5, 0.9),
          "mean": row(0.95, 0.9, 0.96, 0.4, 0.875),
      },
  )
  # no mean row written: the report computes it (nanmean: the nan AUPRO is left out)
  write_run(
      d / "zeta", {"a": row(0.5, 0.6, 0.7, 0.1, float("nan")), "b": row(0.7, 0.8, 0.9, 0.3, 0.6)}
  )
  write_run(
      d / "mid",
      {
          "b": row(0.91234, 0.5, 0.5, 0.5, 0.5),
          "c": row(0.8, 0.5, 0.5, 0.5, 0.5),
          "mean": row(0.85617, 0.5, 0.5, 0.5, 0.5),
      },
  )
  os.makedirs(d / "broken")
  with open(d / "broken" / "sweep_run.json", "w") as f:
    json.dump({"status": "failed"}, f)
  os.makedirs(d / "data_cache")
  with open(d / "sweep.json", "w") as f:
    json.dump({"runs": ["zeta", "alpha", "broken", "mid"]}, f)
  return d


def test_tables(three_runs, tmp_path):
  out = tmp_path / "out"
  res = report.report([str(three_runs)], str(out), out=io.StringIO())
  assert [r["name"] for r in res["runs"]] == ["zeta", "alpha", "mid"]
  assert res["notes"] == ["broken: no metrics_final.json (sweep status: failed)"]
  md = (out / "summary_final.md").read_text().splitlines()
  assert md[0] == "Mean over classes, % (metrics_final.json); protocol: final epoch"
  assert md[2:] == [
      "| run | protocol | I-AUROC | I-AP | P-AUROC | P-AP | AUPRO |",
      "|---|---|---:|---:|---:|---:|---:|",
      "| zeta | final epoch | 60.0 | 70.0 | 80.0 | 20.0 | 60.0 |",
      "| alpha | final epoch | 95.0 | 90.0 | 96.0 | 40.0 | 87.5 |",
      "| mid | final epoch | 85.6 | 50.0 | 50.0 | 50.0 | 50.0 |",
  ]
  with open(out / "summary_final.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == ["zeta", "alpha", "mid"]
  assert {r["protocol"] for r in rows} == {FINAL}
  assert float(rows[0]["i_auroc"]) == pytest.approx(0.6, abs=1e-15)
  assert float(rows[0]["aupro"]) == 0.6 and float(rows[2]["i_auroc"]) == 0.85617
  pc = (out / "per_class_final.md").read_text().splitlines()
  assert pc[2:] == [
      "| class | zeta | alpha | mid |",
      "|---|---:|---:|---:|",
      "| a | 50.0/70.0 | 90.0/95.0 |  |",
      "| b | 70.0/90.0 | 100.0/97.0 | 91.2/50.0 |",
      "| c |  |  | 80.0/50.0 |",
      "| mean | 60.0/80.0 | 95.0/96.0 | 85.6/50.0 |",
  ]
  with open(out / "per_class_final.csv") as f:
    rows = list(csv.reader(f))
  assert rows[0] == [
      "class",
      "zeta:i_auroc",
      "zeta:p_auroc",
      "alpha:i_auroc",
      "alpha:p_auroc",
      "mid:i_auroc",
      "mid:p_auroc",
  ]
  assert rows[3][0] == "c" and rows[3][1:5] == ["", "", "", ""] and float(rows[3][5]) == 0.8
  # one metric, explicit workdirs with names, given order; nan shown as '-'
  res = report.report(
      [f"Z={three_runs / 'zeta'}", str(three_runs / "mid")],
      str(out / "two"),
      class_metrics="aupro",
      out=io.StringIO(),
  )
  assert res["per_class_md"].splitlines()[2:5] == [
      "| class | Z | mid |",
      "|---|---:|---:|",
      "| a | - |  |",
  ]


def test_protocols(three_runs, tmp_path):
  write_run(three_runs / "mid", {"b": row(0.9, 0.5, 0.5, 0.5, 0.5)}, protocol=BEST)
  with pytest.raises(report.ReportError, match="different protocols"):
    report.report([str(three_runs)], str(tmp_path / "o"), out=io.StringIO())
  assert run_command(report, str(three_runs), f"--output_dir={tmp_path / 'o'}") == 2
  res = report.report(
      [str(three_runs)], str(tmp_path / "o"), allow_mixed_protocols=True, out=io.StringIO()
  )
  md = res["summary_md"].splitlines()
  assert md[0].endswith(
      "protocol: best epoch (reference protocol: selected on the test set) / " "final epoch"
  )
  assert md[2].startswith("**Mixed protocols**")
  assert md[-1].startswith(f"| mid | {BEST} | 90.0 |")
  # the same protocol at different steps is not a mix
  for name, step in (("alpha", 30), ("zeta", 60)):
    write_run(
        three_runs / name,
        {"a": row(0.5, 0.5, 0.5, 0.5, 0.5)},
        protocol=f"checkpoint of step {step}",
        tag="eval",
    )
  res = report.report([str(three_runs)], str(tmp_path / "e"), tag="eval", out=io.StringIO())
  assert [r["name"] for r in res["runs"]] == ["zeta", "alpha"]
  assert os.path.exists(tmp_path / "e" / "summary_eval.csv")


def test_curves(tmp_path):
  d = tmp_path / "params"
  m = lambda v: {"a": row(v, v, v - 0.1, v, v), "mean": row(v, v, v - 0.1, v, v)}
  cfg = {"model": {"noise_sigma": 0.2, "levels": [2, 3], "dafs_beta": 0.3}}
  write_run(d / "default", m(0.9), record={"run_overrides": [], "config": cfg})
  write_run(
      d / "s_big",
      m(0.8),
      record={
          "run_overrides": ["--config.model.noise_sigma=0.4"],
          "overrides": ["--config.model.noise_sigma=0.4"],
      },
  )
  write_run(
      d / "s_small",
      m(0.7),
      record={
          "run_overrides": ["--config.model.noise_sigma=0.1"],
          "overrides": ["--config.model.noise_sigma=0.1"],
      },
  )
  write_run(
      d / "s_same",
      m(0.1),
      record={
          "run_overrides": ["--config.model.noise_sigma=0.2"],
          "overrides": ["--config.model.noise_sigma=0.2"],
      },
  )
  write_run(
      d / "beta",
      m(0.5),
      record={
          "run_overrides": ["--config.model.dafs_beta=0.5"],
          "overrides": ["--config.model.dafs_beta=0.5"],
      },
  )
  write_run(
      d / "lv3",
      m(0.6),
      record={
          "run_overrides": ["--config.model.levels=(3,)"],
          "overrides": ["--config.model.levels=(3,)"],
      },
  )
  # a run's checkpointed config wins over its sweep record
  ckpt = d / "lv23" / "checkpoints" / "5" / "meta"
  os.makedirs(ckpt)
  with open(ckpt / "metadata", "w") as f:
    json.dump({"config": {"model": {"levels": [1, 2, 3]}}}, f)
  write_run(
      d / "lv23",
      m(0.65),
      record={
          "run_overrides": ["--config.model.levels=(2,3)"],
          "config": {"model": {"levels": [2, 3]}},
      },
  )
  with open(d / "sweep.json", "w") as f:
    json.dump({"runs": ["default", "s_big", "s_small", "s_same", "beta", "lv3", "lv23"]}, f)
  res = report.report(
      [str(d)], curves=["model.noise_sigma", "param=model.levels"], out=io.StringIO()
  )
  sig, lev = res["curves"]
  assert sig["numeric"] and sig["x"] == [0.1, 0.2, 0.4]
  assert sig["runs"] == ["s_small", "default", "s_big"]
  assert sig["y"]["i_auroc"] == pytest.approx([70.0, 90.0, 80.0])
  assert sig["y"]["p_auroc"] == pytest.approx([60.0, 80.0, 70.0])
  assert sorted(sig["skipped"]) == [
      "beta (sets other fields)",
      "lv23 (sets other fields)",
      "lv3 (sets other fields)",
      "s_same (same model.noise_sigma as an earlier run)",
  ]
  assert not lev["numeric"] and lev["labels"] == ["(2,3)", "(3)", "(1,2,3)"]
  assert lev["runs"] == ["default", "lv3", "lv23"]
  for name, n in (("curve_model.noise_sigma_final", 3), ("curve_model.levels_final", 3)):
    png = d / "report" / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with open(d / "report" / f"{name}.csv") as f:
      assert len(list(csv.reader(f))) == n + 1


# ----------------------------------------------------------------------------- the sweep

FAKE_MAIN = textwrap.dedent('''
    """A stand-in for cras_jax.main: writes a metrics JSON, or fails, or waits for a signal."""
    import json, os, signal, sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
    workdir = args["workdir"]
    name = os.path.basename(workdir)
    with open(os.path.join(os.path.dirname(workdir), "calls.txt"), "a") as f:
      f.write(name + "\\n")
    if name in os.environ.get("FAKE_FAIL", "").split(","):
      print("fake failure: boom", flush=True)
      sys.exit(3)
    if name in os.environ.get("FAKE_WAIT", "").split(","):
      got = []
      signal.signal(signal.SIGINT, lambda s, f: got.append(s))
      open(os.path.join(workdir, "started"), "w").close()
      while not got:
        time.sleep(0.05)
      open(os.path.join(workdir, "checkpointed"), "w").close()
      sys.exit(130)
    os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
    v = 0.5 + 0.1 * len([a for a in sys.argv if a.startswith("--config.model")])
    with open(os.path.join(workdir, "results", "metrics_final.json"), "w") as f:
      json.dump({"metrics": {"x": {"i_auroc": v}, "mean": {"i_auroc": v}},
                 "protocol": "final epoch", "step": 1}, f)
    print("fake run done", flush=True)
''')


@pytest.fixture
def fake(tmp_path, monkeypatch):
  mod_dir = tmp_path / "fake_mod"
  mod_dir.mkdir()
  (mod_dir / "fake_main.py").write_text(FAKE_MAIN)
  monkeypatch.setenv("FAKE_FAIL", "")
  monkeypatch.setenv("FAKE_WAIT", "")
  return mod_dir / "fake_main.py"


def calls(sweep_dir):
  p = Path(sweep_dir) / "calls.txt"
  return p.read_text().split() if p.exists() else []


def test_sweep_resume_and_failures(tmp_path, fake, monkeypatch):
  d = tmp_path / "sw"
  launcher = [sys.executable, str(fake)]
  argv = [
      f"--sweep_dir={d}",
      "--run=a:",
      "--run=b:model.hpi=False",
      "--run=c:model.levels=(2,3),model.crd_input=raw",
      "--config.train.epochs=1",
  ]
  monkeypatch.setenv("FAKE_FAIL", "b")
  out = io.StringIO()
  assert run_command(sweep, *argv, launcher=launcher, out=out) == 1
  text = out.getvalue()
  assert "fake failure: boom" in text and "b FAILED (exit status 3)" in text
  assert "1 failed: b" in text and calls(d) == ["a", "b", "c"]
  rec = json.loads((d / "c" / "sweep_run.json").read_text())
  assert rec["status"] == "done" and rec["returncode"] == 0
  assert rec["overrides"] == [
      "--config.train.epochs=1",
      "--config.model.levels=(2,3)",
      "--config.model.crd_input=raw",
  ]
  assert rec["command"] == [
      *launcher,
      "--config=configs/demo.py",
      f"--workdir={d / 'c'}",
      f"--config.data.cache_dir={d / 'data_cache'}",
      f"--config.data.root={d / 'data'}",
      *rec["overrides"],
  ]
  assert rec["config"]["model"]["levels"] == [2, 3] and rec["config"]["train"]["epochs"] == 1
  assert rec["config"]["data"]["root"] == str(d / "data")
  assert json.loads((d / "b" / "sweep_run.json").read_text())["status"] == "failed"
  assert "boom" in (d / "b" / "sweep_log.txt").read_text()
  assert json.loads((d / "sweep.json").read_text())["runs"] == ["a", "b", "c"]
  # again: a and c are done and skipped; b is retried and now passes
  monkeypatch.setenv("FAKE_FAIL", "")
  out = io.StringIO()
  assert run_command(sweep, *argv, launcher=launcher, out=out) == 0
  assert calls(d) == ["a", "b", "c", "b"]
  assert "a (1/3): done already, skipped" in out.getvalue()
  assert json.loads((d / "b" / "sweep_run.json").read_text())["attempts"] == 2
  # an interrupted run (record, no results) resumes; changed overrides rerun
  os.remove(d / "a" / "results" / "metrics_final.json")
  argv2 = [a.replace("crd_input=raw", "crd_input=residual") for a in argv]
  out = io.StringIO()
  assert run_command(sweep, *argv2, launcher=launcher, out=out) == 0
  assert calls(d) == ["a", "b", "c", "b", "a", "c"]
  assert "a (1/3): not finished: resuming" in out.getvalue()
  assert "c (3/3): overrides changed" in out.getvalue()
  res = report.report([str(d)], out=io.StringIO())
  assert [r["name"] for r in res["runs"]] == ["a", "b", "c"]
  assert res["summary_md"].splitlines()[-3:] == [
      "| a | final epoch | 50.0 | - | - | - | - |",
      "| b | final epoch | 60.0 | - | - | - | - |",
      "| c | final epoch | 70.0 | - | - | - | - |",
  ]


@pytest.mark.parametrize("damage", ["empty", "truncated", "no_metrics"])
def test_a_damaged_final_metrics_file_is_redone_not_skipped(tmp_path, fake, damage):
  d = tmp_path / "sw"
  launcher = [sys.executable, str(fake)]
  argv = [f"--sweep_dir={d}", "--run=a:", "--config.train.epochs=1"]
  assert run_command(sweep, *argv, launcher=launcher, out=io.StringIO()) == 0
  result = d / "a" / "results" / "metrics_final.json"
  text = result.read_text()
  result.write_text(
      {"empty": "", "truncated": text[: len(text) // 2], "no_metrics": '{"step": 1}'}[damage]
  )
  out = io.StringIO()
  assert run_command(sweep, *argv, launcher=launcher, out=out) == 0
  assert calls(d) == ["a", "a"]
  assert "empty, truncated or incomplete: rerunning" in out.getvalue()
  assert "skipped" not in out.getvalue()
  assert json.loads(result.read_text())["metrics"]  # rewritten by the rerun


def test_sweep_file_dry_run_and_user_paths(tmp_path, fake):
  d = tmp_path / "sw"
  f = tmp_path / "my_sweep.py"
  f.write_text(
      "BASE_CONFIG = 'configs/mvtec.py'\nCOMMON_OVERRIDES = ['train.epochs=2']\n"
      "def get_sweep(config):\n"
      "  return {'s': ['model.noise_sigma=%r' % (2 * config['model']['noise_sigma'])]}\n"
  )
  out = io.StringIO()
  assert (
      run_command(
          sweep,
          f"--sweep={f}",
          f"--sweep_dir={d}",
          "--dry_run",
          "--run=t:model.hpi=False",
          "--override=data.root=/my/data",
          launcher=["prog"],
          out=out,
      )
      == 0
  )
  lines = out.getvalue().splitlines()
  assert lines == [
      "# s: new",
      f"prog --config=configs/mvtec.py --workdir={d / 's'} "
      f"--config.data.cache_dir={d / 'data_cache'} --config.train.epochs=2 "
      "--config.data.root=/my/data --config.model.noise_sigma=0.03",
      "# t: new",
      f"prog --config=configs/mvtec.py --workdir={d / 't'} "
      f"--config.data.cache_dir={d / 'data_cache'} --config.train.epochs=2 "
      "--config.data.root=/my/data --config.model.hpi=False",
  ]
  assert not d.exists()
  # a typo in a field name: reported, the run fails, the others go on
  out = io.StringIO()
  assert (
      run_command(
          sweep,
          f"--sweep_dir={d}",
          "--run=bad:model.hpii=False",
          "--run=ok:",
          launcher=[sys.executable, str(fake)],
          out=out,
      )
      == 0
  )  # fake ignores it
  assert "hpii" in json.loads((d / "bad" / "sweep_run.json").read_text())["config_error"]


def test_parse_overrides():
  assert sweep.parse_run_flag("n:model.levels=(2,3),--config.model.hpi=False,x.y=a,b") == (
      "n",
      ["--config.model.levels=(2,3)", "--config.model.hpi=False", "--config.x.y=a,b"],
  )
  assert sweep.parse_run_flag("full:") == ("full", [])
  assert sweep.normalise("config.a=1") == "--config.a=1"
  with pytest.raises(ValueError):
    sweep.parse_run_flag("no_colon")
  assert sweep.override_value("--config.model.levels=(2,3)") == (2, 3)
  assert sweep.override_value("--config.model.crd_input=raw") == "raw"


def test_ctrl_c_stops_the_sweep(tmp_path, fake):
  d = tmp_path / "sw"
  env = dict(os.environ, PYTHONPATH=str(fake.parent), FAKE_WAIT="x", FAKE_FAIL="")
  p = subprocess.Popen(
      [
          sys.executable,
          "-m",
          "cras_jax.sweep",
          f"--sweep_dir={d}",
          "--run=x:",
          "--run=y:",
          "--main_module=fake_main",
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  deadline = time.time() + 60
  while not (d / "x" / "started").exists():
    assert time.time() < deadline and p.poll() is None, p.stdout.read()
    time.sleep(0.05)
  p.send_signal(signal.SIGINT)
  output = p.communicate(timeout=60)[0]
  assert p.returncode == 130, output
  assert (d / "x" / "checkpointed").exists()  # the child got the signal and "checkpointed"
  assert calls(d) == ["x"] and not (d / "y").exists()
  assert json.loads((d / "x" / "sweep_run.json").read_text())["status"] == "interrupted"
  assert "stopped by SIGINT; run the same command again to resume" in output


@pytest.mark.parametrize("name", ["ablations", "dafs_variants", "crd_inputs", "params"])
def test_sweep_files_resolve(name):
  """Every run of the shipped sweep files is a valid set of overrides of the demo config."""
  module = sweep.load_sweep_module(str(Path(ROOT) / "configs" / "sweeps" / f"{name}.py"))
  base = sweep.resolve_config(str(Path(ROOT) / "configs" / "demo.py"), [])
  runs = sweep.sweep_runs(module, base)
  assert len(runs) >= 5
  for overrides in runs.values():
    config = sweep.resolve_config(str(Path(ROOT) / "configs" / "demo.py"), overrides)
    for o in overrides:
      value = sweep.override_value(o)
      got = report._lookup(config, sweep.override_key(o))
      assert got == (list(value) if isinstance(value, tuple) else value), o
  if name == "params":
    assert runs["sigma_0.06667"] == ["--config.model.noise_sigma=0.06667"]
    assert runs["levels_2"] == ["--config.model.levels=(2,)"]


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_real_sweep_two_runs(tmp_path):
  d = tmp_path / "sw"
  args = [
      f"--sweep_dir={d}",
      "--run=full:",
      "--run=wo_hpi:model.hpi=False",
      *TINY,
      "--config.train.epochs=1",
  ]
  out = run_module("cras_jax.sweep", *args)
  assert "all done" in out
  assert len(list((d / "data_cache" / "features").glob("train_*.npy"))) == 1  # shared
  out = run_module("cras_jax.sweep", *args)
  assert out.count("done already, skipped") == 2
  run_module("cras_jax.report", str(d))
  md = (d / "report" / "summary_final.md").read_text().splitlines()
  assert [l.split(" | ")[0] for l in md[4:]] == ["| full", "| wo_hpi"]
  assert all(l.split(" | ")[1] == FINAL for l in md[4:])
  with open(d / "report" / "summary_final.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == ["full", "wo_hpi"]
  assert all(0.0 <= float(r["i_auroc"]) <= 1.0 for r in rows)
