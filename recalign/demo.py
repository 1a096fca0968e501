"""`recalign demo`: the whole method on the shared data, on a CPU, in a bounded time.

Beauty: prepare (IDs, vocabulary) -> train a T5 from scratch with a named recipe for `minutes` of
training -> pick the best step by validation NDCG@10 -> evaluate retrieval on validation and test
-> popularity, SASRec-BCE and SASRec-CE on the same users, protocol and metric code -> table with
ratios, results JSON, PNG plot. ml-100k (if present): RpAT (rating + MIM + MLM) against History.

Recipes (`--recipe`):
  bare     (the default) retrieval only, the prompt is the history's collaborative IDs alone ("<id>; <id>;
           ...", no template words: 1.7x the examples per second of compact), no dropout, lr 5e-3 with
           rsqrt decay, bf16 (docs/curves.md, "Item IDs, supervision per example and throughput").
  compact  as bare, with the template's words around the history and a constant learning rate: the
           previous default (the demo of docs/results.md).
  paper    the paper's prompts and setting: ReAT (retrieval + MIM + MLM), titles in the history,
           random IDs, inputs 320 / targets 64.
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
    print(f"[demo] using prepared {out}")
  data = PreparedData.load(out)
  missing = [s for s in id_schemes if not (out / "ids" / f"{s}.json").exists()]
  for scheme in missing:
    print(f"[demo] building {scheme} item IDs")
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
  out = T.train(model_dir=str(model_dir), mixture_or_task_name=mixture, task_feature_lengths=recipe.lengths,
                train_steps=steps or 10 ** 7, batch_size=recipe.batch_size,
                network_config=named_config(size).replace(dropout_rate=recipe.dropout, dtype=recipe.dtype),
                data_dirs=[str(data_dir)], task_config=config, random_seed=seed, log_every=25,
                schedule=schedule, optimizer=trainer.make_optimizer(schedule),
                validation=trainer.ValidationConfig(task=validation_task, every_minutes=eval_every_minutes,
                                              examples=validation_examples),
                train_minutes_budget=minutes)
  print(f"[demo] trained {mixture} for {out['step']} steps in {(time.time() - t0) / 60:.1f} min")
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


def run_demo(source: Path, out: Path, minutes: float = 12.0, ml100k: Optional[Path] = None,
             size: str = "mini", seed: int = 0, recipe: str = DEFAULT_RECIPE, sasrec_epochs: int = 200,
             max_test: Optional[int] = None, kcore: int = 5, exclude_history: bool = False,
             eval_every_minutes: Optional[float] = None, name: Optional[str] = None) -> dict:
  """The demo on any Amazon-style data set (`source`; named after its folder unless `name` is given)."""
  from recalign import baselines as B
  from recalign.baselines.sasrec import SASRecConfig, evaluate_sasrec, train_sasrec
  from recalign.data import PreparedData
  from recalign.data.prepare import name_from_path
  from recalign.metrics import protocol_name
  t_start = time.time()
  out.mkdir(parents=True, exist_ok=True)
  protocol = protocol_name(exclude_history)
  r = RECIPES[recipe]
  name = name or name_from_path(source)
  results: dict = {"data": name, "recipe": recipe, "recipe_config": dataclasses.asdict(r), "minutes": minutes,
                   "size": size, "seed": seed, "protocol": protocol}
  if recipe != "paper":
    print(f"[demo] recipe {recipe}: {r.mixture}, {r.data} -- not the paper's prompts "
          "(recalign demo --recipe paper for those)")
  schemes = tuple(x for x in ("collaborative", "semantic", "atomic", "hybrid") if r.data.get("id_scheme") == x)
  data_dir = ensure_prepared(source, out / "data" / name, name, kcore, id_schemes=schemes)
  data = PreparedData.load(data_dir)
  model_dir = out / f"{name}_{recipe}"
  train_model(data_dir, model_dir, f"{name}_{r.mixture}", f"{name}_retrieval", minutes, size, seed, r,
              eval_every_minutes=eval_every_minutes or minutes / 8)
  plot(model_dir, out / f"{name}_{recipe}.png", f"T5 {size} from scratch, recipe {recipe} ({name})")
  # Both SASRecs budgeted in epochs and stopped early on validation NDCG@10, so the bar does not depend
  # on the machine's speed; CE is the sampled softmax, the strongest CE variant that converges in minutes.
  print("[demo] baselines: popularity, SASRec-BCE, SASRec-CE (sampled softmax), early-stopped")
  sasrec = {}
  for label, loss in (("BCE", "bce"), ("CE", "sampled_ce")):
    t0 = time.time()
    sasrec[label] = train_sasrec(data, SASRecConfig(seed=seed, loss=loss, epochs=sasrec_epochs,
                                                    exclude_history=exclude_history))
    log = sasrec[label][2]
    best = max((e for e in log if "validation_ndcg@10" in e), key=lambda e: e["validation_ndcg@10"], default=log[-1])
    results.setdefault("sasrec", {})[label] = {"loss": loss, "epochs": len(log), "best_epoch": best["epoch"],
                                               "minutes": round((time.time() - t0) / 60, 2)}

  def scored(split: str, exclude: bool) -> dict:
    """Every model of the table on the split's reported users under one protocol."""
    ids = report_ids(f"{name}_retrieval", split, max_test if split == "test" else None)
    rows = {f"recalign {size} {recipe}": evaluate_best(model_dir, f"{name}_retrieval", split, example_ids=ids,
                                                       exclude_history=exclude).metrics,
            "popularity": B.popularity(data, split, exclude_history=exclude, example_ids=ids)}
    for label, (m, params, _) in sasrec.items():
      rows[f"SASRec-{label}"] = evaluate_sasrec(m, params, data, split, exclude_history=exclude, example_ids=ids)
    return rows

  table = {f"{k} / {split}": v for split in ("validation", "test") for k, v in scored(split, exclude_history).items()}
  results[f"{name}_retrieval"] = table
  test = {k.split(" / ")[0]: v for k, v in table.items() if k.endswith("/ test")}
  ours = test[f"recalign {size} {recipe}"]["ndcg@10"]
  results["test_ndcg@10_ratio"] = {k: (ours / v["ndcg@10"] if v["ndcg@10"] else None) for k, v in test.items()
                                   if not k.startswith("recalign")}
  keys = ["hr@5", "ndcg@5", "hr@10", "ndcg@10"]
  print(f"\n{name} retrieval (beam 20, {protocol}; validation: users not used to pick the checkpoint)")
  print(B.format_table(table, keys))
  print("test NDCG@10 of recalign / baseline: " + ", ".join(
      f"{k} {v:.2f}x" for k, v in results["test_ndcg@10_ratio"].items() if v is not None))
  # The other protocol beside it (test only; the same models and users): many sequential-recommendation
  # papers exclude the user's history, the paper ranks the full catalogue.
  other = protocol_name(not exclude_history)
  side = scored("test", not exclude_history)
  results[f"{name}_retrieval_test_{other.replace(' ', '_')}"] = side
  print(f"\n{name} retrieval, test, {other}")
  print(B.format_table(side, keys))

  if ml100k is not None and ml100k.exists():
    ml_dir = ensure_prepared(ml100k, out / "data" / "ml100k", "ml100k", id_schemes=())
    ml_model = out / "ml100k_rpat"
    train_model(ml_dir, ml_model, "ml100k_rpat", "ml100k_rating", minutes / 4, size, seed)
    plot(ml_model, out / "ml100k_rpat.png", f"T5 {size} from scratch on RpAT (ml-100k)")
    ml = PreparedData.load(ml_dir)
    rt_table = {}
    for split in ("validation", "test"):
      rt_table[f"recalign {size} RpAT / {split}"] = evaluate_best(ml_model, "ml100k_rating", split).metrics
      rt_table[f"History / {split}"] = B.history_rating(ml, split)
    results["ml100k_rating"] = rt_table
    print("\nml-100k rating")
    print(B.format_table(rt_table, ["auc"]))
  results["total_minutes"] = round((time.time() - t_start) / 60, 1)
  (out / "results.json").write_text(json.dumps(results, indent=2))
  print(f"\n[demo] {results['total_minutes']} minutes in all; wrote {out / 'results.json'} and plots "
        f"{sorted(p.name for p in out.glob('*.png'))}")
  return results
