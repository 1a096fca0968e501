"""The training loop, T5X-shaped: read it top to bottom.

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
import itertools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from recalign import metrics as M
from recalign.evaluator import headline_metric, make_validate_fn, validation_metrics
from recalign import faults, paths
from recalign.run_record import RunRecord
from recalign.partitioning import make_mesh, maybe_initialize_distributed, param_shardings, to_global
from recalign.models import checkpoints as ck
from recalign.models.model import EncoderDecoderModel
from recalign.models.network import T5Config, padded_vocab_size
from recalign.tasks import packing

# --------------------------------------------------------------------------------------------
# Optimiser


@gin.configurable
def learning_rate_schedule(base: float = 1e-3, warmup_steps: int = 1000, decay: str = "constant",
                           total_steps: int = 0) -> optax.Schedule:
  """Linear warm-up to `base`, then constant (the paper), linear decay to 0, or rsqrt decay."""
  warm = optax.linear_schedule(0.0, base, max(warmup_steps, 1))
  if decay == "constant":
    after = optax.constant_schedule(base)
  elif decay == "linear":
    after = optax.linear_schedule(base, 0.0, max(total_steps - warmup_steps, 1))
  elif decay == "rsqrt":
    after = lambda s: base * jnp.sqrt(max(warmup_steps, 1) / (s + max(warmup_steps, 1)))  # noqa: E731
  else:
    raise ValueError(f"decay must be constant|linear|rsqrt, not {decay!r}")
  return optax.join_schedules([warm, after], [warmup_steps])


@gin.configurable
def make_optimizer(schedule: optax.Schedule, name: str = "adafactor", weight_decay: float = 0.0,
                   clip_norm: Optional[float] = None) -> optax.GradientTransformation:
  if name == "adafactor":  # T5X's fine-tuning settings
    tx = optax.adafactor(schedule, decay_rate=0.8, multiply_by_parameter_scale=True,
                         clipping_threshold=1.0, weight_decay_rate=weight_decay or None)
  elif name == "adamw":
    tx = optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=weight_decay)
  else:
    raise ValueError(f"optimizer must be adafactor|adamw, not {name!r}")
  return optax.chain(optax.clip_by_global_norm(clip_norm), tx) if clip_norm else tx


# --------------------------------------------------------------------------------------------
# Input


def input_batches(task, lengths: Mapping[str, int], batch_size: int, *, seed: int, pack: bool,
                  start_step: int = 0) -> Iterator[dict]:
  """Global-batch-sized dicts of numpy arrays for this process (its 1/process_count share).

  pack=True: first-fit packing (`recalign.tasks.packing`, ~87% of token slots used on ReAT at
  512/128 against seqio's next-fit ~68%); pack=False: every example padded to the lengths.
  """
  import seqio
  import tensorflow as tf
  n_proc, idx = jax.process_count(), jax.process_index()
  if batch_size % n_proc:
    raise ValueError(f"BATCH_SIZE={batch_size} must be divisible by the {n_proc} processes")
  ds = task.get_dataset(dict(lengths), split="train", shuffle=True, seed=seed, num_epochs=None,
                        shard_info=seqio.ShardInfo(idx, n_proc) if n_proc > 1 else None)
  if pack:
    ds = ds.map(lambda ex: {"inputs": ex["inputs"], "targets": ex["targets"]}).prefetch(tf.data.AUTOTUNE)
    batches = packing.pack_batches(ds.as_numpy_iterator(), lengths, batch_size // n_proc)
    # resume: the packed stream depends only on (seed, step), so skipping replays it exactly
    return itertools.islice(batches, start_step, None)
  ds = seqio.EncDecFeatureConverter(pack=False)(ds, dict(lengths))
  ds = ds.batch(batch_size // n_proc, drop_remainder=True)
  ds = ds.skip(start_step).prefetch(tf.data.AUTOTUNE)  # resume: the stream depends only on (seed, step)
  return ds.as_numpy_iterator()


# --------------------------------------------------------------------------------------------
# Checkpoints and validation settings


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """MODEL_DIR/checkpoints/<step>: every `every` steps (and the last, and on preemption), the newest
  `keep` kept. Evaluation results live in MODEL_DIR/eval, so rotating checkpoints never deletes them.
  A newest checkpoint that cannot be restored is an error naming it; with `restore_fallback` the run
  starts from the newest one that restores and the damaged ones are moved to checkpoints_damaged/."""
  every: int = 1000
  keep: int = 3
  restore_fallback: bool = False   # a damaged newest checkpoint: start from the previous one (moved aside)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ValidationConfig:
  """Validation during training: every `every` steps (or `every_minutes` of training) `task` (e.g.
  'beauty_retrieval') on its validation users -- a seeded sample of `examples` (default all) at `lengths`
  (default the training lengths). The best step by `selection_metric` (default the task's headline
  metric: retrieval ndcg@10, ranking score/ndcg@10, rating auc) is kept in MODEL_DIR/best.
  `patience`: stop early after that many validations in a row without a new best (as SASRec trains;
  0: never), counted from validation_log.jsonl, so a resumed run stops where an uninterrupted one would."""
  task: Optional[str] = None
  every: int = 0
  every_minutes: Optional[float] = None
  examples: Optional[int] = None
  lengths: Optional[Mapping[str, int]] = None
  selection_metric: Optional[str] = None
  patience: int = 0

  @property
  def enabled(self) -> bool:
    return bool(self.every or self.every_minutes)


def checkpoint_manager(model_dir: paths.PathLike, cfg: CheckpointConfig) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(paths.resolve(model_dir / "checkpoints"), options=ocp.CheckpointManagerOptions(
      save_interval_steps=cfg.every, max_to_keep=cfg.keep, create=True))


class KeepBest:
  """The best-checkpoint action: after each validation, saves the parameters to MODEL_DIR/best (and
  best.json) when `metric` improved -- the paper selects its unified models this way."""

  def __init__(self, model_dir: paths.PathLike, metric: str, is_chief: bool):
    self.dir, self.metric, self.is_chief = model_dir, metric, is_chief
    self.best = paths.read_json(model_dir / "best.json")

  def __call__(self, step: int, metrics: Mapping[str, float], params) -> bool:
    if self.best is not None:
      new, old = metrics[self.metric], self.best["metrics"][self.metric]
      if (new <= old) if M.higher_is_better(self.metric) else (new >= old):
        return False
    self.best = {"step": step, "metrics": dict(metrics), "selection_metric": self.metric}
    _save_params(self.dir / "best", params)
    if self.is_chief:
      (self.dir / "best.json").write_text(json.dumps(self.best, indent=2))
    return True


class TrainClock:
  """Minutes of training, validation excluded, carried over a resume: what budgets and learning
  curves count."""

  def __init__(self, minutes_so_far: float = 0.0):
    self.t0 = time.perf_counter() - 60 * minutes_so_far

  def minutes(self) -> float:
    return (time.perf_counter() - self.t0) / 60

  @contextlib.contextmanager
  def paused(self):
    t = time.perf_counter()
    yield
    self.t0 += time.perf_counter() - t


class PeriodicValidation:
  """The validation action: every `cfg.every` steps or `cfg.every_minutes` of training (and at the last
  step), runs `validate_fn(model, params)`, logs it (validation_log.jsonl, TensorBoard) and keeps the
  best step (`KeepBest`). Its time is not training time."""

  def __init__(self, cfg: ValidationConfig, validate_fn: Callable, model_dir, writer, is_chief: bool,
               clock: TrainClock):
    self.cfg, self.validate_fn, self.writer, self.is_chief, self.clock = cfg, validate_fn, writer, is_chief, clock
    self.log = model_dir / "validation_log.jsonl"
    self.keep_best = KeepBest(model_dir, cfg.selection_metric, is_chief)
    self.next_minute = self._next_minute()
    best_step = (self.keep_best.best or {}).get("step", -1)   # validations since the best (a resume)
    self.stale = sum(r["step"] > best_step for r in (paths.read_json_lines(self.log) or []))

  @property
  def exhausted(self) -> bool:
    """Early stopping: `patience` validations in a row brought no new best."""
    return bool(self.cfg.patience) and self.stale >= self.cfg.patience

  def _next_minute(self) -> float:
    every = self.cfg.every_minutes
    return (int(self.clock.minutes() / every) + 1) * every if every else float("inf")

  def due(self, step: int, final: bool) -> bool:
    if self.validate_fn is None or not self.cfg.enabled:
      return False
    return bool(final or (self.cfg.every and step % self.cfg.every == 0) or self.clock.minutes() >= self.next_minute)

  def __call__(self, model, params, step: int, examples_seen: int, final: bool) -> None:
    if not self.due(step, final):
      return
    minutes = self.clock.minutes()
    with self.clock.paused():
      val = self.validate_fn(model, params)
      _write_summaries(self.writer, step, {f"validation/{k}": v for k, v in val.items()})
      if self.is_chief:
        paths.append_line(self.log, json.dumps({"step": step, "examples_seen": examples_seen, "minutes": minutes,
                                                **val}))
      logging.info("step %d validation %s", step, val)
      self.stale = 0 if self.keep_best(step, val, params) else self.stale + 1
    self.next_minute = self._next_minute()


class NonFiniteSteps:
  """Steps whose loss, gradients or update were not finite (train_step did not apply them). "stop": the
  first one raises `faults.NonFiniteError` naming it and the last good checkpoint; "skip": counted
  (train_log.jsonl's skipped_steps) until MAX_SKIPPED_IN_A_ROW in a row, which stop the run as well."""
  MAX_SKIPPED_IN_A_ROW = 100

  def __init__(self, mode: str, skipped_so_far: int, mngr: ocp.CheckpointManager):
    self.mode, self.skipped, self.mngr = mode, skipped_so_far, mngr
    self.checked, self.in_a_row = 0, 0

  def check(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
    if step <= self.checked:
      return
    self.checked = step
    if bool(jax.device_get(metrics["finite"])):
      self.in_a_row = 0
      return
    self.skipped += 1
    self.in_a_row += 1
    loss, norm = (float(jax.device_get(metrics[k])) for k in ("loss", "grad_norm"))
    if self.mode == "skip" and self.in_a_row < self.MAX_SKIPPED_IN_A_ROW:
      logging.warning("step %d skipped: loss %s, gradient norm %s (%d skipped so far)", step, loss, norm,
                      self.skipped)
      return
    self.mngr.wait_until_finished()
    good = self.mngr.latest_step()
    where = (f"the last good checkpoint is step {good} in {self.mngr.directory}" if good is not None
             else "no checkpoint was saved yet")
    why = (f"{self.in_a_row} steps in a row were not finite" if self.mode == "skip" else
           "lower the learning rate, or set train.on_nonfinite = 'skip' to skip such steps")
    raise faults.NonFiniteError(f"step {step}: the loss or gradients are not finite (loss {loss}, gradient norm "
                                f"{norm}); the step was not applied and nothing of it saved; {where} ({why})")


class Saver:
  """orbax saves (every CheckpointConfig.every steps, and forced ones) that fail with a clear error: a full
  disk or an unwritable MODEL_DIR names the step and the newest complete checkpoint. orbax writes a step
  under a temporary name first, so a failed save never becomes the latest checkpoint."""

  def __init__(self, mngr: ocp.CheckpointManager, model_dir):
    self.mngr, self.dir, self.requested = mngr, model_dir, None

  def due(self, step: int, force: bool) -> bool:
    return force or self.mngr.should_save(step)

  def _failed(self, e: Exception) -> faults.CheckpointWriteError:
    good = ck.saved_steps(self.dir)
    return faults.CheckpointWriteError(
        f"saving the checkpoint of step {self.requested} in {self.dir}/checkpoints failed ({ck.first_line(e)}); "
        f"the newest complete checkpoint is {f'step {good[-1]}' if good else 'none'}: free space (or fix the "
        "permissions) and start the same command again to resume from it")

  def save(self, step: int, state, force: bool) -> None:
    try:
      if self.mngr.save(step, args=ocp.args.StandardSave(state), force=force):
        self.requested = step
    except Exception as e:   # an earlier asynchronous save's error surfaces here too
      self.requested = self.requested or step
      raise self._failed(e) from e

  def finish(self) -> None:
    try:
      self.mngr.wait_until_finished()
    except Exception as e:
      raise self._failed(e) from e


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


# --------------------------------------------------------------------------------------------
# State: restored or initialised, in T5X's order


def initial_state(model: EncoderDecoderModel, tx: optax.GradientTransformation, mesh: Mesh,
                  mngr: ocp.CheckpointManager, *, seed: int, initial_checkpoint_path: Optional[str] = None,
                  vocab=None, vocabulary_mismatch: str = "error",
                  restore_fallback: bool = False) -> tuple[dict, dict, str]:
  """(state, its shardings, where it came from). As T5X: the latest checkpoint in MODEL_DIR (resume:
  parameters, optimiser state, step) -> INITIAL_CHECKPOINT_PATH (parameters only) -> random init.
  State is {"step", "params", "opt_state"}; parameters are placed by LOGICAL_AXIS_RULES."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(seed)))
  param_sharding = param_shardings(model, mesh)
  latest = mngr.latest_step()
  with mesh:
    if latest is None and initial_checkpoint_path:
      loaded = ck.fit_vocabulary(ck.load_params(initial_checkpoint_path), initial_checkpoint_path, vocab,
                                 model.config.vocab_size, vocabulary_mismatch)
      ck.check_compatible(loaded, nn.unbox(boxed), initial_checkpoint_path)
      params = jax.device_put(jax.tree_util.tree_map(jnp.asarray, loaded), param_sharding)
      origin = f"initial checkpoint {initial_checkpoint_path}"
    else:
      params = jax.jit(lambda r: nn.unbox(model.init(r)), out_shardings=param_sharding)(jax.random.PRNGKey(seed))
      origin = f"random initialisation (seed {seed})"
    state = {"step": jnp.array(0, jnp.int32), "params": params, "opt_state": jax.jit(tx.init)(params)}
  # One sharding per state leaf, fixed for the whole run: without it the first step sees uncommitted
  # leaves (the step counter, optimiser slots) and the second step compiles the train step again.
  sharding = jax.tree_util.tree_map(
      lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else NamedSharding(mesh, P()), state)
  state = jax.device_put(state, sharding)
  if latest is not None:
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    state, step = restore_newest(mngr, abstract, fallback=restore_fallback)
    origin = f"MODEL_DIR checkpoint at step {step}"
  return state, sharding, origin


def restore_newest(mngr: ocp.CheckpointManager, abstract, *, fallback: bool = False) -> tuple[dict, int]:
  """(state, step) of the newest checkpoint that restores. One that does not (a crash mid-save, a truncated
  file) is an error that names it -- or, with `fallback`, older ones are tried and the damaged ones moved
  to MODEL_DIR/checkpoints_damaged/ (kept to inspect; never deleted, never skipped silently)."""
  root = paths.as_path(mngr.directory)
  failed = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:   # tensorstore reports damage as a bare Exception
      failed.append((step, ck.first_line(e)))
      if not fallback:
        older = [s for s in mngr.all_steps() if s < step]
        raise faults.CheckpointDamaged(
            f"checkpoint {root / str(step)} cannot be restored, it may be damaged (a crash while saving, a truncated "
            f"file): {failed[-1][1]}. " + (f"Set CheckpointConfig.restore_fallback = True to start from step "
                                           f"{max(older)} instead (the damaged one is moved to checkpoints_damaged/)"
                                           if older else "No older checkpoint is left to fall back on")) from e
      continue
    if failed:
      _set_aside(root, [s for s, _ in failed])
      mngr.reload()
      msg = (f"{root}: checkpoint(s) {', '.join(f'{s} ({why})' for s, why in failed)} could not be restored and "
             f"were moved to {root.parent / 'checkpoints_damaged'}; resuming from step {step}")
      logging.warning("%s", msg)
      print(f"warning: {msg}", file=sys.stderr, flush=True)
    return state, step
  raise faults.CheckpointDamaged(f"no checkpoint in {root} can be restored: " +
                                 "; ".join(f"step {s}: {why}" for s, why in failed))


def _set_aside(root, steps: Sequence[int]) -> None:
  if jax.process_index() == 0:
    aside = root.parent / "checkpoints_damaged"
    aside.mkdir(parents=True, exist_ok=True)
    for s in steps:
      target = aside / f"{s}.{time.strftime('%Y%m%d-%H%M%S')}"
      (root / str(s)).rename(target)
  if jax.process_count() > 1:   # every host lists the folder again only after it moved
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("recalign_restore_fallback")


# --------------------------------------------------------------------------------------------
# The step


def train_step(state: dict, batch: dict, *, model: EncoderDecoderModel, tx: optax.GradientTransformation,
               schedule: optax.Schedule, accum: int, dropout_key: jax.Array) -> tuple[dict, dict]:
  """One optimiser step; with accum > 1 the batch is split into `accum` micro-batches whose gradients
  are averaged (a scan, so memory holds one micro-batch's activations)."""
  key = jax.random.fold_in(dropout_key, state["step"])   # dropout: a pure function of the step
  grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)
  if accum == 1:
    (_, metrics), grads = grad_fn(state["params"], batch, key)
  else:
    micro = jax.tree_util.tree_map(lambda x: x.reshape((accum, -1) + x.shape[1:]), batch)

    def body(acc, mb_and_i):
      mb, i = mb_and_i
      (_, m), g = grad_fn(state["params"], mb, jax.random.fold_in(key, i))
      return jax.tree_util.tree_map(jnp.add, acc, g), m

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state["params"])
    grads, ms = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
    grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
    metrics = {k: (v.sum() if k == "target_tokens" else v.mean()) for k, v in ms.items()}
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  metrics["learning_rate"] = schedule(state["step"])
  metrics["grad_norm"] = optax.global_norm(grads)
  # A non-finite loss, gradient or update (a NaN learning rate) is not applied: the state stays the last
  # good one, so no checkpoint can ever hold NaN; the loop stops or counts the step (train.on_nonfinite).
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & jnp.isfinite(
      optax.global_norm(updates))
  new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}
  old = {"params": state["params"], "opt_state": state["opt_state"]}
  metrics["finite"] = finite
  return {"step": state["step"] + 1,
          **jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)}, metrics


# --------------------------------------------------------------------------------------------


@gin.configurable(denylist=["validate_fn", "optimizer", "schedule"])
def train(*, model_dir: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED, train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED, network_config: T5Config = gin.REQUIRED,
          data_dirs: Sequence[str] = (), initial_checkpoint_path: Optional[str] = None,
          vocabulary: Optional[str] = None, vocabulary_mismatch: str = "error", task_config=None,
          random_seed: int = 0, pack: bool = True, gradient_accumulation_steps: int = 1, model_parallel: int = 1,
          num_devices: Optional[int] = None, z_loss: float = 1e-4, label_smoothing: float = 0.0,
          loss_normalizing_factor="NUM_REAL_TARGET_TOKENS", checkpoint: Optional[CheckpointConfig] = None,
          validation: Optional[ValidationConfig] = None, log_every: int = 10,
          optimizer: Optional[optax.GradientTransformation] = None, schedule: Optional[optax.Schedule] = None,
          validate_fn: Optional[Callable[[EncoderDecoderModel, dict], dict]] = None,
          time_budget_s: Optional[float] = None, train_minutes_budget: Optional[float] = None,
          tensorboard: bool = True, progress: bool = True, on_nonfinite: str = "stop") -> dict:
  """Trains and returns the last step's metrics (plus the best validation metrics, if any).

  `loss_normalizing_factor` (as T5X): "NUM_REAL_TARGET_TOKENS" (mean over target tokens, so tasks with
  long targets such as MIM dominate a mixture's loss), "AVERAGE_PER_SEQUENCE" (every example weighs
  the same), a constant, or None.
  `task_config`: how DATA_DIRS are registered (`recalign.tasks.TaskConfig`: window, ID scheme,
  titles, ...), recorded in run.json for `recalign eval`.
  `vocabulary` (VOCABULARY): the tasks' vocabulary -- None for each data set's own, 'checkpoint' for
  the initial checkpoint's own SentencePiece model (fine-tuning T5 / FLAN-T5), or a path. It is
  recorded in run.json; an initial checkpoint trained with another vocabulary is an error unless
  `vocabulary_mismatch='resize'`.
  `checkpoint` / `validation`: `CheckpointConfig` / `ValidationConfig` (gin-configurable; defaults when
  None). `validate_fn(model, params) -> metrics` replaces the built-in validation of `validation.task`.
  `schedule` / `optimizer`: optax objects to use instead of gin's `learning_rate_schedule` /
  `make_optimizer` (the logged learning rate is `schedule`'s).
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
  import recalign.tasks as rt
  from recalign.data.vocab import describe, same_vocabulary
  from recalign.tasks.registry import get_vocabulary
  maybe_initialize_distributed()
  ckpt_cfg = checkpoint or CheckpointConfig()
  val_cfg = validation or ValidationConfig()
  model_dir = paths.as_path(model_dir)     # local, or gs:// (any etils.epath scheme)
  is_chief = jax.process_index() == 0
  _check_values(train_steps=train_steps, batch_size=batch_size, accum=gradient_accumulation_steps,
                log_every=log_every, checkpoint=ckpt_cfg, validation=val_cfg, on_nonfinite=on_nonfinite,
                lengths=task_feature_lengths)
  # one training job per MODEL_DIR (the chief holds the lock); its first write, so an unwritable
  # MODEL_DIR fails here
  if not is_chief:
    model_dir.mkdir(parents=True, exist_ok=True)
  with faults.ModelDirLock(model_dir) if is_chief else contextlib.nullcontext():

    # 1. vocabulary and tasks
    run_vocab = resolve_vocabulary(vocabulary, initial_checkpoint_path)
    for d in data_dirs:
      rt.register_dataset(d, vocab=run_vocab, config=task_config or rt.TaskConfig())
    task = rt.get(mixture_or_task_name)
    vocab = get_vocabulary(task)
    if run_vocab is not None and not same_vocabulary(getattr(vocab, "base", vocab), run_vocab):
      raise ValueError(f"{mixture_or_task_name} is registered with {describe(vocab)}, but VOCABULARY is "
                       f"{describe(run_vocab)}: register it with that vocabulary (or list its data in DATA_DIRS)")
    members = [t.name for t in getattr(task, "tasks", [task])]
    rt.registry.check_feature_lengths(task, task_feature_lengths)

    # 2. model, and the settings that would only fail (or do nothing) after steps of training
    model = EncoderDecoderModel(network_config.replace(vocab_size=padded_vocab_size(vocab.vocab_size)),
                                z_loss=z_loss, label_smoothing=label_smoothing, loss_normalize=loss_normalizing_factor)
    if val_cfg.selection_metric is None:   # the validation task's headline metric
      kind = rt.registry.task_info(val_cfg.task).kind if val_cfg.task else "retrieval"
      val_cfg = dataclasses.replace(val_cfg, selection_metric=headline_metric(kind))
    _check_settings(val_cfg, validate_fn, model_dir, vocab, batch_size, gradient_accumulation_steps)
    mesh = make_mesh(model_parallel, num_devices)
    if batch_size % (mesh.shape["data"] * gradient_accumulation_steps):
      raise ValueError(f"BATCH_SIZE={batch_size} is not divisible by the {mesh.shape['data']} data-parallel devices"
                       + (f" x {gradient_accumulation_steps} accumulation steps" if gradient_accumulation_steps > 1
                          else "") + f" ({jax.device_count()} devices, model_parallel={model_parallel})")
    if is_chief:  # what `recalign eval` needs to rebuild the model and its tasks next to its checkpoints
      RunRecord(network_config=dataclasses.asdict(model.config), mixture_or_task_name=mixture_or_task_name,
                task_feature_lengths=dict(task_feature_lengths), train_steps=train_steps,
                vocabulary=vocabulary_record(vocab), data_dirs=tuple(str(paths.resolve(d)) for d in data_dirs),
                task_config=dataclasses.asdict(rt.registry.task_info(members[0]).config)).write(model_dir)
    if validate_fn is None and val_cfg.enabled:
      validate_fn = make_validate_fn(val_cfg.task, dict(val_cfg.lengths or task_feature_lengths),
                                     max_examples=val_cfg.examples)

    # 3. partitioning and 4. state
    batch_sharding = NamedSharding(mesh, P("data"))
    t_start = time.perf_counter()
    schedule = schedule or learning_rate_schedule(total_steps=train_steps)
    tx = optimizer or make_optimizer(schedule)
    mngr = checkpoint_manager(model_dir, ckpt_cfg)
    state, state_sharding, origin = initial_state(
        model, tx, mesh, mngr, seed=random_seed, initial_checkpoint_path=initial_checkpoint_path, vocab=vocab,
        vocabulary_mismatch=vocabulary_mismatch, restore_fallback=ckpt_cfg.restore_fallback)
    logging.info("%s: starting from %s", model_dir, origin)
    start = int(state["step"])
    if start >= train_steps:
      logging.warning("%s is already trained to step %d (TRAIN_STEPS=%d): nothing to do; raise TRAIN_STEPS to "
                      "continue", model_dir, start, train_steps)
      print(f"{model_dir} is already at step {start} >= TRAIN_STEPS={train_steps}: nothing to train")
    step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                                        accum=gradient_accumulation_steps,
                                        dropout_key=jax.random.PRNGKey(random_seed + 1)),
                      in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None),
                      donate_argnums=0)
    eval_loss = jax.jit(lambda p, b: model.loss_fn(p, b)[1])

    # 5. input (+ fixed probe batches, one per mixture member, for per-task losses)
    lengths = dict(task_feature_lengths)
    batches = input_batches(task, lengths, batch_size, seed=random_seed, pack=pack, start_step=start)
    probes = {}
    if len(members) > 1:
      for name in members:
        probes[name] = next(input_batches(rt.get(name), lengths, min(batch_size, 32) // jax.process_count()
                                          * jax.process_count(), seed=random_seed + 7, pack=False))

    # 6. loop
    writer = _summary_writer(model_dir / "train") if is_chief and tensorboard else None
    log_path = model_dir / "train_log.jsonl"
    logged = (paths.read_json_lines(log_path) or [{}])[-1] if start else {}
    examples_seen = logged.get("examples_seen", 0)    # (carried over a resume, as the training minutes)
    clock = TrainClock(logged.get("minutes", 0.0))
    validate = PeriodicValidation(val_cfg, validate_fn, model_dir, writer, is_chief, clock)
    nonfinite = NonFiniteSteps(on_nonfinite, logged.get("skipped_steps", 0), mngr)
    saver = Saver(mngr, model_dir)
    budget_min = time_budget_s / 60 if time_budget_s else train_minutes_budget
    bar = tqdm(total=None if budget_min else train_steps, initial=start,  # a time budget: no step total
               desc="train" if not budget_min else f"train ({budget_min:.0f} min budget)",
               disable=not (progress and is_chief), dynamic_ncols=True)
    last = {}
    t_last, tok_last = time.perf_counter(), 0.0
    in_flight = None   # the previous step's metrics: the bar advances when a step completes, not when queued
    end = train_steps
    preempted = False
    if validate.exhausted and start:   # a resume of a run that already stopped early
      print(f"{model_dir} stopped early at step {start} (patience {val_cfg.patience}): nothing to train")
      end = start
    with mesh, faults.PreemptionWatcher() as preemption:
      for step in range(start, end):
        raw = next(batches)
        state, metrics = step_fn(state, to_global(raw, batch_sharding))
        tok_last += packing.real_tokens(raw) * jax.process_count()
        examples_seen += packing.num_examples(raw) * jax.process_count()
        done = step + 1
        if in_flight is not None:  # one step stays queued behind this wait, so the device never idles
          nonfinite.check(*in_flight)
          bar.update(done - 1 - bar.n)
        in_flight = (done, metrics)
        preempted = preemption.requested(done)
        out_of_time = ((time_budget_s is not None and time.perf_counter() - t_start > time_budget_s)
                       or (train_minutes_budget is not None and clock.minutes() > train_minutes_budget))
        final = done == train_steps or out_of_time or preempted
        if done % log_every == 0 or final:
          nonfinite.check(done, metrics)
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
          now = time.perf_counter()
          metrics["useful_tokens_per_s"] = tok_last / (now - t_last)
          t_last, tok_last = now, 0.0
          last = {"step": done, "examples_seen": examples_seen, "minutes": clock.minutes(), **metrics,
                  **({"skipped_steps": nonfinite.skipped} if nonfinite.skipped else {})}
          for name, probe in probes.items():  # every process takes part in the jitted call
            last[f"task_loss/{name}"] = float(eval_loss(state["params"], to_global(probe, batch_sharding))["loss"])
          if is_chief:
            paths.append_line(log_path, json.dumps(last))
            _write_summaries(writer, done, last)
          bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['useful_tokens_per_s']:.0f}",
                          lr=f"{metrics['learning_rate']:.2e}")
          bar.update(done - bar.n)
        if validate.due(done, final) or saver.due(done, final or validate.exhausted):
          nonfinite.check(done, in_flight[1])   # what is validated or saved is known to be finite
        validate(model, state["params"], done, examples_seen, final=final)
        stop = out_of_time or validate.exhausted or preempted
        saver.save(done, state, force=done == train_steps or stop)
        if stop:
          logging.info("%s at step %d", "preempted" if preempted else "time budget spent" if out_of_time else
                       f"early stop: no better {val_cfg.selection_metric} in {val_cfg.patience} validations", done)
          if is_chief and validate.exhausted and not out_of_time and not preempted:
            (model_dir / "early_stop.json").write_text(json.dumps({"step": done, "patience": val_cfg.patience,
                                                                   "best": validate.keep_best.best}, indent=2))
          break
    saver.finish()
    bar.update(int(state["step"]) - bar.n)
    bar.close()
    if writer is not None:
      writer.flush()
    if preempted:
      raise faults.Preempted(f"preempted: checkpoint saved at step {int(state['step'])} in {model_dir}/checkpoints; "
                             "start the same command again to resume from it")
    if not last and start >= end:   # a finished (or early-stopped) run: report its last logged step
      last = {k: v for k, v in ((paths.read_json_lines(log_path) or [{}])[-1]).items() if k != "examples_seen"}
    return {**last, "best": validate.keep_best.best}



def _check_values(*, train_steps: int, batch_size: int, accum: int, log_every: int, checkpoint: CheckpointConfig,
                  validation: ValidationConfig, on_nonfinite: str, lengths: Mapping[str, int]) -> None:
  """Values no run can use, refused before anything is read or compiled, with the setting's name."""
  checks = [(isinstance(train_steps, int) and train_steps > 0,
             f"TRAIN_STEPS must be a positive integer, not {train_steps!r}"),
            (isinstance(batch_size, int) and batch_size > 0,
             f"BATCH_SIZE must be a positive integer, not {batch_size!r}"),
            (isinstance(accum, int) and accum > 0,
             f"gradient_accumulation_steps must be a positive integer, not {accum!r}"),
            (log_every > 0, f"train.log_every must be positive, not {log_every!r}"),
            (checkpoint.every > 0, f"CheckpointConfig.every must be positive, not {checkpoint.every!r}"),
            (checkpoint.keep is None or checkpoint.keep > 0,
             f"CheckpointConfig.keep must be positive (or None: keep all), not {checkpoint.keep!r}"),
            (validation.every >= 0 and (validation.every_minutes or 0) >= 0 and validation.patience >= 0,
             "ValidationConfig.every, every_minutes and patience cannot be negative"),
            (validation.examples is None or validation.examples > 0,
             f"ValidationConfig.examples must be positive (or None: all), not {validation.examples!r}"),
            (on_nonfinite in ("stop", "skip"), f"train.on_nonfinite must be 'stop' or 'skip', not {on_nonfinite!r}")]
  for ok, message in checks:
    if not ok:
      raise ValueError(message)
  if set(lengths) != {"inputs", "targets"} or not all(isinstance(v, int) and v > 0 for v in lengths.values()):
    raise ValueError(f"TASK_FEATURE_LENGTHS must be {{'inputs': n, 'targets': m}} with positive integers, not "
                     f"{dict(lengths)!r}")


def _check_settings(val: ValidationConfig, validate_fn, model_dir: paths.PathLike, vocab, batch_size: int,
                    accum: int) -> None:
  """Settings that would fail (or silently do nothing) after steps of training are errors now."""
  import recalign.tasks as rt
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
  if batch_size % accum:
    raise ValueError(f"BATCH_SIZE={batch_size} is not divisible by gradient_accumulation_steps={accum}")
  previous = RunRecord.read(model_dir)
  if previous and previous.vocabulary and previous.vocabulary["sha256"] != vocabulary_record(vocab)["sha256"]:
    raise ValueError(f"{model_dir} was trained with {previous.vocabulary['path']}, not "
                     f"{describe(vocab)}: use another MODEL_DIR")


def _save_params(path, params) -> None:
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(paths.resolve(path) / "default", {"params": params}, force=True)
  ckptr.wait_until_finished()


def _summary_writer(path):
  import tensorflow as tf
  return tf.summary.create_file_writer(str(path))


def _write_summaries(writer, step: int, values: Mapping[str, float]) -> None:
  if writer is None:
    return
  import tensorflow as tf
  with writer.as_default():
    for k, v in values.items():
      if k != "step" and isinstance(v, (int, float)):
        tf.summary.scalar(k, v, step=step)
