"""The protocols that say which evaluation a run reports."""

import json

from cras_jax.method import metrics as metrics_lib
from cras_jax.results import tables as results
from cras_jax.runs import checkpoint
from cras_jax.scoring import evaluate


def _epoch(out_dir, epoch: int, run_id: str | None, auroc: float) -> None:
  table = metrics_lib.summarise({"a": {"i_auroc": auroc, "p_auroc": auroc}})
  extra = {"step": 3 * epoch, "protocol": f"per-epoch evaluation (epoch_{epoch:03d})"}
  if run_id is not None:
    extra["run_id"] = run_id
  results.write_results(table, str(out_dir), f"epoch_{epoch:03d}", extra)


def test_best_epoch_reads_only_the_epoch_files_of_its_own_run(tmp_path, capsys):
  out = tmp_path / "results"
  # An earlier run in the same workdir (its checkpoints removed) left better, later epochs;
  # a file without a run id (an older version) and a truncated one lie there too.
  for epoch, auroc in ((1, 0.99), (2, 0.98), (5, 0.97)):
    _epoch(out, epoch, "earlier", auroc)
  _epoch(out, 4, None, 1.0)
  (out / "metrics_epoch_006.json").write_text('{"metrics": {"a": ')
  _epoch(out, 1, "current", 0.6)  # the current run's epochs overwrite 1 and 2
  _epoch(out, 2, "current", 0.7)
  _epoch(out, 3, "current", 0.65)
  table = evaluate.report_best_epoch(str(tmp_path), "current")
  final = json.loads((out / "metrics_final.json").read_text())
  assert final["selected"] == "epoch_002" and final["selected_step"] == 6
  assert final["candidates"] == ["epoch_001", "epoch_002", "epoch_003"]
  assert final["run_id"] == "current" and table["mean"]["i_auroc"] == 0.7
  said = capsys.readouterr().out
  assert "3 per-epoch result file(s)" in said and "are ignored" in said
  assert "metrics_epoch_005.json" in said and "metrics_epoch_006.json" in said


def test_every_result_file_of_a_run_names_the_run_of_its_checkpoints(tiny_run):
  mngr = checkpoint.manager(str(tiny_run["workdir"]), read_only=True)
  run_id = checkpoint.restore_meta(mngr)["run_id"]
  final = json.loads((tiny_run["workdir"] / "results" / "metrics_final.json").read_text())
  assert final["run_id"] == run_id
