"""Do ITDR's instruction tasks help Cao et al.'s? UT+AT vs UT+AT+ITDR on MovieLens 100k, several seeds.

    python tools/study_itdr.py --out runs/study_itdr --steps 400 --seeds 0 1 2

Both rows register ml-100k with `TaskConfig(itdr=True)`, so they train on the same items (the ITDR
evaluation users' last 5 items are held out of every task in both rows) and differ only in the mixture:
`ml100k_ut_at` (retrieval, ranking, rating, MIM, MLM) vs `ml100k_ut_at_itdr` (+ RP, TKR, NIR, UAP).
Every run: T5 `--size` (default mini) from scratch, the same `--steps` (steps, not minutes: runs stay
comparable on a busy machine), batch 32, inputs 512 / targets 128, ranking with 20 candidates (100
would need inputs 1024), the final checkpoint evaluated on the test split: retrieval HR/NDCG@10 (beam 20,
full catalogue), rating AUC; for the ITDR row also its tasks (`--itdr-examples` seeded test examples) with
their baselines (random order, global/user/item mean, majority class). Writes <out>/study_itdr.json and
prints mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ROWS = {"ut_at": "UT+AT", "ut_at_itdr": "UT+AT+ITDR"}
HEADLINES = {"ml100k_retrieval": ["hr@10", "ndcg@10"], "ml100k_rating": ["auc"],
             "ml100k_itdr_tkr": ["score/ndcg@10", "generated/ndcg@10", "random/ndcg@10", "unparsable"],
             "ml100k_itdr_nir": ["score/hr@1", "generated/hr@1", "random/hr@1"],
             "ml100k_itdr_rp": ["score/rmse", "generated/rmse", "global_mean/rmse", "user_mean/rmse", "item_mean/rmse"],
             "ml100k_itdr_uap": ["age_group_accuracy", "gender_accuracy", "occupation_accuracy",
                                 "majority/age_group_accuracy", "majority/gender_accuracy",
                                 "majority/occupation_accuracy"]}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ml-100k"))
  p.add_argument("--out", default="runs/study_itdr")
  p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  p.add_argument("--size", default="mini")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--itdr-examples", type=int, default=200)
  args = p.parse_args()

  import recalign.tasks as rt
  from recalign.experiments import RECIPES, dataset_config, ensure_prepared, evaluate_best, pending_runs, train_model
  out = Path(args.out)
  recipe = RECIPES["paper"].bind("TaskConfig.itdr = True", "TaskConfig.num_candidates = 20",
                                 "TASK_FEATURE_LENGTHS = {'inputs': 512, 'targets': 128}", "WARMUP_STEPS = 100",
                                 "ACTIVATION_DTYPE = 'bfloat16'")
  data_dir = ensure_prepared(Path(args.data), out / "data" / "ml100k", "ml100k")
  rt.register_dataset(data_dir, config=dataset_config(recipe).task_config, replace=True)   # rows differ in config
  path = out / "study_itdr.json"
  results, todo = pending_runs(path, args.rows, args.seeds)
  for key, row, seed in todo:
    model_dir = out / row / f"seed{seed}"
    t0 = time.time()
    run = train_model(data_dir, model_dir, f"ml100k_{row}", None, None, args.size, seed, recipe, steps=args.steps)
    tasks = ["ml100k_retrieval", "ml100k_rating"] + ([t for t in HEADLINES if "itdr" in t] if "itdr" in row else [])
    metrics = {}
    for task in tasks:
      m = evaluate_best(model_dir, task, "test", max_examples=args.itdr_examples if "itdr" in task else None).metrics
      metrics.update({f"{task}/{k}": v for k, v in m.items() if k in HEADLINES[task]})
    results[key] = {"row": row, "seed": seed, "steps": run["step"], "wall_minutes": round((time.time() - t0) / 60, 1),
                    "recipe": dataclasses.asdict(recipe), **metrics}
    path.write_text(json.dumps(results, indent=2))
    print(key, results[key], flush=True)
  print(table(results))


def table(results: dict) -> str:
  lines = []
  for row, desc in ROWS.items():
    runs = [r for r in results.values() if r["row"] == row]
    if not runs:
      continue
    lines.append(f"{desc} (ml100k_{row}), {len(runs)} seeds, {runs[0]['steps']} steps:")
    for k in sorted({k for r in runs for k in r if k.startswith("ml100k_")}):
      vals = np.array([r[k] for r in runs if k in r])
      lines.append(f"  {k:<52} {vals.mean():.4f} ± {vals.std():.4f}")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
