"""The paper's ablation at small scale: retrieval only -> + MLM -> + MLM + MIM (ReAT), and UT vs UT+AT.

    python tools/study.py --out runs/study --recipe compact --minutes 6 --seeds 0 1 2 --rows retrieval reat

Every row: a T5 (`--size`, default mini) from scratch with the demo's recipe (`recalign.demo.RECIPES`:
its data configuration, item IDs, learning rate, dtype) and the row's mixture, trained for the same
`--minutes` of training (validation excluded), validated every `--minutes`/3 on the demo's 500
selection users; the best step is evaluated on `--test-users` seeded test users and on `--val-users`
validation users disjoint from the selection sample (beam 20, full catalogue: the paper's protocol). Seeds change
the model's initialisation and the training data (masks, spans, negatives, order). Writes
<out>/study.json and a Markdown table: mean ± std over seeds, and each row's NDCG@10 difference from
the retrieval-only row with whether it exceeds the seeds' spread (|difference| > std_a + std_b).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ROWS = {  # name -> (mixture suffix, description)
    "retrieval": ("retrieval", "retrieval only"),
    "re_mlm": ("re_mlm", "retrieval + MLM"),
    "reat": ("reat", "retrieval + MLM + MIM (ReAT)"),
    "ut": ("ut", "UT (retrieval + ranking)"),
    "ut_at": ("ut_at", "UT + AT (+ MLM + MIM)"),
}
KEYS = ["hr@5", "ndcg@5", "hr@10", "ndcg@10"]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "amazon-beauty"))
  p.add_argument("--out", default="runs/study")
  p.add_argument("--recipe", default="compact")
  p.add_argument("--rows", nargs="+", default=["retrieval", "re_mlm", "reat"], choices=sorted(ROWS))
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  p.add_argument("--size", default="mini")
  p.add_argument("--minutes", type=float, default=6.0, help="training minutes per run (validation excluded)")
  p.add_argument("--test-users", type=int, default=2000)
  p.add_argument("--val-users", type=int, default=500, help="validation users reported (not the selection sample)")
  p.add_argument("--kcore", type=int, default=5)
  args = p.parse_args()

  import recalign.tasks as rt
  from recalign.data import PreparedData
  from recalign.demo import RECIPES, ensure_prepared, evaluate_best, pending_runs, report_ids, train_model
  out = Path(args.out)
  base = RECIPES[args.recipe]
  # every row sees the same lengths; MIM needs room for several masked IDs in its targets
  recipe = dataclasses.replace(base, lengths={**base.lengths, "targets": max(32, base.lengths["targets"])})
  if any(r.startswith("ut") for r in args.rows):   # ranking prompts hold 100 candidates
    recipe = dataclasses.replace(recipe, lengths={**recipe.lengths, "inputs": 1024})
  scheme = recipe.data.get("id_scheme", "random")
  data_dir = ensure_prepared(Path(args.data), out / "data" / "beauty", "beauty", args.kcore,
                             id_schemes=() if scheme == "random" else (scheme,))
  name = PreparedData.load(data_dir).name
  rt.register_dataset(data_dir, config=rt.TaskConfig(**recipe.data))
  results_path = out / "study.json"
  results, todo = pending_runs(results_path, args.rows, args.seeds)
  task = f"{name}_retrieval"
  for key, row, seed in todo:
    model_dir = out / row / f"seed{seed}"
    t0 = time.time()
    run = train_model(data_dir, model_dir, f"{name}_{ROWS[row][0]}", task, args.minutes, args.size, seed,
                      recipe, eval_every_minutes=args.minutes / 3)
    m = {split: evaluate_best(model_dir, task, split, example_ids=report_ids(
             task, split, args.test_users if split == "test" else args.val_users)).metrics
         for split in ("validation", "test")}
    results[key] = {"row": row, "seed": seed, "mixture": f"{name}_{ROWS[row][0]}", "recipe": args.recipe,
                    "steps": run["step"], "wall_minutes": round((time.time() - t0) / 60, 1),
                    **{f"{s}/{k}": m[s][k] for s in m for k in KEYS}}
    results_path.write_text(json.dumps(results, indent=2))
    print(key, results[key], flush=True)
  print(table(results))


def table(results: dict) -> str:
  lines = ["| row | seeds | " + " | ".join(f"test {k}" for k in KEYS) + " | val NDCG@10 | test NDCG@10 vs "
           "retrieval only |", "|---|---|" + "---|" * (len(KEYS) + 2)]
  ref = np.array([r["test/ndcg@10"] for r in results.values() if r["row"] == "retrieval"])
  for row, (_, desc) in ROWS.items():
    runs = [v for v in results.values() if v["row"] == row]
    if not runs:
      continue
    cells = []
    for k in [f"test/{k}" for k in KEYS] + ["validation/ndcg@10"]:
      vals = np.array([r[k] for r in runs])
      cells.append(f"{vals.mean():.4f} ± {vals.std():.4f}")
    vals = np.array([r["test/ndcg@10"] for r in runs])
    if row == "retrieval" or not len(ref):
      cells.append("—")
    else:
      diff, spread = vals.mean() - ref.mean(), vals.std() + ref.std()
      cells.append(f"{diff:+.4f} ({'exceeds' if abs(diff) > spread else 'within'} spread {spread:.4f})")
    lines.append(f"| {desc} (`{runs[0]['mixture']}`) | {len(runs)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
