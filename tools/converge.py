r"""Train a curves recipe (tools/curves.py) to convergence, several seeds, and score the best step on every
test user under both protocols, beside popularity and converged SASRecs on the same split.

    python tools/converge.py --recipes cont_atomic --seeds 0 1 2 --max-steps 20000 --every 500 --patience 6 \
        --work runs/converge --out docs/converge/beauty.json \
        --sasrec docs/baselines/beauty_sasrec_sampled_ce.json

Budgets are steps, not minutes (a busy machine does not change a row's result): each run validates every
`--every` steps on `--val-users` seeded validation users (beam 20, full catalogue), keeps the best step
and stops after `--patience` validations without a better NDCG@10 (or at `--max-steps`). Checkpoints
every `--every` steps make it resumable: run the same command again after an interruption (or in the
next sitting) and it goes on where it stopped; finished seeds are read back from `--out`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
PROTOCOLS = {"full catalogue": False, "history excluded": True}


def run(name: str, seed: int, data_dir: Path, work: Path, args) -> dict:
  import curves
  import recalign.tasks as rt
  from recalign.experiments import evaluate_best, train_model
  r = curves.recipe(name)
  model_dir = work / "models" / f"{data_dir.name}_{name}_seed{seed}"
  t0 = time.time()
  out = train_model(data_dir, model_dir, f"{data_dir.name}_{r['mixture']}", f"{data_dir.name}_retrieval", None,
                    None, seed, curves.gin_recipe(r), steps=args.max_steps, validation_examples=args.val_users,
                    extra=[f"ValidationConfig.every = {args.every}", f"ValidationConfig.patience = {args.patience}",
                           f"CheckpointConfig.every = {args.every}", "CheckpointConfig.keep = 2",
                           "train.log_every = 50"])
  log = [json.loads(x) for x in (model_dir / "train_log.jsonl").read_text().splitlines()]
  test = {p: evaluate_best(model_dir, f"{data_dir.name}_retrieval", "test", exclude_history=ex).metrics
          for p, ex in PROTOCOLS.items()}
  train_examples = rt.get(f"{data_dir.name}_retrieval").num_input_examples("train")
  return {"recipe": name, "config": r, "seed": seed, "steps": out["step"], "best": out["best"],
          "early_stopped": (model_dir / "early_stop.json").exists(),
          "examples_seen": log[-1]["examples_seen"], "epochs": round(log[-1]["examples_seen"] / train_examples, 2),
          "training_minutes": round(log[-1]["minutes"], 1),
          "wall_minutes_this_sitting": round((time.time() - t0) / 60, 1),
          "validation": [json.loads(x) for x in (model_dir / "validation_log.jsonl").read_text().splitlines()],
          "test": test}


def summary(results: dict, baselines: dict) -> str:
  import numpy as np
  def cell(m: dict, k: str) -> str:
    return f"{m[k]:.4f}" + (f" ± {m[k + '_std']:.4f}" if f"{k}_std" in m else "")

  lines = ["| model | protocol | test HR@10 | test NDCG@10 | runs |", "|---|---|---|---|---|"]
  for p in PROTOCOLS:
    for label, rows in baselines.items():
      if p in rows:
        m = rows[p]
        lines.append(f"| {label} | {p} | {cell(m, 'hr@10')} | {cell(m, 'ndcg@10')} | {m.get('runs', 1)} |")
    for recipe in sorted({v["recipe"] for v in results.values()}):
      runs = [v["test"][p] for v in results.values() if v["recipe"] == recipe]
      m = {k: float(np.mean([x[k] for x in runs])) for k in ("hr@10", "ndcg@10")}
      m.update({f"{k}_std": float(np.std([x[k] for x in runs])) for k in ("hr@10", "ndcg@10")})
      lines.append(f"| recalign {recipe} | {p} | {cell(m, 'hr@10')} | {cell(m, 'ndcg@10')} | {len(runs)} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "amazon-beauty"))
  p.add_argument("--name", help="the data set's name (default: from the folder)")
  p.add_argument("--recipes", nargs="+", required=True)
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  p.add_argument("--max-steps", type=int, default=20000)
  p.add_argument("--every", type=int, default=500, help="steps between validations (and checkpoints)")
  p.add_argument("--patience", type=int, default=6, help="validations without a new best before stopping")
  p.add_argument("--val-users", type=int, default=1000, help="seeded validation users that pick the best step")
  p.add_argument("--work", type=Path, default=Path("runs/converge"))
  p.add_argument("--out", type=Path, required=True)
  p.add_argument("--sasrec", type=Path, help="a tools/baselines.py JSON on the same split (its summary rows)")
  args = p.parse_args()
  import curves
  from recalign import baselines as B
  from recalign.console import quiet_startup
  from recalign.data import PreparedData
  from recalign.data.prepare import name_from_path
  quiet_startup()
  name = args.name or name_from_path(args.data)
  data_dir = curves.prepare_data(Path(args.data), args.work / "data" / name, name, curves.id_schemes(args.recipes))
  results = json.loads(args.out.read_text())["runs"] if args.out.exists() else {}
  for recipe in args.recipes:
    for seed in args.seeds:
      key = f"{recipe}/seed{seed}"
      if key not in results:
        results[key] = run(recipe, seed, data_dir, args.work, args)
        print(f"{key}: {results[key]['steps']} steps ({results[key]['epochs']} epochs), test NDCG@10 "
              f"{results[key]['test']['full catalogue']['ndcg@10']:.4f} full catalogue", flush=True)
      args.out.parent.mkdir(parents=True, exist_ok=True)
      data = PreparedData.load(data_dir)
      baselines = {"popularity": {p: B.popularity(data, "test", exclude_history=ex) for p, ex in PROTOCOLS.items()}}
      if args.sasrec:
        for row, m in json.loads(args.sasrec.read_text())["summary"].items():   # "sasrec-ce / full catalogue"
          label, _, protocol = row.partition(" / ")
          if label != "popularity":
            baselines.setdefault(label, {})[protocol] = m
      args.out.write_text(json.dumps({"command": "python tools/converge.py " + " ".join(map(shlex.quote, sys.argv[1:])),
                                      "machine": curves.cpu_model(), "runs": results, "baselines": baselines},
                                     indent=1))
  print(summary(results, baselines))


if __name__ == "__main__":
  main()
