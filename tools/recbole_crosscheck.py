"""Cross-check recalign's SASRec (cross-entropy) against RecBole's SASRec on the same prepared split.

    pip install --no-deps -r tools/requirements-recbole.txt      # tool-only, not a recalign dependency
    python tools/recbole_crosscheck.py --data runs/demo/data/beauty --epochs 200 --out docs/baselines/recbole.json

Both models see the same users and item sequences: the prepared data set is written as a RecBole atomic
file whose timestamps are the positions in each user's chronological sequence, and RecBole splits it
leave-one-out by time (`LS: valid_and_test`, order `TO`) -- the same validation and test items as
recalign's. RecBole ranks the full catalogue minus the user's history, so recalign's side is evaluated
with `exclude_history` (its "history excluded" protocol). Settings as close as the two allow: 2
blocks, hidden 64, max length 50, dropout 0.5, Adam 1e-3, full-softmax cross-entropy, early stopping
on validation NDCG@10. Differences that remain: RecBole trains on every prefix of a sequence as its own
example (predicting its last item) with batch 256, GELU, 2 heads, inner size 256; recalign trains on
all positions of a sequence at once (batch 128 sequences), ReLU, 1 head, inner size 64. The printout
puts both test results side by side, with RecBole's validation users (all) and recalign's (the 3,000
validation users) noted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def write_atomic(data, root: Path) -> Path:
  """<root>/<name>/<name>.inter: user_id, item_id, timestamp = position in the user's sequence."""
  folder = root / data.name
  folder.mkdir(parents=True, exist_ok=True)
  with open(folder / f"{data.name}.inter", "w") as f:
    f.write("user_id:token\titem_id:token\ttimestamp:float\n")
    for u, seq in enumerate(data.sequences):
      for t, i in enumerate(seq):
        f.write(f"u{u}\ti{int(i)}\t{t}\n")
  return folder


def _numpy2_shims_for_recbole():
  """RecBole 1.2.1 aliases numpy names that NumPy 2 removed (np.float_ ...) when it configures itself."""
  import numpy as np
  for old, new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
    if old not in np.__dict__:
      setattr(np, old, new)


def run_recbole(data, epochs: int, seed: int, workdir: Path) -> dict:
  _numpy2_shims_for_recbole()
  from recbole.config import Config
  from recbole.data import create_dataset, data_preparation
  from recbole.model.sequential_recommender import SASRec
  from recbole.trainer import Trainer
  from recbole.utils import init_logger, init_seed
  write_atomic(data, workdir)
  config = Config(model="SASRec", dataset=data.name, config_dict={
      "data_path": str(workdir), "checkpoint_dir": str(workdir / "saved"), "use_gpu": False, "seed": seed,
      "reproducibility": True, "show_progress": False, "state": "INFO",   # INFO: a line per epoch
      "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
      "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
      "MAX_ITEM_LIST_LENGTH": 50, "n_layers": 2, "hidden_size": 64, "hidden_dropout_prob": 0.5,
      "attn_dropout_prob": 0.5, "loss_type": "CE", "train_neg_sample_args": None, "learning_rate": 1e-3,
      "train_batch_size": 256, "epochs": epochs, "eval_step": 5, "stopping_step": 4,
      "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
      "metrics": ["Hit", "NDCG"], "topk": [5, 10], "valid_metric": "NDCG@10", "eval_batch_size": 4096})
  init_logger(config)   # RecBole logs nothing (not even its per-epoch lines) without its handlers
  init_seed(config["seed"], config["reproducibility"])
  dataset = create_dataset(config)
  train, valid, test = data_preparation(config, dataset)
  model = SASRec(config, train.dataset).to(config["device"])
  trainer = Trainer(config, model)
  t0 = time.time()
  best_valid, _ = trainer.fit(train, valid, saved=True, show_progress=False)
  # The best epoch's weights, from the file this run just wrote (torch >= 2.6 refuses RecBole's
  # checkpoint pickles by default, so load them here rather than through evaluate(load_best_model)).
  import torch
  model.load_state_dict(torch.load(trainer.saved_model_file, map_location="cpu", weights_only=False)["state_dict"])
  result = trainer.evaluate(test, load_best_model=False, show_progress=False)
  return {"test": {k.replace("hit", "hr"): float(v) for k, v in result.items()},
          "validation_ndcg@10": float(best_valid), "minutes": (time.time() - t0) / 60,
          "users": len(data.users)}


def run_recalign(data, epochs: int, seed: int) -> dict:
  from recalign.baselines.sasrec import SASRecConfig, evaluate_sasrec, train_sasrec
  t0 = time.time()
  cfg = SASRecConfig(loss="ce", epochs=epochs, seed=seed, exclude_history=True)
  model, params, log = train_sasrec(data, cfg)
  best = max((e for e in log if "validation_ndcg@10" in e), key=lambda e: e["validation_ndcg@10"])
  return {"test": evaluate_sasrec(model, params, data, "test", exclude_history=True),
          "validation_ndcg@10": best["validation_ndcg@10"], "best_epoch": best["epoch"],
          "minutes": (time.time() - t0) / 60}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", required=True, help="a prepared data set (recalign prepare --out ...)")
  p.add_argument("--epochs", type=int, default=200)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", help="write both results as JSON here")
  p.add_argument("--skip-recalign", action="store_true", help="RecBole only (e.g. recalign's is in --out already)")
  args = p.parse_args()
  from recalign.data import PreparedData
  data = PreparedData.load(args.data)
  results = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).exists() else {}
  with tempfile.TemporaryDirectory() as tmp:
    results["recbole"] = run_recbole(data, args.epochs, args.seed, Path(tmp))
  if not args.skip_recalign:
    results["recalign"] = run_recalign(data, args.epochs, args.seed)
  results["protocol"] = "history excluded (RecBole's full ranking masks the user's history)"
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
  print(f"{data.name}, test split, {results['protocol']}")
  print(f"{'':<22}{'HR@10':>10}{'NDCG@10':>10}{'val NDCG@10':>13}{'minutes':>9}")
  for name in ("recbole", "recalign"):
    if name in results:
      r = results[name]
      print(f"{name + ' SASRec (CE)':<22}{r['test']['hr@10']:>10.4f}{r['test']['ndcg@10']:>10.4f}"
            f"{r['validation_ndcg@10']:>13.4f}{r['minutes']:>9.1f}")


if __name__ == "__main__":
  main()
