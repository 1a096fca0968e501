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

from recalign.experiments import (DEFAULT_RECIPE, RECIPES, dataset_config, ensure_prepared, evaluate_best, plot,
                                  report_ids, train_model, train_sasrecs)


def _ml100k_rating(source: Path, out: Path, minutes: float, size: str, seed: int) -> dict:
  """RpAT on ml-100k for `minutes`, its rating AUC beside History's."""
  from recalign import baselines as B
  from recalign.data import PreparedData
  ml_dir = ensure_prepared(source, out / "data" / "ml100k", "ml100k", id_schemes=())
  ml_model = out / "ml100k_rpat"
  train_model(ml_dir, ml_model, "ml100k_rpat", "ml100k_rating", minutes, size, seed)
  plot(ml_model, out / "ml100k_rpat.png", f"T5 {size} from scratch on RpAT (ml-100k)")
  ml = PreparedData.load(ml_dir)
  table = {}
  for split in ("validation", "test"):
    table[f"recalign {size} RpAT / {split}"] = evaluate_best(ml_model, "ml100k_rating", split).metrics
    table[f"History / {split}"] = B.history_rating(ml, split)
  print("\nml-100k rating")
  print(B.format_table(table, ["auc"]))
  return table


def run_demo(source: Path, out: Path, minutes: float = 12.0, ml100k: Optional[Path] = None,
             size: str = "mini", seed: int = 0, recipe: str = DEFAULT_RECIPE, sasrec_epochs: int = 200,
             max_test: Optional[int] = None, kcore: int = 5, exclude_history: bool = False,
             eval_every_minutes: Optional[float] = None, name: Optional[str] = None) -> dict:
  """The demo on any Amazon-style data set (`source`; named after its folder unless `name` is given)."""
  from recalign import baselines as B
  from recalign.baselines.sasrec import evaluate_sasrec
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
  scheme = dataset_config(r).task_config.id_scheme
  if recipe != "paper":
    print(f"[demo] recipe {recipe}: {r.mixture}, {r.run_file} -- not the paper's prompts "
          "(recalign demo --recipe paper for those)")
  schemes = () if scheme == "random" else (scheme,)
  data_dir = ensure_prepared(source, out / "data" / name, name, kcore, id_schemes=schemes)
  data = PreparedData.load(data_dir)
  model_dir = out / f"{name}_{recipe}"
  train_model(data_dir, model_dir, f"{name}_{r.mixture}", f"{name}_retrieval", minutes, size, seed, r,
              eval_every_minutes=eval_every_minutes or minutes / 8)
  plot(model_dir, out / f"{name}_{recipe}.png", f"T5 {size} from scratch, recipe {recipe} ({name})")
  # Both SASRecs budgeted in epochs and stopped early on validation NDCG@10, so the bar does not depend
  # on the machine's speed; CE is the sampled softmax, the strongest CE variant that converges in minutes.
  print("[demo] baselines: popularity, SASRec-BCE, SASRec-CE (sampled softmax), early-stopped")
  sasrec, results["sasrec"] = train_sasrecs(data, seed, sasrec_epochs, exclude_history)

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
    results["ml100k_rating"] = _ml100k_rating(ml100k, out, minutes / 4, size, seed)
  results["total_minutes"] = round((time.time() - t_start) / 60, 1)
  (out / "results.json").write_text(json.dumps(results, indent=2))
  print(f"\n[demo] {results['total_minutes']} minutes in all; wrote {out / 'results.json'} and plots "
        f"{sorted(p.name for p in out.glob('*.png'))}")
  return results
