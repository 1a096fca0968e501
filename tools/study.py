"""The paper's ablation at small scale: retrieval only -> + MLM -> + MLM + MIM (ReAT), and UT vs UT+AT.

    python tools/study.py --out runs/study --steps 400 --seeds 0 1 [--rows retrieval re_mlm reat ut ut_at]

Every row: a T5 (`--size`, default mini) from scratch, the same number of steps, batch and lengths,
then retrieval on `--val-users` validation users and the first `--test-users` test users (beam 20,
full catalogue, history excluded). Writes <out>/study.json and a Markdown table (mean ± std over
seeds) that docs/results.md quotes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ROWS = {  # name -> (mixture, description, input length)
    "retrieval": ("beauty_retrieval", "retrieval only", 256),
    "re_mlm": ("beauty_re_mlm", "retrieval + MLM", 256),
    "reat": ("beauty_reat", "retrieval + MLM + MIM (ReAT)", 256),
    "ut": ("beauty_ut", "UT (retrieval + ranking)", 1024),
    "ut_at": ("beauty_ut_at", "UT + AT (+ MLM + MIM)", 1024),
}
KEYS = ["hr@5", "ndcg@5", "hr@10", "ndcg@10"]


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "amazon-beauty"))
  p.add_argument("--out", default="runs/study")
  p.add_argument("--rows", nargs="+", default=["retrieval", "re_mlm", "reat"], choices=sorted(ROWS))
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
  p.add_argument("--size", default="mini")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--val-users", type=int, default=500)
  p.add_argument("--test-users", type=int, default=2000)
  args = p.parse_args()

  import gin
  import seqio
  import recalign.tasks as rt
  from recalign import train as T
  from recalign.demo import ensure_prepared, evaluate_best
  from recalign.models.network import CONFIGS
  out = Path(args.out)
  data_dir = ensure_prepared(Path(args.data), out / "data" / "beauty", "beauty")
  rt.register_dataset(data_dir)
  seqio.MixtureRegistry.add("beauty_re_mlm", ["beauty_retrieval", "beauty_mlm"],
                            default_rate=seqio.mixing_rate_num_examples)
  gin.bind_parameter("learning_rate_schedule.warmup_steps", 100)
  gin.bind_parameter("learning_rate_schedule.base", 2e-3)
  results_path = out / "study.json"
  results = json.loads(results_path.read_text()) if results_path.exists() else {}
  for row in args.rows:
    mixture, desc, inputs = ROWS[row]
    lengths = {"inputs": inputs, "targets": 64}
    for seed in args.seeds:
      key = f"{row}/seed{seed}"
      if key in results:
        continue
      model_dir = out / row / f"seed{seed}"
      t0 = time.time()
      T.train(model_dir=str(model_dir), mixture_or_task_name=mixture, task_feature_lengths=lengths,
              train_steps=args.steps, batch_size=args.batch, network_config=CONFIGS[args.size],
              random_seed=seed, checkpoint_every=args.steps, log_every=25, progress=False)
      train_min = (time.time() - t0) / 60
      # Evaluate the last checkpoint (no validation-based selection: every row gets the same steps).
      m = {split: evaluate_best(model_dir, "beauty_retrieval", split, lengths=lengths,
                                max_examples=args.test_users if split == "test" else args.val_users).metrics
           for split in ("validation", "test")}
      results[key] = {"row": row, "seed": seed, "mixture": mixture, "train_minutes": round(train_min, 1),
                      **{f"{s}/{k}": m[s][k] for s in m for k in KEYS}}
      results_path.write_text(json.dumps(results, indent=2))
      print(key, results[key], flush=True)
  print(table(results, args))


def table(results: dict, args) -> str:
  lines = ["| row | seeds | " + " | ".join(f"test {k}" for k in KEYS) + " | " +
           " | ".join(f"val {k}" for k in KEYS[2:]) + " |",
           "|---|---|" + "---|" * (len(KEYS) + 2)]
  for row, (mixture, desc, _) in ROWS.items():
    runs = [v for v in results.values() if v["row"] == row]
    if not runs:
      continue
    cells = []
    for split, keys in (("test", KEYS), ("validation", KEYS[2:])):
      for k in keys:
        vals = np.array([r[f"{split}/{k}"] for r in runs])
        cells.append(f"{vals.mean():.4f} ± {vals.std():.4f}")
    lines.append(f"| {desc} (`{mixture}`) | {len(runs)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
