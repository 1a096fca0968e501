"""Do profiles help a CF model (RecLM's claim)? LightGCN vs LightGCN + profile fusion, with controls.

    python tools/reclm_study.py --data runs/demo/data/ml100k --out docs/reclm/ml100k.json --seeds 0 1 2
    python tools/reclm_study.py ... --user-profiles generated.jsonl    # profiles a trained profiler wrote
    python tools/reclm_study.py ... --checkpoint runs/profiler/checkpoints/2000 --profiles-dir runs/profiles

Variants, each full-shot (leave-one-out) and zero-shot (20% of items held out with all their interactions;
ranked among the new items only, for the users whose held-out item is new):
  plain         LightGCN (d 32, 2 layers, BPR, Adam 1e-3), no fusion
  profiles      + RecLM's fusion of the user / item profile embeddings
  shuffled      + fusion, user profiles permuted between users (does the gain need the right user?)
  history_mean  + fusion, the user's profile replaced by the mean embedding of its training items'
                profiles (no generation: what a profile adds beyond its items' text)
User profiles: the silver ones (`recalign.tasks.reclm`, built from the data: on ml-100k the identity is the
real attributes) unless --user-profiles gives a JSONL ({"user", "profile"}); item profiles: silver. In the
zero-shot split every profile is rebuilt without the new items' interactions.
--checkpoint (a profiler trained on <name>_reclm, gin/reclm.gin): user and item profiles are generated
with it instead, per split (zero-shot: prompts without the new items; a new item's prompt shows no user),
into --profiles-dir (resumable), and on data with user attributes the generated identities are scored
against the true ones (profile task's test users, and all users), majority baseline beside. The
profiler itself was trained on every training interaction: in the zero-shot split its weights have
seen the new items' interactions (its prompts have not). Embeddings: TF-IDF + SVD
(64 dims; --embed encoder needs a checkpoint, see README). Early stopping on validation NDCG@20; test
Recall@20 / NDCG@20, mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("plain", "profiles", "shuffled", "history_mean")


def profile_matrix(data, variant: str, user_profiles, item_profiles, seed: int, dims: int):
  from recalign.tasks import reclm
  items = reclm.embed_tfidf(item_profiles, dims, seed)
  users = reclm.embed_tfidf(user_profiles, dims, seed)
  if variant == "shuffled":
    users = users[np.random.default_rng([seed, 3]).permutation(len(users))]
  elif variant == "history_mean":
    users = reclm.history_mean_embedding(data, items)
  return np.concatenate([users, items]).astype(np.float32)


def load_profiler(args):
  """(model, params, vocab) of --checkpoint, loaded once for every split."""
  from recalign.data.vocab import load_vocabulary
  from recalign.evaluate import load_model
  from recalign.models import checkpoints as ck
  if not args.profiles_dir:
    raise SystemExit("--checkpoint needs --profiles-dir (where the generated profiles go)")
  vocab = load_vocabulary(ck.checkpoint_vocabulary(args.checkpoint) or Path(args.data) / "vocab")
  return (*load_model(args.checkpoint, vocab, size=args.size), vocab)


def generated(args, data, split: str, exclude, results: dict, profiler) -> tuple[list[str], list[str]]:
  """User and item profiles the profiler writes for `split` (resumable JSONL in --profiles-dir); records
  the identity scores in `results`."""
  from recalign.tasks import reclm
  model, params, vocab = profiler
  d = Path(args.profiles_dir)
  users = reclm.generate_profiles(model, params, vocab, reclm.profile_prompts(data, vocab, exclude_items=exclude),
                                  d / f"users_{split}.jsonl")
  users_p = [users[u] for u in data.users]
  items = reclm.generate_profiles(model, params, vocab, reclm.item_prompts(data, vocab, users_p, exclude_items=exclude),
                                  d / f"items_{split}.jsonl", key="item")
  items_p = [items[i] for i in data.source_item_ids]
  if data.user_attributes:
    sp = reclm.user_split(data.num_users, 0)     # the profile task's split (its default seed)
    for who, us in (("test_users", sp["test"]), ("all_users", np.arange(data.num_users))):
      results[f"identity/{split}/{who}"] = reclm.identity_scores(data, users, us, sp["train"])
      print(f"identity/{split}/{who}", results[f"identity/{split}/{who}"], flush=True)
  return users_p, items_p


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", required=True, help="a prepared data set")
  p.add_argument("--out", required=True)
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
  p.add_argument("--splits", nargs="+", default=["full", "zero_shot"], choices=["full", "zero_shot"])
  p.add_argument("--user-profiles", help="JSONL of user profiles (default: silver)")
  p.add_argument("--checkpoint", help="a profiler's checkpoint: generate user and item profiles with it")
  p.add_argument("--profiles-dir", help="where generated profiles go (with --checkpoint)")
  p.add_argument("--size", help="the profiler's size, for checkpoints that record no config")
  p.add_argument("--dims", type=int, default=64)
  p.add_argument("--epochs", type=int, default=200)
  args = p.parse_args()
  import logging
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")   # cf logs every validation

  from recalign.baselines import cf
  from recalign.data import PreparedData
  from recalign.tasks import reclm
  data = PreparedData.load(args.data)
  out = Path(args.out)
  results = json.loads(out.read_text()) if out.exists() else {}
  profiler = load_profiler(args) if args.checkpoint else None
  for split in args.splits:
    cold = cf.zero_shot_items(data, 0.2, seed=0) if split == "zero_shot" else None
    exclude = () if cold is None else cold
    if args.checkpoint:
      users_p, items_p = generated(args, data, split, exclude, results, profiler)
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_text(json.dumps(results, indent=2))
    else:
      users_p = (reclm.load_profiles(args.user_profiles, data) if args.user_profiles
                 else reclm.silver_user_profiles(data, exclude_items=exclude))
      items_p = reclm.silver_item_profiles(data, exclude_items=exclude)
    users_p = [x or "" for x in users_p]
    for variant in args.variants:
      for seed in args.seeds:
        key = f"{split}/{variant}/seed{seed}"
        if key in results:
          continue
        cfg = cf.CFConfig(model="lightgcn", fusion=variant != "plain", epochs=args.epochs, seed=seed)
        prof = None if variant == "plain" else profile_matrix(data, variant, users_p, items_p, seed, args.dims)
        t0 = time.time()
        params, graph, log = cf.train_cf(data, cfg, prof, holdout_items=cold)
        test = cf.evaluate_cf(params, cfg, graph, data, "test", prof, candidates=cold)
        results[key] = {"split": split, "variant": variant, "seed": seed, "epochs": log[-1]["epoch"],
                        "minutes": round((time.time() - t0) / 60, 2), "config": dataclasses.asdict(cfg),
                        "profiles": ("generated" if args.checkpoint else args.user_profiles or "silver"),
                        **{f"test/{k}": v for k, v in test.items()}}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(key, {k: v for k, v in results[key].items() if k.startswith("test/")}, flush=True)
  print(table(results))


def table(results: dict) -> str:
  lines = ["| split | variant | seeds | test Recall@20 | test NDCG@20 | users |", "|---|---|---|---|---|---|"]
  for split in ("full", "zero_shot"):
    for variant in VARIANTS:
      runs = [r for r in results.values() if r.get("split") == split and r.get("variant") == variant]
      if runs:
        rec, nd = (np.array([r[f"test/{k}@20"] for r in runs]) for k in ("recall", "ndcg"))
        lines.append(f"| {split} | {variant} | {len(runs)} | {rec.mean():.4f} ± {rec.std():.4f} | "
                     f"{nd.mean():.4f} ± {nd.std():.4f} | {runs[0]['test/users']} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
