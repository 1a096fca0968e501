"""Building blocks for experiments over recalign's library (the demo and the studies in tools/ use them):
named recipes, prepare once, train for a budget in minutes or steps, evaluate the best step, resumable
result files, the validation users that pick a checkpoint and the ones reported, and a training plot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from collections.abc import Mapping
from typing import Optional, Sequence

@dataclasses.dataclass(frozen=True)
class Recipe:
  """A named recipe: a gin run file shipped in the package -- the very file a user passes to `recalign train
  --gin_file=...` -- the mixture it trains (a suffix: reat -> beauty_reat) and gin bindings on top of it
  (as --gin.NAME=value would give them)."""
  run_file: str
  mixture: str
  bindings: tuple[str, ...] = ()

  def bind(self, *bindings: str) -> "Recipe":
    return dataclasses.replace(self, bindings=self.bindings + tuple(bindings))


RECIPES = {
    "paper": Recipe("recalign/gin/runs/cpu_paper.gin", "reat"),
    "compact": Recipe("recalign/gin/runs/cpu_compact.gin", "retrieval"),
    "bare": Recipe("recalign/gin/runs/cpu_bare.gin", "retrieval"),
}
DEFAULT_RECIPE = "bare"


@contextlib.contextmanager
def recipe_config(recipe: Recipe, bindings: Sequence[str] = ()):
  """gin holds `recipe` (its run file, its bindings, then `bindings`) and nothing else inside the block,
  and nothing after it. The run's own macros (MODEL_DIR, MIXTURE_OR_TASK_NAME) get placeholders when
  `bindings` do not set them, so the recipe's settings can be read before a run (`dataset_config`)."""
  import gin
  placeholders = ["MODEL_DIR = '/nonexistent'", "MIXTURE_OR_TASK_NAME = 'unset'"]
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings([recipe.run_file], [*placeholders, *recipe.bindings, *bindings])
    yield
  finally:
    gin.clear_config()


def dataset_config(recipe: Recipe, bindings: Sequence[str] = ()):
  """The recipe's `trainer.DatasetConfig` (lengths, batch size, TaskConfig) as its gin file makes it."""
  from recalign import trainer
  with recipe_config(recipe, bindings):
    return trainer.DatasetConfig()


def ensure_prepared(source: Path, out: Path, name: str, kcore: int = 5,
                    id_schemes: Sequence[str] | Mapping[str, dict] = ()) -> Path:
  """Prepares `source` into `out` once (again when the source files change): split, random IDs, the
  `id_schemes` (built from training sequences only; a mapping gives each scheme its `build_ids` settings,
  e.g. {"hybrid": {"leaf": "item"}}: IDs built with other settings are built again) and a vocabulary
  holding their pieces."""
  from recalign.data import PreparedData, prepare, read_source, tfds_data
  from recalign.data.ingest import sha256_file
  from recalign.data.prepare import format_stats
  fresh = True
  if (out / "manifest.json").exists() and (out / "vocab" / "spm.model").exists():
    manifest = json.loads((out / "manifest.json").read_text())
    fresh = not all(Path(p).exists() and sha256_file(Path(p)) == h for p, h in manifest["source"]["files"].items())
  if fresh:
    tfds_data.save(prepare(read_source(source), name=name, kcore=kcore), out)
    print(format_stats(PreparedData.load(out).manifest))
  else:
    print(f"[recalign] using prepared {out}")
  if not tfds_data.directory(out).exists():   # prepared by an older recalign
    tfds_data.write(PreparedData.load(out), out)
  ensure_ids(out, id_schemes, new_vocabulary=fresh)
  return out


def ensure_ids(out: Path, id_schemes: Sequence[str] | Mapping[str, dict] = (), new_vocabulary: bool = False) -> None:
  """The prepared folder `out` with the `id_schemes` (built from its training sequences only; a mapping gives
  each scheme its `build_ids` settings: IDs built with other settings are built again), and, when any was
  built (or `new_vocabulary`), a vocabulary trained again to hold their pieces."""
  from recalign.data import PreparedData
  from recalign.data.ids import build_ids, scheme_pieces
  from recalign.data.vocab import train_vocabulary
  data = PreparedData.load(out)
  settings = dict(id_schemes) if isinstance(id_schemes, Mapping) else {s: {} for s in id_schemes}
  built = data.manifest.get("id_schemes", {})
  missing = [s for s, kw in settings.items() if not (out / "ids" / f"{s}.json").exists()
             or any(built.get(s, {}).get("params", {}).get(k) != v for k, v in kw.items())]
  for scheme in missing:
    print(f"[recalign] building {scheme} item IDs" + (f" ({settings[scheme]})" if settings[scheme] else ""))
    build_ids(data, scheme, **settings[scheme]).save(out)
  if new_vocabulary or missing:
    train_vocabulary(data, out / "vocab", pieces=scheme_pieces(out))


def ensure_subset(data_dir: Path, fraction: float, seed: int = 0,
                  id_schemes: Sequence[str] | Mapping[str, dict] = ()) -> Path:
  """<data_dir>_users<pct>: a seeded fraction of a prepared data set's users (`prepare.subset_users`), with
  a vocabulary; written once. Item IDs other than random ones (`id_schemes`, as `ensure_ids`) are built
  again from the subset's own training sequences (the full set's are built from users the subset has not)."""
  import shutil
  from recalign.data import PreparedData, tfds_data
  from recalign.data.prepare import subset_users
  out = data_dir.parent / f"{data_dir.name}_users{round(fraction * 100)}"
  if not (out / "manifest.json").exists():
    shutil.copytree(data_dir / "vocab", out / "vocab", dirs_exist_ok=True)   # first: manifest.json marks it done
    full = PreparedData.load(data_dir)
    tfds_data.save(subset_users(full, fraction, seed, len(full.validation_users)), out)
  ensure_ids(out, id_schemes)
  return out


def train_model(data_dir: Path, model_dir: Path, mixture: str, validation_task: Optional[str], minutes: Optional[float],
                size: Optional[str], seed: int, recipe: Recipe = RECIPES["paper"],
                eval_every_minutes: Optional[float] = None, validation_examples: Optional[int] = None,
                steps: Optional[int] = None, extra: Sequence[str] = ()) -> dict:
  """Trains `recipe` through gin, as `recalign train` does (MODEL_DIR/config.gin is the file to run it again
  with), for `minutes` of training (validation excluded) or `steps`, validating every `eval_every_minutes`;
  `size`: a model size other than the recipe's (MODEL_SIZE); `extra`: gin bindings applied last."""
  import gin
  from recalign import train as T
  from recalign.data import PreparedData
  from recalign.faults import ModelDirLock
  t0 = time.time()
  if validation_examples is None and eval_every_minutes:
    validation_examples = selection_size(len(PreparedData.load(data_dir).validation_users))
  with recipe_config(recipe, [
      f"MODEL_DIR = {str(model_dir)!r}", f"DATA_DIRS = [{str(data_dir)!r}]", f"MIXTURE_OR_TASK_NAME = {mixture!r}",
      f"RANDOM_SEED = {seed}", f"TRAIN_STEPS = {steps or 10 ** 7}", "train.log_every = 25",
      f"train.train_minutes_budget = {minutes!r}", f"ValidationConfig.task = {validation_task!r}",
      f"ValidationConfig.every_minutes = {eval_every_minutes!r}",
      f"ValidationConfig.examples = {validation_examples!r}",
      *([f"MODEL_SIZE = {size!r}"] if size else []), *extra]):
    if gin.query_parameter("learning_rate_schedule.decay") == "linear" and not steps:
      raise ValueError("a linear decay needs a budget in steps (the number of steps of a minutes budget is unknown)")
    model_dir.mkdir(parents=True, exist_ok=True)
    with ModelDirLock(model_dir):   # (train() takes it again) as the CLI: a second job must not overwrite config.gin
      (model_dir / "config.gin").write_text(gin.config_str())
      out = T.train()
  print(f"[recalign] trained {mixture} for {out['step']} steps in {(time.time() - t0) / 60:.1f} min")
  return out


def pending_runs(results_path: Path, rows, seeds) -> tuple[dict, list[tuple[str, str, int]]]:
  """A resumable study: (the results `results_path` holds, the (key, row, seed) runs it lacks)."""
  results = json.loads(results_path.read_text()) if results_path.exists() else {}
  return results, [(f"{r}/seed{s}", r, s) for r in rows for s in seeds if f"{r}/seed{s}" not in results]


def train_sasrecs(data, seed: int, epochs: int, exclude_history: bool) -> tuple[dict, dict]:
  """SASRec-BCE and SASRec-CE (sampled softmax, the strongest CE variant that converges in minutes), both
  budgeted in epochs and stopped early on validation NDCG@10, so the bar does not depend on the machine's
  speed: ({label: (model, params, log)}, {label: what trained})."""
  from recalign.baselines.sasrec import SASRecConfig, train_sasrec
  models, summary = {}, {}
  for label, loss in (("BCE", "bce"), ("CE", "sampled_ce")):
    t0 = time.time()
    models[label] = train_sasrec(data, SASRecConfig(seed=seed, loss=loss, epochs=epochs,
                                                    exclude_history=exclude_history))
    log = models[label][2]
    best = max((e for e in log if "validation_ndcg@10" in e), key=lambda e: e["validation_ndcg@10"], default=log[-1])
    summary[label] = {"loss": loss, "epochs": len(log), "best_epoch": best["epoch"],
                      "minutes": round((time.time() - t0) / 60, 2)}
  return models, summary


SELECTION_USERS = 1000  # validation users that pick the best step during training (not reported); with
                        # 500, one hit moved NDCG@10 by ~0.002 and the pick was mostly noise


def selection_size(num_validation: int) -> int:
  """How many validation users pick the checkpoint: 1,000, at most half of them (tiny data sets)."""
  return min(SELECTION_USERS, num_validation // 2)


def evaluate_best(model_dir: Path, task: str, split: str, *, example_ids=None, max_examples=None,
                  lengths: Optional[dict] = None, exclude_history: bool = False):
  """Evaluates MODEL_DIR/best (or the latest checkpoint) on one split of `task`; returns the EvalResult."""
  from recalign.evaluate import EvalSettings, evaluate_checkpoint
  from recalign.models.checkpoints import saved_steps
  path = model_dir / "best" if (model_dir / "best").exists() else model_dir / "checkpoints" / str(
      saved_steps(model_dir)[-1])
  settings = EvalSettings(split=split, beam_size=20, batch_size=64, max_examples=max_examples,
                          exclude_history=exclude_history, lengths=lengths)
  return evaluate_checkpoint(path, [task], settings, example_ids=example_ids)[task]


def report_ids(task: str, split: str, max_examples: Optional[int] = None):
  """Example ids a demo reports on: validation users not used to pick the checkpoint (disjoint from
  the selection sample), test users all or a seeded sample."""
  import numpy as np
  import recalign.tasks as rt
  from recalign.evaluator import sample_example_ids
  n = rt.get(task).num_input_examples(split)
  ids = np.arange(n)
  if split == "validation":   # the same seeded sample train() validates on (evaluate.task_examples)
    ids = np.setdiff1d(ids, sample_example_ids(n, selection_size(n)))
  sample = sample_example_ids(len(ids), max_examples, seed=1)
  return ids if sample is None else ids[sample]


def plot(model_dir: Path, png: Path, title: str, metric: str = "ndcg@10") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  train = [json.loads(x) for x in (model_dir / "train_log.jsonl").read_text().splitlines()]
  vpath = model_dir / "validation_log.jsonl"
  val = [json.loads(x) for x in vpath.read_text().splitlines()] if vpath.exists() else []
  fig, ax = plt.subplots(figsize=(8, 4.5))
  ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="training loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss", color="tab:blue")
  if val:
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in val], [r[metric] for r in val], "o-", color="tab:red",
             label=f"validation {metric}")
    ax2.set_ylabel(f"validation {metric}", color="tab:red")
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(png, dpi=120)
  plt.close(fig)
