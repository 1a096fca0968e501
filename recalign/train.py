"""The training loop, T5X-shaped: read it top to bottom (its parts -- optimiser, input, state, step and the
loop's actions -- are in trainer.py; the mesh in partitioning.py).

    recalign train --gin_file=gin/reat.gin --gin.MODEL_DIR="'/tmp/run'"

1. tasks: register the prepared data sets (DATA_DIRS) and look up MIXTURE_OR_TASK_NAME;
2. model: the network config from gin, vocabulary size from the task, optional initial checkpoint
   (recalign / T5X / Hugging Face), resized to the project's vocabulary;
3. partitioning: a ('data', 'model') mesh; parameters placed by logical axis rules, batches split
   over 'data'; on several hosts every process reads its own seqio shard;
4. state: parameters + optax state (Adafactor as T5X, or AdamW), restored from the last orbax
   checkpoint in MODEL_DIR when there is one;
5. input: seqio -> first-fit packing (or padding) -> batches; the stream is a pure
   function of (seed, step), so a restart skips exactly the batches already trained on;
6. loop: jitted step (gradient accumulation by scan), progress bar, TensorBoard summaries, per-task
   probe losses, periodic validation with best-checkpoint selection, checkpoints every N steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import gin
import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

import recalign.tasks as rt
from recalign import faults, paths
from recalign.evaluator import headline_metric, make_validate_fn, validation_metrics
from recalign.models import checkpoints as ck
from recalign.models.model import EncoderDecoderModel
from recalign.models.network import padded_vocab_size
from recalign.partitioning import PartitionConfig, maybe_initialize_distributed, to_global
from recalign.run_record import RunRecord
from recalign.trainer import (CheckpointConfig, DatasetConfig, ModelConfig, NonFiniteSteps, PeriodicValidation,
                              Saver, TaskProbes, TrainClock, TrainLog, ValidationConfig, checkpoint_manager,
                              eval_params, initial_state, InputBatches, learning_rate_schedule, make_optimizer,
                              summary_writer, train_step)

def resolve_vocabulary(vocabulary: Optional[str], initial_checkpoint_path: Optional[str]):
  """VOCABULARY: None (each data set's own vocab/spm.model), 'checkpoint' (the SentencePiece model of
  INITIAL_CHECKPOINT_PATH: a Hugging Face directory's spiece.model, a recalign run's), or a path."""
  from recalign.data.vocab import CHECKPOINT, load_vocabulary
  if vocabulary is None:
    return None
  if vocabulary == CHECKPOINT:
    if not initial_checkpoint_path:
      raise ValueError("VOCABULARY = 'checkpoint' needs INITIAL_CHECKPOINT_PATH")
    path = ck.checkpoint_vocabulary(initial_checkpoint_path)
    if path is None:
      raise ValueError(f"{initial_checkpoint_path} has no SentencePiece model beside it (spiece.model): set "
                       "VOCABULARY to its path (T5 / FLAN-T5 from T5X: cc_all.32000.100extra/sentencepiece.model)")
    return load_vocabulary(path)
  return load_vocabulary(vocabulary)


def vocabulary_record(vocab) -> dict:
  """How run.json records the vocabulary, so `recalign eval` and resumed runs use the same one (item ID
  pieces appended to a pretrained vocabulary are rebuilt from the data set's ID scheme)."""
  from recalign.data.ingest import sha256_file
  path = Path(vocab.sentencepiece_model_file).resolve()
  return {"path": str(path), "extra_ids": getattr(vocab, "base", vocab).extra_ids, "sha256": sha256_file(path),
          "ids": vocab.vocab_size, "appended_pieces": len(getattr(vocab, "pieces", ()))}




@gin.configurable(denylist=["validate_fn", "optimizer", "schedule"])
def train(*, model_dir: str = gin.REQUIRED, dataset: DatasetConfig = gin.REQUIRED, model: ModelConfig = gin.REQUIRED,
          train_steps: int = gin.REQUIRED, partitioning: Optional[PartitionConfig] = None,
          checkpoint: Optional[CheckpointConfig] = None, validation: Optional[ValidationConfig] = None,
          random_seed: int = 0, gradient_accumulation_steps: int = 1, log_every: int = 10,
          time_budget_s: Optional[float] = None, train_minutes_budget: Optional[float] = None,
          on_nonfinite: str = "stop", ema_decay: Optional[float] = None, tensorboard: bool = True,
          progress: bool = True,
          optimizer: Optional[optax.GradientTransformation] = None, schedule: Optional[optax.Schedule] = None,
          validate_fn: Optional[Callable[[EncoderDecoderModel, dict], dict]] = None) -> dict:
  """Trains `model` on `dataset` for `train_steps` steps in MODEL_DIR and returns the last step's metrics
  (plus the best validation metrics, if any).

  `dataset` / `model` / `partitioning` / `checkpoint` / `validation`: `DatasetConfig`, `ModelConfig`,
  `PartitionConfig`, `CheckpointConfig`, `ValidationConfig` (gin-configurable; None: defaults).
  `validate_fn(model, params) -> metrics` replaces the built-in validation of `validation.task`.
  `schedule` / `optimizer`: optax objects to use instead of gin's `learning_rate_schedule` /
  `make_optimizer` (the logged learning rate is `schedule`'s). `ema_decay` (EMA_DECAY, e.g. 0.999): keep an
  exponential moving average of the parameters in the state (`trainer.ema_rate`); validation scores it,
  MODEL_DIR/best keeps it and readers of the checkpoints (`recalign eval`, INITIAL_CHECKPOINT_PATH) take it
  (ValidationConfig.raw_too: the trained parameters validated beside it).
  train_log.jsonl and validation_log.jsonl record examples seen and minutes of training (validation
  excluded) for learning curves. `time_budget_s` stops after that much wall clock in all,
  `train_minutes_budget` after that many minutes of training (validation excluded).
  MODEL_DIR may be remote (gs://...: etils.epath for recalign's files, orbax for checkpoints;
  TensorBoard summaries go through TensorFlow's own file systems, `tensorboard=False` skips them).
  Faults (README: Reliability): one training job per MODEL_DIR (`faults.ModelDirLock`); SIGTERM / SIGINT
  save a checkpoint at the step boundary and raise `faults.Preempted` (exit status 75); a step with a
  non-finite loss, gradient or update is never applied and, by `on_nonfinite`, stops the run with
  `faults.NonFiniteError` naming the step and the last good checkpoint ("stop") or is skipped and
  counted in train_log.jsonl ("skip"); a failed save raises `faults.CheckpointWriteError`.
  """
  maybe_initialize_distributed()
  ckpt_cfg, val_cfg = checkpoint or CheckpointConfig(), validation or ValidationConfig()
  model_dir = paths.as_path(model_dir)     # local, or gs:// (any etils.epath scheme)
  is_chief = jax.process_index() == 0
  _check_values(train_steps=train_steps, dataset=dataset, accum=gradient_accumulation_steps, log_every=log_every,
                checkpoint=ckpt_cfg, validation=val_cfg, on_nonfinite=on_nonfinite, ema_decay=ema_decay)
  # one training job per MODEL_DIR (the chief holds the lock); its first write, so an unwritable
  # MODEL_DIR fails here
  if not is_chief:
    model_dir.mkdir(parents=True, exist_ok=True)
  with faults.ModelDirLock(model_dir) if is_chief else contextlib.nullcontext():

    # 1. tasks and vocabulary; 2. model, and the settings that would only fail (or do nothing) after steps
    task, vocab = register_tasks(dataset, model)
    net = EncoderDecoderModel(model.network.replace(vocab_size=padded_vocab_size(vocab.vocab_size)),
                              z_loss=model.z_loss, label_smoothing=model.label_smoothing,
                              loss_normalize=model.loss_normalizing_factor)
    if val_cfg.selection_metric is None:   # the validation task's headline metric
      kind = rt.registry.task_info(val_cfg.task).kind if val_cfg.task else "retrieval"
      val_cfg = dataclasses.replace(val_cfg, selection_metric=headline_metric(kind))
    _check_settings(val_cfg, validate_fn, model_dir, vocab, ema_decay)
    mesh = (partitioning or PartitionConfig()).mesh()
    _check_batch(dataset.batch_size, mesh, gradient_accumulation_steps)
    if is_chief:  # what `recalign eval` needs to rebuild the model and its tasks next to its checkpoints
      run_record(net, dataset, train_steps, vocab, task, ema_decay).write(model_dir)
    if validate_fn is None and val_cfg.enabled:
      validate_fn = make_validate_fn(val_cfg.task, dict(val_cfg.lengths or dataset.task_feature_lengths),
                                     max_examples=val_cfg.examples)

    # 3. partitioning and 4. state
    batch_sharding = NamedSharding(mesh, P("data"))
    t_start = time.perf_counter()
    schedule = schedule or learning_rate_schedule(total_steps=train_steps)
    tx = optimizer or make_optimizer(schedule)
    mngr = checkpoint_manager(model_dir, ckpt_cfg)
    state, state_sharding, origin = initial_state(
        net, tx, mesh, mngr, seed=random_seed, initial_checkpoint_path=model.initial_checkpoint_path, vocab=vocab,
        vocabulary_mismatch=model.vocabulary_mismatch, restore_fallback=ckpt_cfg.restore_fallback,
        ema=ema_decay is not None)
    logging.info("%s: starting from %s", model_dir, origin)
    start = int(state["step"])
    if start >= train_steps:
      logging.warning("%s is already trained to step %d (TRAIN_STEPS=%d): nothing to do; raise TRAIN_STEPS to "
                      "continue", model_dir, start, train_steps)
      print(f"{model_dir} is already at step {start} >= TRAIN_STEPS={train_steps}: nothing to train")
    step_fn = jax.jit(functools.partial(train_step, model=net, tx=tx, schedule=schedule,
                                        accum=gradient_accumulation_steps,
                                        dropout_key=jax.random.PRNGKey(random_seed + 1), ema_decay=ema_decay),
                      in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None),
                      donate_argnums=0)

    # 5. input, and the loop's actions
    lengths = dict(dataset.task_feature_lengths)
    batches = InputBatches(task, lengths, dataset.batch_size, seed=random_seed, pack=dataset.pack)
    logging.info("%s: %s", model_dir, batches.resume(model_dir, start))
    writer = summary_writer(model_dir / "train") if is_chief and tensorboard else None
    budget_min = time_budget_s / 60 if time_budget_s else train_minutes_budget
    bar = tqdm(total=None if budget_min else train_steps, initial=start,  # a time budget: no step total
               desc="train" if not budget_min else f"train ({budget_min:.0f} min budget)",
               disable=not (progress and is_chief), dynamic_ncols=True)
    log = TrainLog(model_dir, log_every, writer, is_chief, bar, start=start, probes=TaskProbes(
        net, getattr(task, "tasks", [task]), lengths, dataset.batch_size, random_seed, batch_sharding))
    clock = TrainClock(log.previous.get("minutes", 0.0))
    validate = PeriodicValidation(val_cfg, validate_fn, model_dir, writer, is_chief, clock, start)
    nonfinite = NonFiniteSteps(on_nonfinite, log.previous.get("skipped_steps", 0), mngr)
    saver = Saver(mngr, model_dir)

    def out_of_time() -> bool:
      return ((time_budget_s is not None and time.perf_counter() - t_start > time_budget_s)
              or (train_minutes_budget is not None and clock.minutes() > train_minutes_budget))

    # 6. loop
    end = train_steps
    if validate.exhausted and start:   # a resume of a run that already stopped early
      print(f"{model_dir} stopped early at step {start} (patience {val_cfg.patience}): nothing to train")
      end = start
    preempted = False
    in_flight = None   # the previous step's metrics: the bar advances when a step completes, not when queued
    with mesh, faults.PreemptionWatcher() as preemption:
      for step in range(start, end):
        raw = next(batches)
        state, metrics = step_fn(state, to_global(raw, batch_sharding))
        log.count(raw)
        done = step + 1
        if in_flight is not None:  # one step stays queued behind this wait, so the device never idles
          nonfinite.check(*in_flight)
          bar.update(done - 1 - bar.n)
        in_flight = (done, metrics)
        preempted, spent = preemption.requested(done), out_of_time()
        last = done == train_steps or spent   # validated even off the schedule; a preempted step is not: the
        final = last or preempted             # save must beat the notice, and the resumed run validates as usual
        if log.due(done, final):
          nonfinite.check(done, metrics)
          log(done, metrics, state["params"], minutes=clock.minutes(), skipped=nonfinite.skipped)
        if validate.due(done, last) or saver.due(done, final or validate.exhausted):
          nonfinite.check(done, in_flight[1])   # what is validated or saved is known to be finite
        validate(net, eval_params(state), done, log.examples_seen, final=last,
                 raw=state["params"] if ema_decay is not None else None)
        stop = spent or validate.exhausted or preempted
        saver.save(done, state, force=done == train_steps or stop)
        batches.save_if_due(model_dir, done, ckpt_cfg.input_state, preempted=preempted, checkpointed=saver.saved(done))
        if stop:
          _stopped(model_dir, done, is_chief, preempted, spent, validate)
          break
    saver.finish()
    bar.update(int(state["step"]) - bar.n)
    bar.close()
    if writer is not None:
      writer.flush()
    if preempted:
      raise faults.Preempted(f"preempted: checkpoint saved at step {int(state['step'])} in {model_dir}/checkpoints; "
                             "start the same command again to resume from it")
    last = log.last
    if not last and start >= end:   # a finished (or early-stopped) run: report its last logged step
      last = {k: v for k, v in log.previous.items() if k != "examples_seen"}
    return {**last, "best": validate.keep_best.best}


def register_tasks(dataset: DatasetConfig, model: ModelConfig):
  """(task or mixture, its vocabulary): DATA_DIRS registered as this run needs them (and run.json records
  them; an earlier registration is replaced), in the run's VOCABULARY when one is set."""
  from recalign.data.vocab import describe, same_vocabulary
  run_vocab = resolve_vocabulary(model.vocabulary, model.initial_checkpoint_path)
  for d in dataset.data_dirs:
    rt.register_dataset(d, vocab=run_vocab, config=dataset.task_config or rt.TaskConfig(), replace=True)
  task = rt.get(dataset.mixture_or_task_name)
  vocab = rt.registry.get_vocabulary(task)
  if run_vocab is not None and not same_vocabulary(getattr(vocab, "base", vocab), run_vocab):
    raise ValueError(f"{dataset.mixture_or_task_name} is registered with {describe(vocab)}, but VOCABULARY is "
                     f"{describe(run_vocab)}: register it with that vocabulary (or list its data in DATA_DIRS)")
  rt.registry.check_feature_lengths(task, dataset.task_feature_lengths)
  return task, vocab


def run_record(model: EncoderDecoderModel, dataset: DatasetConfig, train_steps: int, vocab, task,
               ema_decay: Optional[float] = None) -> RunRecord:
  """What `recalign eval` needs to rebuild the model and its tasks next to the checkpoints."""
  first = getattr(task, "tasks", [task])[0].name
  return RunRecord(network_config=dataclasses.asdict(model.config), mixture_or_task_name=dataset.mixture_or_task_name,
                   task_feature_lengths=dict(dataset.task_feature_lengths), train_steps=train_steps,
                   vocabulary=vocabulary_record(vocab),
                   data_dirs=tuple(str(paths.resolve(d)) for d in dataset.data_dirs),
                   task_config=dataclasses.asdict(rt.registry.task_info(first).config), ema_decay=ema_decay)


def _stopped(model_dir, step: int, is_chief: bool, preempted: bool, spent: bool, validate: PeriodicValidation):
  """Says why the loop stopped before TRAIN_STEPS; an early stop leaves early_stop.json."""
  logging.info("%s at step %d", "preempted" if preempted else "time budget spent" if spent else
               f"early stop: no better {validate.cfg.selection_metric} in {validate.cfg.patience} validations", step)
  if is_chief and validate.exhausted and not spent and not preempted:
    (model_dir / "early_stop.json").write_text(json.dumps({"step": step, "patience": validate.cfg.patience,
                                                           "best": validate.keep_best.best}, indent=2))


def _check_batch(batch_size: int, mesh, accum: int) -> None:
  if batch_size % (mesh.shape["data"] * accum):
    raise ValueError(f"BATCH_SIZE={batch_size} is not divisible by the {mesh.shape['data']} data-parallel devices"
                     + (f" x {accum} accumulation steps" if accum > 1 else "")
                     + f" ({jax.device_count()} devices, model_parallel={mesh.shape['model']})")


def _check_values(*, train_steps: int, dataset: DatasetConfig, accum: int, log_every: int,
                  checkpoint: CheckpointConfig, validation: ValidationConfig, on_nonfinite: str,
                  ema_decay: Optional[float] = None) -> None:
  """Values no run can use, refused before anything is read or compiled, with the setting's name."""
  checks = [(isinstance(train_steps, int) and train_steps > 0,
             f"TRAIN_STEPS must be a positive integer, not {train_steps!r}"),
            (isinstance(dataset.batch_size, int) and dataset.batch_size > 0,
             f"BATCH_SIZE must be a positive integer, not {dataset.batch_size!r}"),
            (isinstance(accum, int) and accum > 0,
             f"gradient_accumulation_steps must be a positive integer, not {accum!r}"),
            (log_every > 0, f"train.log_every must be positive, not {log_every!r}"),
            (checkpoint.every > 0, f"CheckpointConfig.every must be positive, not {checkpoint.every!r}"),
            (checkpoint.keep is None or checkpoint.keep > 0,
             f"CheckpointConfig.keep must be positive (or None: keep all), not {checkpoint.keep!r}"),
            (checkpoint.input_state in ("preemption", "every", "never"),
             f"CheckpointConfig.input_state must be 'preemption', 'every' or 'never', not {checkpoint.input_state!r}"),
            (validation.every >= 0 and (validation.every_minutes or 0) >= 0 and validation.patience >= 0,
             "ValidationConfig.every, every_minutes and patience cannot be negative"),
            (validation.examples is None or validation.examples > 0,
             f"ValidationConfig.examples must be positive (or None: all), not {validation.examples!r}"),
            (on_nonfinite in ("stop", "skip"),
             f"train.on_nonfinite must be 'stop' or 'skip', not {on_nonfinite!r}"),
            (ema_decay is None or 0.0 < ema_decay < 1.0,
             f"EMA_DECAY must be between 0 and 1 (e.g. 0.999), or None: no average, not {ema_decay!r}"),
            (not validation.raw_too or ema_decay is not None,
             "ValidationConfig.raw_too validates the trained parameters beside their moving average: set EMA_DECAY "
             "too (without it there is nothing beside them)")]
  for ok, message in checks:
    if not ok:
      raise ValueError(message)
  lengths = dataset.task_feature_lengths
  if set(lengths) != {"inputs", "targets"} or not all(isinstance(v, int) and v > 0 for v in lengths.values()):
    raise ValueError(f"TASK_FEATURE_LENGTHS must be {{'inputs': n, 'targets': m}} with positive integers, not "
                     f"{dict(lengths)!r}")


def _check_settings(val: ValidationConfig, validate_fn, model_dir: paths.PathLike, vocab,
                    ema_decay: Optional[float] = None) -> None:
  """Settings that would fail (or silently do nothing) after steps of training are errors now."""
  from recalign.data.vocab import describe
  if val.enabled and validate_fn is None and not val.task:
    raise ValueError("validation every / every_minutes is set but ValidationConfig.task is not: name the task to "
                     "validate on (e.g. ValidationConfig.task = 'beauty_retrieval')")
  if val.task and validate_fn is None:
    produced = validation_metrics(rt.registry.task_info(val.task).kind)
    if val.selection_metric not in produced:
      raise ValueError(f"selection_metric={val.selection_metric!r} is not reported by {val.task} "
                       f"(it reports {', '.join(produced) or 'no metrics'})")
  if val.every_minutes and jax.process_count() > 1:
    raise ValueError("ValidationConfig.every_minutes needs one process (hosts' clocks would disagree); use every")
  previous = RunRecord.read(model_dir)
  if previous and previous.vocabulary and previous.vocabulary["sha256"] != vocabulary_record(vocab)["sha256"]:
    raise ValueError(f"{model_dir} was trained with {previous.vocabulary['path']}, not "
                     f"{describe(vocab)}: use another MODEL_DIR")
  if previous and (previous.ema_decay is None) != (ema_decay is None) and ck.saved_steps(model_dir):
    # (its checkpoints hold the average or not: the state could not be restored)
    raise ValueError(f"{model_dir} was trained with EMA_DECAY = {previous.ema_decay}, not {ema_decay}: resume it "
                     "with the same setting, or use another MODEL_DIR")
