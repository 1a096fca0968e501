"""Learning curves on the shared Beauty data: validation NDCG@10 / HR@10 against minutes of training
and against examples seen, for named recipes, each on the same budget.

    python tools/curves.py --recipes paper_random semantic_ids ... --minutes 20 --seeds 0 [--out docs/curves]
    python tools/curves.py --plot docs/curves/runs/*.json --png docs/curves/ids.png --title "item IDs"

A recipe fixes the data (item ID scheme, titles or not, the paper's windows or every prefix), the
mixture, the model size, lengths, batch, learning rate and loss normalisation; it trains as gin
(`gin_recipe`: gin/runs/from_scratch.gin + bindings), and MODEL_DIR/config.gin is the file that
`recalign train --gin_file=...` runs again. Every run trains from
scratch for `--minutes` (validation excluded), validates every `--eval-every` minutes on a seeded
sample of `--val-users` validation users (constrained beam search, width 20, full catalogue: the
paper's protocol) and writes <out>/runs/<recipe>_seed<k>.json: the recipe, the command, the machine,
the validation curve and the training log (loss, examples, useful tokens/s). The same validation users
are scored by popularity, for the line every curve has to beat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# name -> recipe. data: TaskConfig fields; size: a network.CONFIGS name or a dict of T5Config fields.
BASE = {"mixture": "retrieval", "data": {}, "size": "mini", "lengths": {"inputs": 320, "targets": 64},
        "batch": 64, "lr": 3e-3, "warmup": 50, "decay": "constant", "loss": "NUM_REAL_TARGET_TOKENS",
        "dropout": 0.1, "dtype": "bfloat16", "optimizer": "adafactor", "ema": None, "raw": False}
RECIPES = {
    # the paper's prompts and IDs (titles in the history, random IDs, sliding windows)
    "paper_random": {},
    "paper_semantic": {"data": {"id_scheme": "semantic"}},
    "paper_collaborative": {"data": {"id_scheme": "collaborative"}},
    # ID-only history: several times more examples per second
    "ids_random": {"data": {"with_titles": False}, "lengths": {"inputs": 192, "targets": 16}},
    "ids_semantic": {"data": {"with_titles": False, "id_scheme": "semantic"},
                     "lengths": {"inputs": 192, "targets": 16}},
    "ids_collaborative": {"data": {"with_titles": False, "id_scheme": "collaborative"},
                          "lengths": {"inputs": 192, "targets": 16}},
    # every training item a target (TIGER / P5) instead of the paper's windows
    "prefixes_semantic": {"data": {"with_titles": False, "id_scheme": "semantic", "train_examples": "prefixes"},
                          "lengths": {"inputs": 192, "targets": 16}},
    "prefixes_collaborative": {"data": {"with_titles": False, "id_scheme": "collaborative",
                                        "train_examples": "prefixes"}, "lengths": {"inputs": 192, "targets": 16}},
    "prefixes_random": {"data": {"with_titles": False, "train_examples": "prefixes"},
                        "lengths": {"inputs": 192, "targets": 16}},
    # ID-only history without the "Item ID:" words ("<id>; <id>; ..."), no dropout, a higher rate
    "compact_random": {"data": {"with_titles": False, "item_prefix": False}, "lengths": {"inputs": 160, "targets": 16},
                       "dropout": 0.0, "lr": 5e-3},
    "compact_semantic": {"data": {"with_titles": False, "item_prefix": False, "id_scheme": "semantic"},
                         "lengths": {"inputs": 128, "targets": 16}, "dropout": 0.0, "lr": 5e-3},
    "compact_collaborative": {"data": {"with_titles": False, "item_prefix": False, "id_scheme": "collaborative"},
                              "lengths": {"inputs": 128, "targets": 16}, "dropout": 0.0, "lr": 5e-3},
    # the compact history without the template's words: the IDs alone (about half the input tokens)
    "bare_collaborative": {"data": {"with_titles": False, "item_prefix": False, "prompt_words": False,
                                    "id_scheme": "collaborative"}, "lengths": {"inputs": 96, "targets": 16},
                           "dropout": 0.0, "lr": 5e-3},
    # the bare history with every training position a target (SASRec's supervision: 131k targets an epoch
    # on Beauty where the windows give 37.5k)
    "bare_prefixes": {"data": {"with_titles": False, "item_prefix": False, "prompt_words": False,
                               "id_scheme": "collaborative", "train_examples": "prefixes"},
                      "lengths": {"inputs": 96, "targets": 16}, "dropout": 0.0, "lr": 5e-3},
    # the same with P5's CID+IID hybrid IDs (one more token per item: Beauty's prefix inputs reach 109 tokens,
    # p95 100; targets 7 with EOS) -- decodable on a CPU since the sparse trie
    "bare_prefixes_hybrid": {"data": {"with_titles": False, "item_prefix": False, "prompt_words": False,
                                      "id_scheme": "hybrid", "train_examples": "prefixes"},
                             "lengths": {"inputs": 112, "targets": 16}, "dropout": 0.0, "lr": 5e-3},
    # the hybrid with the item's piece in place of the collaborative code that tells items apart (as many
    # tokens as the collaborative IDs: inputs 96): the piece is the last choice, among a leaf cluster's items
    "bare_prefixes_hybrid_item": {"data": {"with_titles": False, "item_prefix": False, "prompt_words": False,
                                           "id_scheme": "hybrid", "train_examples": "prefixes"},
                                  "ids": {"leaf": "item"}, "lengths": {"inputs": 96, "targets": 16},
                                  "dropout": 0.0, "lr": 5e-3},
    # one piece per item (P5's IID) and collaborative codes + the item's piece (P5's CID+IID)
    "compact_atomic": {"data": {"with_titles": False, "item_prefix": False, "id_scheme": "atomic"},
                       "lengths": {"inputs": 96, "targets": 8}, "dropout": 0.0, "lr": 5e-3},
    "compact_hybrid": {"data": {"with_titles": False, "item_prefix": False, "id_scheme": "hybrid"},
                       "lengths": {"inputs": 160, "targets": 16}, "dropout": 0.0, "lr": 5e-3},
    # continuations: the next k items per example (k targets for one encoding), every item a target
    "cont_atomic": {"data": {"with_titles": False, "item_prefix": False, "id_scheme": "atomic", "next_items": 10},
                    "lengths": {"inputs": 96, "targets": 16}, "dropout": 0.0, "lr": 5e-3},
    "cont_collaborative": {"data": {"with_titles": False, "item_prefix": False, "id_scheme": "collaborative",
                                    "next_items": 5}, "lengths": {"inputs": 128, "targets": 32}, "dropout": 0.0,
                           "lr": 5e-3},
    "cont_hybrid": {"data": {"with_titles": False, "item_prefix": False, "id_scheme": "hybrid", "next_items": 5},
                    "lengths": {"inputs": 160, "targets": 32}, "dropout": 0.0, "lr": 5e-3},
}


def recipe(name: str) -> dict:
  base, _, variant = name.partition("@")     # e.g. prefixes_semantic@lr=1e-3,batch=128,size=tiger
  r = json.loads(json.dumps({**BASE, **RECIPES[base]}))
  for kv in filter(None, variant.split(",")):
    k, v = kv.split("=")
    r[k] = json.loads(v) if v[:1] in "0123456789[{-" else v
  return r


def network_config(size):
  from recalign.models.network import CONFIGS, T5Config
  if isinstance(size, dict):
    return T5Config.from_dict({**__import__("dataclasses").asdict(CONFIGS["mini"]), **size})
  return CONFIGS[size]


def gin_recipe(r: dict):
  """The recipe as gin: `recalign/gin/runs/from_scratch.gin` with the recipe's settings as bindings -- the
  run a user repeats with `recalign train --gin_file=MODEL_DIR/config.gin` (every run writes it)."""
  from recalign.experiments import Recipe
  size = r["size"] if isinstance(r["size"], str) else "mini"
  dims = {} if isinstance(r["size"], str) else r["size"]
  data = dict(r["data"])
  scheme = data.pop("id_scheme", "random")
  return Recipe("recalign/gin/runs/from_scratch.gin", r["mixture"], (
      "include 'recalign/gin/models/t5_1_1.gin'", f"MODEL_SIZE = {size!r}",
      *(f"network.named_config.{k} = {v!r}" for k, v in dims.items()),
      f"TASK_FEATURE_LENGTHS = {r['lengths']!r}", f"BATCH_SIZE = {r['batch']}", f"LEARNING_RATE = {r['lr']!r}",
      f"WARMUP_STEPS = {r['warmup']}", f"learning_rate_schedule.decay = {r['decay']!r}",
      f"LOSS_NORMALIZING_FACTOR = {r['loss']!r}", f"DROPOUT_RATE = {r['dropout']!r}",
      f"ACTIVATION_DTYPE = {r['dtype']!r}", f"make_optimizer.name = {r['optimizer']!r}", f"ITEM_IDS = {scheme!r}",
      f"EMA_DECAY = {r['ema']!r}", f"ValidationConfig.raw_too = {bool(r['raw'])!r}",   # @ema=0.999,raw=1
      *(f"TaskConfig.{k} = {v!r}" for k, v in data.items())))


def cpu_model() -> str:
  for line in Path("/proc/cpuinfo").read_text().splitlines():
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return platform.processor() or "unknown CPU"


def prepare_data(source: Path, out: Path, name: str, schemes=("collaborative", "semantic")) -> Path:
  """A data set with random IDs, `schemes` (names, or a mapping of names to `build_ids` settings) and one
  vocabulary for all (atomic / hybrid IDs add a piece per item to the vocabulary, and so to every run's
  softmax: give them a --work folder of their own)."""
  from recalign.experiments import ensure_prepared
  return ensure_prepared(source, out, name, id_schemes=schemes if isinstance(schemes, dict) else tuple(schemes))


def id_schemes(names) -> dict:
  """The ID schemes the recipes `names` use (random aside), each with its `build_ids` settings (a recipe's
  "ids"); two recipes that want one scheme built two ways cannot share a data folder."""
  out: dict = {}
  for n in names:
    r = recipe(n)
    scheme = r["data"].get("id_scheme", "random")
    if scheme != "random":
      if out.setdefault(scheme, r.get("ids", {})) != r.get("ids", {}):
        raise SystemExit(f"{n}: {scheme} IDs built otherwise than by the other recipes; run it with its own --work")
  return out


def run(name: str, seed: int, minutes: float, eval_every: float, val_users: int, data_dir: Path, work: Path,
        out: Path) -> dict:
  from recalign import baselines as B
  from recalign.evaluator import sample_example_ids
  r = recipe(name)
  model_dir = work / "models" / f"{data_dir.name}_{name}_seed{seed}"
  path = out / "runs" / f"{data_dir.name}_{name}_seed{seed}.json"
  if path.exists():
    return json.loads(path.read_text())
  if model_dir.exists():
    import shutil
    shutil.rmtree(model_dir)
  from recalign.data import PreparedData
  from recalign.experiments import train_model
  data = PreparedData.load(data_dir)
  t0 = time.time()
  train_model(data_dir, model_dir, f"{data.name}_{r['mixture']}", f"{data.name}_retrieval", minutes, None, seed,
              gin_recipe(r), eval_every_minutes=eval_every, validation_examples=val_users,
              extra=["CheckpointConfig.every = 1000000"])
  wall = (time.time() - t0) / 60
  read = lambda p: [json.loads(x) for x in p.read_text().splitlines()]  # noqa: E731
  ids = sample_example_ids(len(data.validation_users), val_users)
  result = {"recipe": name, "data": data.name, "config": r, "seed": seed, "minutes": minutes,
            "wall_minutes": round(wall, 2),
            "command": "python tools/curves.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "machine": f"{os.cpu_count()} CPUs, {cpu_model()}", "protocol": "full catalogue",
            "validation_users": val_users,
            "popularity": B.popularity(data, "validation", example_ids=ids),
            "validation": read(model_dir / "validation_log.jsonl"),
            "train": read(model_dir / "train_log.jsonl")[::4]}
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1))
  return result


def plot(paths: list[Path], png: Path, title: str, metric: str = "ndcg@10") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  runs = [json.loads(p.read_text()) for p in paths]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  colors = {}
  for r in runs:
    c = colors.setdefault(r["recipe"], f"C{len(colors)}")
    xs_min = [v["minutes"] for v in r["validation"]]
    xs_ex = [v["examples_seen"] / 1000 for v in r["validation"]]
    ys = [v[metric] for v in r["validation"]]
    label = r["recipe"] if sum(x["recipe"] == r["recipe"] for x in runs[:runs.index(r) + 1]) == 1 else None
    axes[0].plot(xs_min, ys, "o-", color=c, label=label, alpha=0.8)
    axes[1].plot(xs_ex, ys, "o-", color=c, alpha=0.8)
  pop = runs[0]["popularity"][metric]
  for ax, xl in zip(axes, ("minutes of training (validation excluded)", "training examples seen (thousands)")):
    ax.axhline(pop, color="gray", ls="--", label="popularity" if ax is axes[0] else None)
    ax.axhline(2 * pop, color="gray", ls=":", label="2 x popularity" if ax is axes[0] else None)
    ax.set_xlabel(xl)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(f"validation {metric} ({runs[0]['validation_users']} users, full catalogue)")
  axes[0].legend(fontsize=8)
  fig.suptitle(f"{title} -- {runs[0]['machine']}")
  fig.tight_layout()
  png.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(png, dpi=110)
  plt.close(fig)


def markdown(paths: list[Path]) -> str:
  """One row per run: the recipe's data and settings, best validation NDCG@10 / HR@10 and when."""
  lines = ["| data | recipe | IDs | history | lr, decay / dropout / dtype | best val NDCG@10 (x popularity) "
           "| HR@10 | at min | examples seen | final loss |", "|---|---|---|---|---|---|---|---|---|---|"]
  for p in paths:
    r = json.loads(p.read_text())
    c, best = r["config"], max(r["validation"], key=lambda v: v["ndcg@10"])
    pop = r["popularity"]["ndcg@10"]
    d = c["data"]
    history = ("titles" if d.get("with_titles", True) else "IDs only") + (
        ", compact" if d.get("item_prefix") is False else "") + (", prefixes" if d.get("train_examples") == "prefixes"
                                                                   else "") + (
        ", no words" if d.get("prompt_words") is False else "") + (
        f", next {d['next_items']} items" if d.get("next_items", 1) > 1 else "")
    lines.append(f"| {r.get('data', 'beauty')} | {r['recipe']} | {d.get('id_scheme', 'random')} | {history} | "
                 f"{c['lr']:g} {c.get('decay', 'constant')} / {c['dropout']:g} / {c['dtype']} | "
                 f"{best['ndcg@10']:.4f} ({best['ndcg@10'] / pop:.2f}x "
                 f"of {pop:.4f}) | {best['hr@10']:.3f} | {best['minutes']:.1f} | {best['examples_seen']:,} | "
                 f"{r['train'][-1]['loss']:.2f} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "amazon-beauty"))
  p.add_argument("--out", default="docs/curves")
  p.add_argument("--work", default="runs/curves", help="prepared data and model folders")
  p.add_argument("--recipes", nargs="+", default=[])
  p.add_argument("--seeds", nargs="+", type=int, default=[0])
  p.add_argument("--minutes", type=float, default=20)
  p.add_argument("--eval-every", type=float, default=2.5, help="minutes of training between validations")
  p.add_argument("--val-users", type=int, default=500)
  p.add_argument("--plot", nargs="+", type=Path, help="run JSON files to plot instead of training")
  p.add_argument("--png", type=Path)
  p.add_argument("--table", nargs="+", type=Path, help="run JSON files to summarise as a Markdown table")
  p.add_argument("--title", default="Beauty retrieval")
  p.add_argument("--name", default="beauty", help="the data set's name (task names: <name>_retrieval)")
  args = p.parse_args()
  if args.table:
    print(markdown(args.table))
    return
  if args.plot:
    plot(args.plot, args.png, args.title)
    return
  work = Path(args.work)
  data_dir = prepare_data(Path(args.data), work / "data" / args.name, args.name,
                          id_schemes(args.recipes) or ("collaborative",))
  for name in args.recipes:
    for seed in args.seeds:
      res = run(name, seed, args.minutes, args.eval_every, args.val_users, data_dir, work, Path(args.out))
      best = max(res["validation"], key=lambda v: v["ndcg@10"])
      print(f"{name} seed {seed}: best validation NDCG@10 {best['ndcg@10']:.4f} at {best['minutes']:.1f} min "
            f"({best['examples_seen']} examples); popularity {res['popularity']['ndcg@10']:.4f}", flush=True)


if __name__ == "__main__":
  main()
