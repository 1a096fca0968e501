"""Building blocks for experiments over recalign's library (the demo and the studies in tools/ use them):
named recipes, prepare once, train for a budget in minutes or steps, evaluate the best step, resumable
result files, the validation users that pick a checkpoint and the ones reported, and a training plot.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

DEMO_LENGTHS = {"inputs": 320, "targets": 64}


@dataclasses.dataclass(frozen=True)
class Recipe:
  mixture: str              # the mixture's suffix: reat -> beauty_reat, retrieval -> beauty_retrieval
  data: dict                # TaskConfig fields
  lengths: dict
  batch_size: int = 32
  learning_rate: float = 2e-3
  warmup_steps: int = 300
  dropout: float = 0.1
  dtype: str = "float32"
  decay: str = "constant"   # learning_rate_schedule: constant, rsqrt (no total needed) or linear


RECIPES = {
    "paper": Recipe("reat", {}, DEMO_LENGTHS),
    "compact": Recipe("retrieval", {"with_titles": False, "item_prefix": False, "id_scheme": "collaborative"},
                      {"inputs": 128, "targets": 16}, batch_size=64, learning_rate=5e-3, warmup_steps=50,
                      dropout=0.0, dtype="bfloat16"),
    "bare": Recipe("retrieval", {"with_titles": False, "item_prefix": False, "prompt_words": False,
                                 "id_scheme": "collaborative"},
                   {"inputs": 96, "targets": 16}, batch_size=64, learning_rate=5e-3, warmup_steps=50,
                   dropout=0.0, dtype="bfloat16", decay="rsqrt"),
}
DEFAULT_RECIPE = "bare"


def ensure_prepared(source: Path, out: Path, name: str, kcore: int = 5,
                    id_schemes: tuple[str, ...] = ()) -> Path:
  """Prepares `source` into `out` once (again when the source files change): split, random IDs, the
  `id_schemes` (built from training sequences only) and a vocabulary holding their pieces."""
  from recalign.data import PreparedData, prepare, read_source
  from recalign.data.ids import build_ids, scheme_pieces
  from recalign.data.ingest import sha256_file
  from recalign.data.prepare import format_stats
  from recalign.data.vocab import train_vocabulary
  fresh = True
  if (out / "manifest.json").exists() and (out / "vocab" / "spm.model").exists():
    manifest = json.loads((out / "manifest.json").read_text())
    fresh = not all(Path(p).exists() and sha256_file(Path(p)) == h for p, h in manifest["source"]["files"].items())
  if fresh:
    data = prepare(read_source(source), name=name, kcore=kcore)
    data.save(out)
    print(format_stats(PreparedData.load(out).manifest))
  else:
    print(f"[recalign] using prepared {out}")
  data = PreparedData.load(out)
  missing = [s for s in id_schemes if not (out / "ids" / f"{s}.json").exists()]
  for scheme in missing:
    print(f"[recalign] building {scheme} item IDs")
    build_ids(data, scheme).save(out)
  if fresh or missing:
    train_vocabulary(data, out / "vocab", pieces=scheme_pieces(out))
  return out


def train_model(data_dir: Path, model_dir: Path, mixture: str, validation_task: Optional[str], minutes: Optional[float],
                size: str, seed: int, recipe: Recipe = RECIPES["paper"], eval_every_minutes: Optional[float] = None,
                validation_examples: Optional[int] = None, steps: Optional[int] = None) -> dict:
  """Trains for `minutes` of training (validation excluded) or `steps`, validating every `eval_every_minutes`."""
  import recalign.tasks as rt
  from recalign import train as T
  from recalign import trainer
  from recalign.models.network import named_config
  from recalign.data import PreparedData
  config = rt.TaskConfig(**recipe.data)
  t0 = time.time()
  if validation_examples is None and eval_every_minutes:
    validation_examples = selection_size(len(PreparedData.load(data_dir).validation_users))
  if recipe.decay == "linear" and not steps:
    raise ValueError("a linear decay needs a budget in steps (the number of steps of a minutes budget is unknown)")
  schedule = trainer.learning_rate_schedule(base=recipe.learning_rate, warmup_steps=recipe.warmup_steps,
                                      decay=recipe.decay, total_steps=steps or 0)
  out = T.train(model_dir=str(model_dir), train_steps=steps or 10 ** 7, random_seed=seed, log_every=25,
                dataset=trainer.DatasetConfig(mixture, recipe.lengths, recipe.batch_size, data_dirs=[str(data_dir)],
                                              task_config=config),
                model=trainer.ModelConfig(named_config(size).replace(dropout_rate=recipe.dropout, dtype=recipe.dtype)),
                schedule=schedule, optimizer=trainer.make_optimizer(schedule),
                validation=trainer.ValidationConfig(task=validation_task, every_minutes=eval_every_minutes,
                                              examples=validation_examples),
                train_minutes_budget=minutes)
  print(f"[recalign] trained {mixture} for {out['step']} steps in {(time.time() - t0) / 60:.1f} min")
  return out


def pending_runs(results_path: Path, rows, seeds) -> tuple[dict, list[tuple[str, str, int]]]:
  """A resumable study: (the results `results_path` holds, the (key, row, seed) runs it lacks)."""
  results = json.loads(results_path.read_text()) if results_path.exists() else {}
  return results, [(f"{r}/seed{s}", r, s) for r in rows for s in seeds if f"{r}/seed{s}" not in results]


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
