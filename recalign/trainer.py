"""The trainer's parts, below train.py (T5X's trainer.py / utils.py): optimiser and learning-rate schedule,
input batches, the train state (initialised, or restored from the newest checkpoint that restores),
the jitted train step, and the loop's actions -- checkpoint saving, periodic validation with the best
step kept and early stopping, non-finite steps, the training clock and TensorBoard summaries.
train.train() puts them together; nothing here knows about a CLI or gin files beyond the
configurables it offers (learning_rate_schedule, make_optimizer, CheckpointConfig, ValidationConfig)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import time
from typing import Callable, Mapping, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from recalign import faults, paths
from recalign import metrics as M
from recalign.models import checkpoints as ck
from recalign.models.model import EncoderDecoderModel
from recalign.models.network import T5Config
from recalign.partitioning import param_shardings, to_global
from recalign.tasks import packing

# --------------------------------------------------------------------------------------------
# What a run trains (T5X's utils.DatasetConfig and model settings)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """What is trained on: a registered task or mixture at `task_feature_lengths`, in global batches of
  `batch_size` examples, packed first-fit (`pack`) or padded. `data_dirs`: prepared data sets registered
  for this run with `task_config` (`recalign.tasks.TaskConfig`: window, ID scheme, titles, ...), replacing
  an earlier registration of the same names; both are recorded in run.json for `recalign eval`."""
  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  batch_size: int
  data_dirs: Sequence[str] = ()
  task_config: Optional[object] = None   # a recalign.tasks.TaskConfig (None: its defaults)
  pack: bool = True


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model trained: the network (`T5Config`, a model file's NETWORK_CONFIG; its vocabulary size is the
  tasks'), where its parameters start, and its loss.

  `initial_checkpoint_path`: a recalign run, a T5X or a Hugging Face checkpoint (None: random init).
  `vocabulary` (VOCABULARY): None for each data set's own vocab/spm.model, 'checkpoint' for the initial
  checkpoint's own SentencePiece model (fine-tuning T5 / FLAN-T5), or a path; recorded in run.json. An
  initial checkpoint trained with another vocabulary is an error unless `vocabulary_mismatch='resize'`.
  `loss_normalizing_factor` (as T5X): "NUM_REAL_TARGET_TOKENS" (mean over target tokens, so tasks with long
  targets such as MIM dominate a mixture's loss), "AVERAGE_PER_SEQUENCE" (every example weighs the same),
  a constant, or None."""
  network: T5Config
  initial_checkpoint_path: Optional[str] = None
  vocabulary: Optional[str] = None
  vocabulary_mismatch: str = "error"
  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  loss_normalizing_factor: object = "NUM_REAL_TARGET_TOKENS"

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


INPUT_STATE = "input_state"   # MODEL_DIR/input_state/<step>/: the input stream's state at a checkpoint


class InputBatches:
  """The global batch's share of this process (numpy dicts), and the state that resumes them.

  pack=True: first-fit packing (`recalign.tasks.packing`, ~87% of token slots used on ReAT at
  512/128 against seqio's next-fit ~68%); pack=False: every example padded to the lengths.

  The stream depends only on (seed, step). A run resumed at step S either restores the stream's state
  saved at S (`save`: the tf.data iterator of seqio's pipeline, shuffle buffers included, as T5X
  checkpoints its dataset iterator, and the examples waiting in the packer) or replays it from step 0,
  which renders every example trained on so far again: ~6 minutes at step 4,000 of a Beauty run on 2
  CPU cores. Both give the same batches (tests/test_faults.py).
  """

  def __init__(self, task, lengths: Mapping[str, int], batch_size: int, *, seed: int, pack: bool):
    n_proc, self.process = jax.process_count(), jax.process_index()
    if batch_size % n_proc:
      raise ValueError(f"BATCH_SIZE={batch_size} must be divisible by the {n_proc} processes")
    self._args = task, dict(lengths), batch_size // n_proc, seed, pack, n_proc
    self._start()

  def _start(self) -> None:
    """The stream from its first batch, built afresh (a second iterator of one tf.data pipeline may shuffle
    differently)."""
    import seqio
    import tensorflow as tf
    task, lengths, rows, seed, pack, n_proc = self._args
    ds = task.get_dataset(lengths, split="train", shuffle=True, seed=seed, num_epochs=None,
                          shard_info=seqio.ShardInfo(self.process, n_proc) if n_proc > 1 else None)
    if pack:
      ds = ds.map(lambda ex: {"inputs": ex["inputs"], "targets": ex["targets"]})
    else:
      ds = seqio.EncDecFeatureConverter(pack=False)(ds, lengths)
      ds = ds.batch(rows, drop_remainder=True)
    options = tf.data.Options()   # the shuffles' seed-generator handles hold no state of the stream
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    self._iterator = iter(ds.prefetch(tf.data.AUTOTUNE).with_options(options))
    self._numpy = (jax.tree.map(lambda t: t.numpy(), x) for x in self._iterator)
    self._packer = packing.Packer(self._numpy, lengths, rows) if pack else None

  def __iter__(self) -> "InputBatches":
    return self

  def __next__(self) -> dict:
    return next(self._packer if self._packer is not None else self._numpy)

  def _files(self, model_dir, step: int) -> tuple[paths.epath.Path, paths.epath.Path]:
    d = paths.as_path(model_dir) / INPUT_STATE / str(step)
    return d / f"process_{self.process}", d / f"process_{self.process}_waiting.npz"

  def save(self, model_dir, step: int) -> None:
    """The state after `step` batches, to MODEL_DIR/input_state/<step>/ (the older states removed)."""
    import tensorflow as tf
    iterator, waiting = self._files(model_dir, step)
    iterator.parent.mkdir(parents=True, exist_ok=True)
    tf.train.Checkpoint(iterator=self._iterator).write(str(iterator))
    with waiting.open("wb") as f:   # written last: a state without it is incomplete, and not read
      np.savez(f, **(self._packer.state() if self._packer is not None else {}))
    self._remove_states(model_dir, but=step)

  def _remove_states(self, model_dir, but: Optional[int] = None) -> None:
    root = paths.as_path(model_dir) / INPUT_STATE
    if self.process == 0 and root.exists():
      for old in root.iterdir():
        if old.name != str(but):
          old.rmtree()

  def save_if_due(self, model_dir, step: int, policy: str, *, preempted: bool, checkpointed: bool) -> None:
    """Saves the state as `CheckpointConfig.input_state` asks: at a preemption's checkpoint, or every one.
    A checkpoint saved without it makes the older states useless (a resume starts at the newest
    checkpoint), so they go: a finished run keeps none."""
    if (preempted and policy != "never") or (policy == "every" and checkpointed):
      self.save(model_dir, step)
    elif checkpointed:
      self._remove_states(model_dir)

  def resume(self, model_dir, step: int) -> str:
    """Positions the stream after `step` batches: from the state saved at `step`, else by replaying it."""
    import tensorflow as tf
    iterator, waiting = self._files(model_dir, step)
    if step and waiting.exists():
      try:
        if self._packer is not None:
          with waiting.open("rb") as f:
            self._packer.restore(dict(np.load(f)))
        tf.train.Checkpoint(iterator=self._iterator).read(str(iterator)).assert_consumed()
        return f"input restored at step {step} ({iterator.parent})"
      except Exception as e:   # the replay below gives the same batches, only slower
        logging.warning("input state of step %d unreadable (%s): replaying the stream", step, ck.first_line(e))
        self._start()   # from the first batch: a failed read may have moved the stream
    if step and self.process == 0:
      print(f"resuming at step {step}: replaying the input stream up to it (no input state saved at that step)",
            file=sys.stderr, flush=True)
    for _ in range(step):
      next(self)
    return f"input replayed to step {step}" if step else "input from the start"


# --------------------------------------------------------------------------------------------
# Checkpoints, validation and the loop's actions


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
  # the input stream's state (MODEL_DIR/input_state, the newest only) is saved with the checkpoint a
  # preemption forces ("preemption"), with "every" checkpoint (a crash resumes fast too; ~100 MB and ~6 s a
  # save on Beauty's ReAT), or "never"; a resume without it replays the stream (the same batches, slower)
  input_state: str = "preemption"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ValidationConfig:
  """Validation during training: every `every` steps (or `every_minutes` of training) `task` (e.g.
  'beauty_retrieval') on its validation users -- a seeded sample of `examples` (default all) at `lengths`
  (default the training lengths). The best step by `selection_metric` (default the task's headline
  metric: retrieval ndcg@10, ranking score/ndcg@10, rating auc) is kept in MODEL_DIR/best.
  `patience`: stop early after that many validations in a row without a new best (as SASRec trains;
  0: never), counted from validation_log.jsonl, so a resumed run stops where an uninterrupted one would.
  With an exponential moving average of the parameters (train's `ema_decay`) the average is validated and
  kept; `raw_too` validates the trained parameters as well and logs them as raw/<metric> (a paired
  measurement of what the average gives; twice the validation time; never selects)."""
  task: Optional[str] = None
  every: int = 0
  every_minutes: Optional[float] = None
  examples: Optional[int] = None
  lengths: Optional[Mapping[str, int]] = None
  selection_metric: Optional[str] = None
  patience: int = 0
  raw_too: bool = False

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
    save_params(self.dir / "best", params)
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


def rewound_log(path, step: int, is_chief: bool) -> list[dict]:
  """A JSON-lines log of a run (re)starting from its checkpoint at `step`: the entries up to it. Steps logged
  after the newest checkpoint (before a crash) are trained and logged again by the resumed run, so the chief
  drops them from the file: every step once, and examples seen and minutes go on from the checkpoint's."""
  rows = paths.read_json_lines(path) or []
  kept = [r for r in rows if r["step"] <= step]
  if is_chief and len(kept) < len(rows):
    logging.info("%s: %d entries after step %d dropped (the resumed run logs those steps again)", path,
                 len(rows) - len(kept), step)
    paths.as_path(path).write_text("".join(json.dumps(r) + "\n" for r in kept))
  return kept


class TrainLog:
  """The logging action: every `every` steps (and the last) the step's metrics -- loss, accuracy, learning
  rate, useful tokens/s, examples seen, minutes of training, the mixture members' probe losses -- go to
  train_log.jsonl, TensorBoard and the progress bar. Examples seen and minutes carry over a resume from
  the step `start` (`rewound_log`)."""

  def __init__(self, model_dir, every: int, writer, is_chief: bool, bar, probes: "TaskProbes", start: int):
    self.path, self.every, self.writer, self.is_chief, self.bar, self.probes = (
        model_dir / "train_log.jsonl", every, writer, is_chief, bar, probes)
    self.previous = (rewound_log(self.path, start, is_chief) or [{}])[-1]
    self.examples_seen = self.previous.get("examples_seen", 0)
    self.last: dict = {}
    self.t_last, self.tokens = time.perf_counter(), 0.0

  def count(self, raw: Mapping) -> None:
    """A batch trained on (this process's share of it)."""
    self.tokens += packing.real_tokens(raw) * jax.process_count()
    self.examples_seen += packing.num_examples(raw) * jax.process_count()

  def due(self, step: int, final: bool) -> bool:
    return step % self.every == 0 or final

  def __call__(self, step: int, metrics: Mapping[str, jax.Array], params, *, minutes: float, skipped: int) -> None:
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
    now = time.perf_counter()
    metrics["useful_tokens_per_s"] = self.tokens / (now - self.t_last)
    self.t_last, self.tokens = now, 0.0
    self.last = {"step": step, "examples_seen": self.examples_seen, "minutes": minutes, **metrics,
                 **({"skipped_steps": skipped} if skipped else {}), **self.probes(params)}
    if self.is_chief:
      paths.append_line(self.path, json.dumps(self.last))
      write_summaries(self.writer, step, self.last)
    self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['useful_tokens_per_s']:.0f}",
                         lr=f"{metrics['learning_rate']:.2e}")
    self.bar.update(step - self.bar.n)


class TaskProbes:
  """A mixture's per-task losses: each member's loss on a fixed batch of its own examples (seed + 7),
  logged beside the mixture's loss. A single task has none."""

  def __init__(self, model: EncoderDecoderModel, members: Sequence, lengths: Mapping[str, int], batch_size: int,
               seed: int, sharding: NamedSharding):
    per = min(batch_size, 32) // jax.process_count() * jax.process_count()
    self.batches = {t.name: to_global(next(InputBatches(t, lengths, per, seed=seed + 7, pack=False)), sharding)
                    for t in members} if len(members) > 1 else {}
    self.loss = jax.jit(lambda p, b: model.loss_fn(p, b)[1]["loss"])

  def __call__(self, params) -> dict[str, float]:   # every process takes part in the jitted call
    return {f"task_loss/{name}": float(self.loss(params, batch)) for name, batch in self.batches.items()}


class PeriodicValidation:
  """The validation action: every `cfg.every` steps or `cfg.every_minutes` of training (and at the last
  step), runs `validate_fn(model, params)`, logs it (validation_log.jsonl, TensorBoard) and keeps the
  best step (`KeepBest`). Its time is not training time."""

  def __init__(self, cfg: ValidationConfig, validate_fn: Callable, model_dir, writer, is_chief: bool,
               clock: TrainClock, start: int = 0):
    self.cfg, self.validate_fn, self.writer, self.is_chief, self.clock = cfg, validate_fn, writer, is_chief, clock
    self.log = model_dir / "validation_log.jsonl"
    self.keep_best = KeepBest(model_dir, cfg.selection_metric, is_chief)
    self.next_minute = self._next_minute()
    best_step = (self.keep_best.best or {}).get("step", -1)   # validations since the best (a resume)
    self.stale = sum(r["step"] > best_step for r in rewound_log(self.log, start, is_chief))

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

  def __call__(self, model, params, step: int, examples_seen: int, final: bool, raw=None) -> None:
    """Validates (and may keep as the best) `params`; `raw`: the trained parameters when `params` is their
    moving average, validated beside it with `cfg.raw_too`."""
    if not self.due(step, final):
      return
    minutes = self.clock.minutes()
    with self.clock.paused():
      val = self.validate_fn(model, params)
      if raw is not None and self.cfg.raw_too:
        val.update({f"raw/{k}": v for k, v in self.validate_fn(model, raw).items()})
      write_summaries(self.writer, step, {f"validation/{k}": v for k, v in val.items()})
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

  def saved(self, step: int) -> bool:
    return self.requested == step

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


# --------------------------------------------------------------------------------------------
# State: restored or initialised, in T5X's order


def initial_state(model: EncoderDecoderModel, tx: optax.GradientTransformation, mesh: Mesh,
                  mngr: ocp.CheckpointManager, *, seed: int, initial_checkpoint_path: Optional[str] = None,
                  vocab=None, vocabulary_mismatch: str = "error", restore_fallback: bool = False,
                  ema: bool = False) -> tuple[dict, dict, str]:
  """(state, its shardings, where it came from). As T5X: the latest checkpoint in MODEL_DIR (resume:
  parameters, optimiser state, step) -> INITIAL_CHECKPOINT_PATH (parameters only) -> random init.
  State is {"step", "params", "opt_state"} (+ "ema_params" with `ema`: the moving average, starting at the
  initial parameters); parameters are placed by LOGICAL_AXIS_RULES."""
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
    if ema:   # a copy: the step donates the state, and one buffer cannot be donated twice
      state["ema_params"] = jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p), out_shardings=param_sharding)(params)
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


def ema_rate(ema_decay: float, step) -> jax.Array:
  """The moving average's decay at `step` (0-based): `ema_decay`, lower while few steps are averaged
  ((1 + step) / (10 + step), as tf.train.ExponentialMovingAverage with num_updates), so the random
  initialisation is forgotten within the first steps."""
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def eval_params(state: dict):
  """What validation scores and MODEL_DIR/best keeps: the moving average when the run keeps one."""
  return state.get("ema_params", state["params"])


def train_step(state: dict, batch: dict, *, model: EncoderDecoderModel, tx: optax.GradientTransformation,
               schedule: optax.Schedule, accum: int, dropout_key: jax.Array,
               ema_decay: Optional[float] = None) -> tuple[dict, dict]:
  """One optimiser step; with accum > 1 the batch is split into `accum` micro-batches whose gradients
  are averaged (a scan, so memory holds one micro-batch's activations). With `ema_decay`, the state's
  "ema_params" move toward the new parameters (Polyak averaging; `ema_rate`)."""
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
  if ema_decay is not None:
    d = ema_rate(ema_decay, state["step"].astype(jnp.float32))
    new["ema_params"] = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, state["ema_params"], new["params"])
    old["ema_params"] = state["ema_params"]
  metrics["finite"] = finite
  return {"step": state["step"] + 1,
          **jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)}, metrics


# --------------------------------------------------------------------------------------------
# Files beside the checkpoints: the best parameters, TensorBoard summaries


def save_params(path, params) -> None:
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(paths.resolve(path) / "default", {"params": params}, force=True)
  ckptr.wait_until_finished()


def summary_writer(path):
  import tensorflow as tf
  return tf.summary.create_file_writer(str(path))


def write_summaries(writer, step: int, values: Mapping[str, float]) -> None:
  if writer is None:
    return
  import tensorflow as tf
  with writer.as_default():
    for k, v in values.items():
      if k != "step" and isinstance(v, (int, float)):
        tf.summary.scalar(k, v, step=step)
