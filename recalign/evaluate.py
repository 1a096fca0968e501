"""The eval job (T5X's eval.py): a checkpoint, or every checkpoint of a run -- even while it trains --
scored by `recalign.evaluator` on registered tasks; metrics JSON, per-user predictions JSONL and a line
of MODEL_DIR/eval/evaluated.jsonl per evaluation.

    recalign eval --checkpoint RUN/best --task beauty_retrieval --split test
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import gin
import numpy as np

from recalign import faults, partitioning, paths
from recalign import metrics as M
from recalign.data.prepare import PreparedData
from recalign.evaluator import EVALUABLE, EvalResult, RecEvaluator, needs_users
from recalign.models import checkpoints as ck
from recalign.models.model import EncoderDecoderModel
from recalign.run_record import RunRecord

def eval_output_dir(checkpoint: Path | str) -> tuple[Path, Optional[Path]]:
  """(where results of evaluating `checkpoint` go, the run's MODEL_DIR or None).

  As T5X's EVAL_OUTPUT_DIR, results live apart from the checkpoints, which orbax deletes when it
  rotates them: MODEL_DIR/checkpoints/<step> -> MODEL_DIR/eval/<step>; MODEL_DIR/best ->
  MODEL_DIR/eval/best_<step> (a later best is another folder); a checkpoint outside a recalign run
  (Hugging Face, T5X) -> <its folder>/../eval/<its name>.
  """
  checkpoint = paths.resolve(checkpoint)
  run = ck.find_run_json(checkpoint)
  if run is None:
    return checkpoint.parent / "eval" / checkpoint.name, None
  model_dir, step = run.parent, ck.checkpoint_step(checkpoint)
  label = checkpoint.name if step is None else (f"best_{step}" if checkpoint.name == "best" else str(step))
  return model_dir / "eval" / label, model_dir


def record_evaluation(out_dir: Path, checkpoint: Path | str, result: "EvalResult", files: Sequence[Path]) -> Path:
  """Appends one line to <eval dir>/evaluated.jsonl: which checkpoint (and step) was evaluated on what,
  the metrics, and the files written -- the record of evaluated steps."""
  log = out_dir.parent / "evaluated.jsonl"
  entry = {"checkpoint": str(paths.resolve(checkpoint)), "step": ck.checkpoint_step(checkpoint),
           "output": out_dir.name, "task": result.task, "split": result.split, "protocol": result.protocol,
           "metrics": result.metrics, "files": [str(f) for f in files],
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
  paths.append_line(log, json.dumps(entry))
  return log

# --------------------------------------------------------------------------------------------
# The eval job (T5X's eval.py): a checkpoint, or every checkpoint of a run, even while it trains


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  split: str = "test"
  beam_size: int = 20
  batch_size: int = 32
  max_examples: Optional[int] = None      # a seeded sample of users (default: all)
  exclude_history: bool = False           # retrieval protocol (default: the paper's full catalogue)
  lengths: Optional[dict] = None          # default: the run's TASK_FEATURE_LENGTHS


def register_run_tasks(checkpoint: Path | str, task: str, *, data: Sequence[str] = (),
                       vocabulary: Optional[str] = None) -> list[str]:
  """Registers the data sets of the run that wrote `checkpoint` as it registered them (run.json:
  data_dirs -- or `data` --, vocabulary, TaskConfig); returns the evaluable members of `task`."""
  import recalign.tasks as rt
  from recalign.data.vocab import load_vocabulary
  run = RunRecord.find(checkpoint)
  vocab_path = vocabulary or ck.checkpoint_vocabulary(checkpoint)
  vocab = load_vocabulary(vocab_path) if vocab_path else None
  config = rt.TaskConfig(**run.task_config) if run and run.task_config else rt.TaskConfig()
  for d in (data or (run.data_dirs if run else ())):   # the run's record is what its checkpoint needs
    rt.register_dataset(d, vocab=vocab, config=config, replace=True)
  t = rt.get(task)
  members = [m.name for m in getattr(t, "tasks", [t])]
  members = [m for m in members if rt.registry.task_info(m).kind in EVALUABLE]
  if not members:
    raise ValueError(f"{task} has no retrieval, ranking, rating or ITDR task to evaluate")
  return members


def load_model(checkpoint: Path | str, vocab, *, size: Optional[str] = None, mesh=None):
  """(model, parameters) of a checkpoint (any format `load_checkpoint` reads) for `vocab`, placed on `mesh`
  (default: this process's devices)."""
  from recalign.models.network import named_config, padded_vocab_size
  loaded = ck.load_checkpoint(checkpoint)
  net = loaded.config or (named_config(size) if size else None)
  if net is None:
    raise ValueError(f"{checkpoint} is a {loaded.format} checkpoint, which records no model config: give the "
                     "model size (--size)")
  rows = padded_vocab_size(vocab.vocab_size)
  model = EncoderDecoderModel(net.replace(vocab_size=rows))
  mesh = mesh if mesh is not None else partitioning.make_mesh(local=True)
  return model, partitioning.place_params(model, ck.fit_vocabulary(loaded.params, checkpoint, vocab, rows), mesh)


def evaluate_checkpoint(checkpoint: Path | str, members: Sequence[str], settings: EvalSettings = EvalSettings(), *,
                        size: Optional[str] = None, output_dir: Optional[Path] = None, mesh=None,
                        example_ids: Optional[np.ndarray] = None, progress: bool = True) -> dict[str, EvalResult]:
  """Evaluates one checkpoint (any format `load_checkpoint` reads) on registered tasks; writes metrics,
  predictions and a line of eval/evaluated.jsonl (+ TensorBoard scalars for a run's step) to
  `output_dir` (default `eval_output_dir(checkpoint)`). On `mesh` (default: this process's devices,
  data-parallel) parameters are sharded as in training and users split over 'data'; several processes
  (multi-host) each evaluate their share of users and gather, and process 0 writes the files.
  Users: all, a seeded sample of `settings.max_examples`, or `example_ids`."""
  import recalign.tasks as rt
  import jax
  mesh = mesh if mesh is not None else partitioning.make_mesh(local=True)   # processes evaluate their own users
  model, params = load_model(checkpoint, rt.registry.task_info(members[0]).vocab, size=size, mesh=mesh)
  run = RunRecord.find(checkpoint)
  lengths = dict(settings.lengths or (run.task_feature_lengths if run else None)
                 or {"inputs": 1024, "targets": 64})
  out_dir = paths.as_path(output_dir) if output_dir else eval_output_dir(checkpoint)[0]
  results = {}
  with mesh:
    for name in members:
      info = rt.registry.task_info(name)
      # (streamed retrieval / ranking: no user loaded; the evaluated users' names read from the TFDS copy)
      data = PreparedData.load(info.data_dir, timestamps=False, users=needs_users(info, settings.exclude_history))
      ev = RecEvaluator(model, data, info.vocab, ids=info.ids, mesh=mesh, beam_size=settings.beam_size,
                        batch_size=settings.batch_size, exclude_history=settings.exclude_history, progress=progress,
                        names_from=info.data_dir)
      res = ev.evaluate(params, name, settings.split, lengths, settings.max_examples, example_ids=example_ids)
      if jax.process_index() == 0:   # every process holds the whole result; one writes it
        record_evaluation(out_dir, checkpoint, res, res.write(out_dir))
      results[name] = res
  return results


def evaluated_steps(model_dir: Path | str, task: str, split: str, protocol: str) -> set[int]:
  entries = paths.read_json_lines(paths.as_path(model_dir) / "eval" / "evaluated.jsonl")
  return {e["step"] for e in entries if (e["task"], e["split"], e["protocol"]) == (task, split, protocol)
          and e["step"] is not None and e["output"] == str(e["step"])}


RESTORE_MODES = ("all", "latest", "specific")


def evaluate_run(model_dir: Path | str, members: Sequence[str], settings: EvalSettings = EvalSettings(), *,
                 mode: str = "all", steps: Sequence[int] = (), wait: bool = False, until_step: Optional[int] = None,
                 poll_seconds: float = 60.0, mesh=None, progress: bool = True, tensorboard: bool = True,
                 sleep: Callable[[float], None] = time.sleep) -> dict[int, dict[str, EvalResult]]:
  """Evaluates the checkpoints of a run, as T5X's eval job: `mode` 'all' (every saved step, oldest
  first), 'latest' (the newest) or 'specific' (`steps`). Steps whose results are recorded in
  eval/evaluated.jsonl for these tasks, split and protocol are skipped. With `wait`, keeps polling
  MODEL_DIR every `poll_seconds` for new checkpoints (a training job elsewhere) until `until_step`
  (default: the run's TRAIN_STEPS) has been evaluated."""
  if mode not in RESTORE_MODES:
    raise ValueError(f"restore mode must be one of {RESTORE_MODES}, not {mode!r}")
  if mode == "specific" and not steps:
    raise ValueError("restore mode 'specific' needs the steps to evaluate")
  model_dir = paths.as_path(model_dir)
  run = RunRecord.read(model_dir)
  until = until_step or (run.train_steps if run else None)
  if wait and not until:
    raise ValueError(f"{model_dir}/run.json records no train_steps: give the step to wait for (--until-step)")
  protocol = M.protocol_name(settings.exclude_history)
  done: dict[int, dict[str, EvalResult]] = {}
  damaged: set[int] = set()
  while True:
    saved = ck.saved_steps(model_dir)
    todo = {"all": saved, "latest": saved[-1:], "specific": [s for s in steps if s in saved]}[mode]
    skip = set.intersection(*(evaluated_steps(model_dir, m, settings.split, protocol) for m in members))
    for step in [s for s in todo if s not in skip and s not in done and s not in damaged]:
      try:
        done[step] = evaluate_checkpoint(model_dir / "checkpoints" / str(step), members, settings, mesh=mesh,
                                         progress=progress)
      except FileNotFoundError:   # rotated away by the training job between listing and reading
        logging.warning("%s: checkpoint %d disappeared before it was evaluated", model_dir, step)
        continue
      except faults.CheckpointDamaged as e:   # said, not retried; the job goes on with the next one
        logging.error("%s", e)
        print(f"error: {e} (not evaluated)", file=sys.stderr, flush=True)
        damaged.add(step)
        continue
      if tensorboard:
        _eval_summaries(model_dir, step, done[step])
    finished = not wait or (until is not None and until in set(done) | skip | damaged) or (
        mode == "specific" and all(s in done or s in skip or s in damaged for s in steps))
    if finished:
      return done
    sleep(poll_seconds)


def _eval_summaries(model_dir: Path, step: int, results: dict[str, EvalResult]) -> None:
  """TensorBoard scalars in MODEL_DIR/eval/tensorboard: <task>/<split>/<metric> at the step."""
  import tensorflow as tf
  writer = tf.summary.create_file_writer(str(model_dir / "eval" / "tensorboard"))
  with writer.as_default():
    for name, res in results.items():
      for k, v in res.metrics.items():
        if isinstance(v, (int, float)) and k != "examples":
          tf.summary.scalar(f"{name}/{res.split}/{k}", v, step=step)
  writer.flush()


@gin.configurable
def eval_job(*, checkpoint_path: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
             split: str = "test", restore_mode: Optional[str] = None, steps: Sequence[int] = (),
             wait: bool = False, until_step: Optional[int] = None, poll_seconds: float = 60.0,
             beam_size: int = 20, batch_size: int = 32, max_examples: Optional[int] = None,
             exclude_history: bool = False, task_feature_lengths: Optional[dict] = None,
             data_dirs: Sequence[str] = (), vocabulary: Optional[str] = None, size: Optional[str] = None,
             output_dir: Optional[str] = None, model_parallel: int = 1) -> dict[str, dict]:
  """`recalign eval` (flags, or gin: gin/eval.gin's CHECKPOINT_PATH, MIXTURE_OR_TASK_NAME, EVAL_SPLIT).
  A MODEL_DIR runs the eval job over its checkpoints (`evaluate_run`); anything else is one checkpoint
  (`evaluate_checkpoint`). `model_parallel` (MODEL_PARALLEL, --model-parallel): the trainer's ('data', 'model')
  mesh over this process's devices, parameters placed by the same logical-axis rules. Returns {row name: metrics}."""
  path = paths.as_path(checkpoint_path)
  settings = EvalSettings(split=split, beam_size=beam_size, batch_size=batch_size, max_examples=max_examples,
                          exclude_history=exclude_history,
                          lengths=dict(task_feature_lengths) if task_feature_lengths else None)
  members = register_run_tasks(path, mixture_or_task_name, data=data_dirs, vocabulary=vocabulary)
  mesh = partitioning.make_mesh(model_parallel, local=True)   # processes evaluate their own users
  print(f"protocol: {M.protocol_name(exclude_history)} (retrieval); split: {split}")
  if (path / "run.json").exists() and (path / "checkpoints").is_dir():
    # SIGTERM / Ctrl-C: stop now (exit status faults.PREEMPTED_EXIT_CODE); a checkpoint being evaluated is
    # not recorded in evaluated.jsonl, so the job started again evaluates it and goes on
    with faults.PreemptionWatcher("the eval job", immediate=True):
      done = evaluate_run(path, members, settings, mode=restore_mode or ("specific" if steps else "all"),
                          steps=steps, wait=wait, until_step=until_step, poll_seconds=poll_seconds,
                          mesh=mesh)
    print(f"evaluated steps {sorted(done) or 'none (all already evaluated: see eval/evaluated.jsonl)'}")
    return {f"{name} @ {step}": r.metrics for step, res in sorted(done.items()) for name, r in res.items()}
  results = evaluate_checkpoint(path, members, settings, size=size, output_dir=output_dir, mesh=mesh)
  print(f"wrote {output_dir or eval_output_dir(path)[0]}")
  return {name: r.metrics for name, r in results.items()}
