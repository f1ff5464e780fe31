"""Evaluation on the test split, and the protocols that say which model is reported.

`evaluate` scores a model's test split with a `scoring.Scorer` and writes its per-class
metrics (I-AUROC, I-AP, P-AUROC, P-AP, AUPRO, match_acc) to <workdir>/results; a dataset with a
validation split (MVTec AD 2) also gets its thresholds fitted there and SegF1 and I-F1 at them
(`ad2_evaluation.evaluate`). Protocols (`config.eval.protocol`): `final` reports the last epoch;
`best_epoch` (the reference code's) evaluates every epoch and reports the one with the best
mean I-AUROC + P-AUROC on the test set, labelled as selected on it (`report_best_epoch`).
`evaluate_checkpoint` scores a workdir's latest checkpoint alone.
"""

from __future__ import annotations

import glob
import math
import os
import time

import jax

from cras_jax.base import fileio, progress
from cras_jax.config import check as config_check
from cras_jax.data import combined
from cras_jax.method import metrics as metrics_lib
from cras_jax.results import summaries
from cras_jax.results import tables as results
from cras_jax.runs import named_inputs, specs, trained
from cras_jax.runs import workdir as runs
from cras_jax.scoring import ad2_evaluation, scoring

BEST_EPOCH_LABEL = "best epoch (reference protocol: selected on the test set)"


def evaluate(
    scorer: scoring.Scorer,
    dataset,
    config,
    workdir: str,
    tag: str = "final",
    heatmaps: bool = True,
    with_thresholds: bool = False,
    results_dir: str | None = None,
    run_info: dict | None = None,
) -> dict:
  """Per-class metrics of docs/method.md §10 on the test split, written to workdir/results.

  scorer: the model to evaluate (its state set); tag: final, eval or epoch_NNN.
  with_thresholds: also write workdir/thresholds.json (per-class normalisation, image and
  pixel thresholds; `scoring.write_thresholds`) from these scores; the metrics are unchanged.
  results_dir: where the results (and thresholds.json) go instead (a population's member:
  workdir/results/<member>).
  run_info: `run_id` (the run's, recorded in the files: `report_best_epoch` reads only its
  own run's) and `data_note` (a sentence when the test images are not the run's recorded
  ones: written in every result file).
  """
  t0 = time.time()
  res = scorer.predict_dataset(dataset.test)
  seconds = time.time() - t0
  table = results.class_metrics(res, dataset.class_names, config.eval.fpr_limit)
  ad2 = None
  if getattr(dataset, "validation", None) is not None:  # MVTec AD 2: thresholds, SegF1

    table, ad2 = ad2_evaluation.evaluate(scorer, dataset, table, res)
  out_dir = results_dir or os.path.join(workdir, "results")
  step = scorer.model_step
  protocol = {"final": "final epoch", "eval": f"checkpoint of step {step}"}.get(
      tag, f"per-epoch evaluation ({tag})"
  )
  extra = {
      "step": step,
      "protocol": protocol,
      "score_mode": config.model.score_mode,
      "matching": config.model.matching,
      "test_images": len(res["scores"]),
      "score_seconds": seconds,
      **(ad2.extra() if ad2 is not None else {}),
      **{k: v for k, v in (run_info or {}).items() if v is not None},
  }
  if config.data.name == combined.NAME:  # one model across datasets: each dataset's mean too
    extra["by_dataset"] = metrics_lib.group_means(table, combined.dataset_of)
  if jax.process_index() == 0:
    results.write_results(table, out_dir, tag, extra)
    results.write_scores(res, dataset.class_names, os.path.join(out_dir, f"scores_{tag}.csv"))
  print(
      f"\n[{tag}] step {step}, {len(res['scores'])} test images scored in "
      f"{seconds:.1f}s (protocol: {extra['protocol']}; image score: {config.model.score_mode})"
  )
  print(results.markdown(table), flush=True)
  if "by_dataset" in extra:
    print(results.markdown(extra["by_dataset"], title=results.BY_DATASET), flush=True)
  if heatmaps and jax.process_index() == 0:
    results.save_heatmaps(
        res, dataset.class_names, os.path.join(out_dir, "heatmaps"), config.eval.num_heatmaps
    )
  # A population's member: its own board, results/<member>/tensorboard/.
  summaries.for_workdir(results_dir or workdir, specs.tensorboard(config)).evaluation(
      step, table, res if heatmaps else None, dataset.class_names
  )
  if with_thresholds and ad2 is not None:  # MVTec AD 2: fitted on the validation split above
    info = run_info or {}
    ad2_evaluation.write_thresholds(
        ad2.thresholds, results_dir or workdir, info.get("run_id"), info.get("member")
    )
  elif with_thresholds:  # per image: the evaluation's scores serve when it matched per image
    per_image = scorer.per_image()
    scoring.write_thresholds(
        per_image,
        dataset.test,
        dataset.class_names,
        results_dir or workdir,
        res if per_image is scorer else None,
        run_id=(run_info or {}).get("run_id"),
        member=(run_info or {}).get("member"),
    )
  return table


def own_epoch_results(out_dir: str, run_id: str | None) -> tuple[list[str], list[dict]]:
  """(files, records) of the per-epoch results in `out_dir` written by run `run_id`, in
  epoch order; those of other runs (an earlier run in the same workdir, whose checkpoints
  were removed) or unreadable ones are left out with a word."""
  files, records, foreign = [], [], []
  for f in sorted(glob.glob(os.path.join(out_dir, "metrics_epoch_*.json"))):
    rec = fileio.read_json_object(f, ("metrics", "step"))
    if rec is None or (run_id is not None and rec.get("run_id") != run_id):
      foreign.append(os.path.basename(f))
      continue
    files.append(f)
    records.append(rec)
  if foreign:
    print(
        f"note: {len(foreign)} per-epoch result file(s) in {out_dir} were not written by "
        f"this run (run id {run_id}) or are unreadable, and are ignored: "
        f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}",
        flush=True,
    )
  return files, records


def report_best_epoch(
    workdir: str, run_id: str | None = None, results_dir: str | None = None
) -> dict:
  """The reference protocol: of run `run_id`'s per-epoch results in workdir/results (or
  results_dir), the epoch with the best mean I-AUROC + P-AUROC is written as the run's
  reported result (metrics_final.*, labelled as selected on the test set)."""
  out_dir = results_dir or os.path.join(workdir, "results")
  files, epochs = own_epoch_results(out_dir, run_id)
  if not files:
    raise FileNotFoundError(f"{out_dir}: no per-epoch results of this run to select from")
  best = metrics_lib.select_epoch([r["metrics"] for r in epochs], "best_epoch")
  chosen = epochs[best]
  tag = os.path.basename(files[best])[len("metrics_") : -len(".json")]
  extra = {k: v for k, v in chosen.items() if k not in ("metrics", "versions")}
  extra.update(
      protocol=BEST_EPOCH_LABEL,
      selected=tag,
      selected_step=chosen["step"],
      candidates=[os.path.basename(f)[len("metrics_") : -len(".json")] for f in files],
  )
  if jax.process_index() == 0:
    results.write_results(chosen["metrics"], out_dir, "final", extra)
    scores = os.path.join(out_dir, f"scores_{tag}.csv")
    if os.path.exists(scores):
      fileio.atomic_copy(scores, os.path.join(out_dir, "scores_final.csv"))
  print(
      f"\n[final] protocol: {BEST_EPOCH_LABEL}: {tag} (step {chosen['step']}) of "
      f"{len(files)} evaluated epochs"
  )
  print(results.markdown(chosen["metrics"]), flush=True)
  return chosen["metrics"]


def checkpoint_protocol(run: trained.Run, dataset) -> dict:
  """The checkpoint a scoring command reports on: its step and whether it ends training
  (the final epoch), with the run's image score and matching modes."""
  t = run.config.train
  total = t.epochs * math.ceil(len(dataset.train) / t.batch_size)
  step = int(run.state.step)
  text = (
      f"checkpoint step {step} (final epoch)"
      if step == total
      else f"checkpoint step {step} of {total} (training not finished)"
  )
  return {
      "step": step,
      "total_steps": total,
      "protocol": text,
      "score_mode": run.config.model.score_mode,
      "matching": run.config.model.matching,
  }


def evaluate_checkpoint(config, workdir: str) -> dict:
  """Scores the workdir's latest checkpoint without training (`--mode=eval`); the config must
    agree with the run's in the fields that change scoring (`trained.check_eval_config`). One model:
  the single-class setting's loop over the classes is `train.evaluate_checkpoint`'s."""
  config_check.check(config)
  progress.configure(config)
  named_inputs.ensure(config)  # weights and data named by the config: fetched once
  run = trained.load_run(workdir, config)
  dataset = trained.load_run_dataset(run, workdir)
  note = runs.test_data_note(run.meta.get("data"), dataset.identity)
  if note:
    print(f"note: {note}", flush=True)
  run_info = {"run_id": run.meta.get("run_id"), "data_note": note}
  return evaluate(
      scoring.Scorer.for_run(run), dataset, config, workdir, tag="eval", run_info=run_info
  )
