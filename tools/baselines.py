"""Reference numbers: popularity, SASRec-BCE and SASRec-CE on a prepared data set, several seeds, both
retrieval protocols, the same metric code and users as recalign's evaluator.

    python tools/baselines.py --data runs/curves/data/beauty --seeds 0 1 2 --out docs/baselines/beauty.json

Each SASRec run stops early on validation NDCG@10 (full catalogue) and keeps its best epoch; the test
split is then scored under the paper's protocol (full catalogue) and with the user's history excluded.
Prints mean ± std over seeds; the JSON keeps every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", required=True)
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  p.add_argument("--losses", nargs="+", default=["bce", "ce"])
  p.add_argument("--epochs", type=int, default=200)
  p.add_argument("--max-minutes", type=float, help="wall-clock budget per SASRec run (keeps its best epoch)")
  p.add_argument("--out", required=True)
  args = p.parse_args()
  from recalign import baselines as B
  from recalign.baselines.sasrec import SASRecConfig, evaluate_sasrec, train_sasrec
  from recalign.data import PreparedData
  data = PreparedData.load(args.data)
  out = Path(args.out)
  res = json.loads(out.read_text()) if out.exists() else {"data": data.name, "runs": {}}
  for protocol, exclude in (("full catalogue", False), ("history excluded", True)):
    res.setdefault("popularity", {})[protocol] = {
        split: B.popularity(data, split, exclude_history=exclude) for split in ("validation", "test")}
  for loss in args.losses:
    for seed in args.seeds:
      key = f"sasrec-{loss}/seed{seed}"
      if key in res["runs"]:
        continue
      t0 = time.time()
      model, params, log = train_sasrec(data, SASRecConfig(loss=loss, epochs=args.epochs, seed=seed,
                                                                   max_minutes=args.max_minutes))
      best = max((e for e in log if "validation_ndcg@10" in e), key=lambda e: e["validation_ndcg@10"])
      res["runs"][key] = {
          "loss": loss, "seed": seed, "minutes": round((time.time() - t0) / 60, 1), "epochs": len(log),
          "best_epoch": best["epoch"], "validation_ndcg@10": best["validation_ndcg@10"],
          "test": {"full catalogue": evaluate_sasrec(model, params, data, "test"),
                   "history excluded": evaluate_sasrec(model, params, data, "test", exclude_history=True)}}
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_text(json.dumps(res, indent=1))
      print(key, json.dumps(res["runs"][key]), flush=True)
  rows = {}
  for protocol in ("full catalogue", "history excluded"):
    rows[f"popularity / {protocol}"] = res["popularity"][protocol]["test"]
    for loss in args.losses:
      runs = [r["test"][protocol] for k, r in res["runs"].items() if r["loss"] == loss]
      if runs:
        rows[f"SASRec-{loss.upper()} / {protocol}"] = B.mean_std(runs)
  res["summary"] = rows
  out.write_text(json.dumps(res, indent=1))
  print(f"{data.name}, test split (all {data.num_users} users), mean ± std over seeds {args.seeds}")
  print(B.format_table(rows, ["hr@5", "ndcg@5", "hr@10", "ndcg@10"]))


if __name__ == "__main__":
  main()
