"""`recalign demo`: the whole method on the shared data, on a CPU, in a bounded time.

Beauty: prepare -> vocabulary -> train a mini T5 from scratch on ReAT (retrieval + MIM + MLM) for
`minutes` -> pick the best step by validation NDCG@10 -> evaluate retrieval on validation and test
-> popularity and SASRec on the same splits -> table, results JSON, PNG plot.
ml-100k (if present): the same for RpAT (rating + MIM + MLM), AUC against the History baseline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional


DEMO_LENGTHS = {"inputs": 320, "targets": 64}


def ensure_prepared(source: Path, out: Path, name: str, kcore: int = 5) -> Path:
  from recalign.data import PreparedData, prepare, read_source
  from recalign.data.ingest import sha256_file
  from recalign.data.prepare import format_stats
  from recalign.data.vocab import train_vocabulary
  if (out / "manifest.json").exists() and (out / "vocab" / "spm.model").exists():
    manifest = json.loads((out / "manifest.json").read_text())
    if all(Path(p).exists() and sha256_file(Path(p)) == h for p, h in manifest["source"]["files"].items()):
      print(f"[demo] using prepared {out}")
      return out
  data = prepare(read_source(source), name=name, kcore=kcore)
  data.save(out)
  train_vocabulary(data, out / "vocab")
  print(format_stats(PreparedData.load(out).manifest))
  return out


def train_model(data_dir: Path, model_dir: Path, mixture: str, validation_task: str, minutes: float,
                size: str, seed: int, batch_size: int = 32, eval_every: int = 500,
                validation_examples: Optional[int] = None, lengths: dict = DEMO_LENGTHS) -> dict:
  import gin
  from recalign import train as T
  from recalign.models.network import CONFIGS
  with gin.unlock_config():
    gin.bind_parameter("learning_rate_schedule.warmup_steps", 300)
    gin.bind_parameter("learning_rate_schedule.base", 2e-3)
  t0 = time.time()
  if validation_examples is None and eval_every:
    import recalign.tasks as rt
    rt.register_dataset(data_dir)
    validation_examples = selection_size(validation_task)
  out = T.train(model_dir=str(model_dir), mixture_or_task_name=mixture, task_feature_lengths=lengths,
                train_steps=10 ** 7, batch_size=batch_size, network_config=CONFIGS[size],
                data_dirs=[str(data_dir)], random_seed=seed, checkpoint_every=1000, log_every=25,
                eval_every=eval_every, validation_task=validation_task,
                validation_examples=validation_examples, time_budget_s=minutes * 60)
  print(f"[demo] trained {mixture} for {out['step']} steps in {(time.time() - t0) / 60:.1f} min")
  return out


SELECTION_USERS = 500   # validation users that pick the best step during training (not reported)


def selection_size(task: str) -> int:
  """How many validation users pick the checkpoint: 500, at most half of them (tiny data sets)."""
  import recalign.tasks as rt
  return min(SELECTION_USERS, rt.get(task).num_input_examples("validation") // 2)


def evaluate_best(model_dir: Path, task: str, split: str, *, example_ids=None, max_examples=None,
                  lengths: dict = DEMO_LENGTHS, exclude_history: bool = False):
  """Evaluates MODEL_DIR/best (or the latest checkpoint) on one split of `task`; returns the EvalResult."""
  import jax
  import jax.numpy as jnp
  import recalign.tasks as rt
  from recalign.data import PreparedData
  from recalign.evaluate import Evaluator
  from recalign.models import checkpoints as ck
  from recalign.models.model import EncoderDecoderModel
  from recalign.models.network import T5Config
  run = json.loads((model_dir / "run.json").read_text())
  model = EncoderDecoderModel(T5Config.from_dict(run["network_config"]))
  path = model_dir / "best" if (model_dir / "best").exists() else model_dir / "checkpoints" / str(
      max(int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit()))
  params = jax.tree_util.tree_map(jnp.asarray, ck.load_params(path))
  info = rt.registry.task_info(task)
  ev = Evaluator(model, PreparedData.load(info.data_dir), info.vocab, ids=info.ids, beam_size=20, batch_size=64,
                 exclude_history=exclude_history)
  res = ev.evaluate(params, task, split, lengths, max_examples, example_ids=example_ids)
  res.write(model_dir)
  return res


def report_ids(task: str, split: str, max_examples: Optional[int] = None):
  """Example ids a demo reports on: validation users not used to pick the checkpoint (disjoint from
  the selection sample), test users all or a seeded sample."""
  import numpy as np
  import recalign.tasks as rt
  from recalign.evaluate import sample_example_ids
  n = rt.get(task).num_input_examples(split)
  ids = np.arange(n)
  if split == "validation":   # the same seeded sample train() validates on (evaluate.task_examples)
    ids = np.setdiff1d(ids, sample_example_ids(n, selection_size(task)))
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


def run_demo(beauty: Path, out: Path, minutes: float = 20.0, ml100k: Optional[Path] = None,
             size: str = "mini", seed: int = 0, sasrec_epochs: int = 30, max_test: Optional[int] = None,
             kcore: int = 5, exclude_history: bool = False) -> dict:
  from recalign import baselines as B
  from recalign.baselines.sasrec import SASRecConfig, evaluate_sasrec, train_sasrec
  from recalign.data import PreparedData
  from recalign.metrics import protocol_name
  out.mkdir(parents=True, exist_ok=True)
  protocol = protocol_name(exclude_history)
  results: dict = {"minutes": minutes, "size": size, "seed": seed, "protocol": protocol}
  data_dir = ensure_prepared(beauty, out / "data" / "beauty", "beauty", kcore)
  model_dir = out / "beauty_reat"
  train_model(data_dir, model_dir, "beauty_reat", "beauty_retrieval", minutes, size, seed,
              validation_examples=None)
  data = PreparedData.load(data_dir)
  plot(model_dir, out / "beauty_reat.png", f"T5 {size} from scratch on ReAT (Beauty)")
  print("[demo] baselines: popularity, SASRec")
  sas_model, sas_params, _ = train_sasrec(data, SASRecConfig(epochs=sasrec_epochs, seed=seed))
  table = {}
  for split in ("validation", "test"):
    ids = report_ids("beauty_retrieval", split, max_test if split == "test" else None)
    lm = evaluate_best(model_dir, "beauty_retrieval", split, example_ids=ids, exclude_history=exclude_history)
    table[f"recalign {size} ReAT / {split}"] = lm.metrics
    table[f"popularity / {split}"] = B.popularity(data, split, exclude_history=exclude_history, example_ids=ids)
    table[f"SASRec / {split}"] = evaluate_sasrec(sas_model, sas_params, data, split,
                                                 exclude_history=exclude_history, example_ids=ids)
  results["beauty_retrieval"] = table
  keys = ["hr@5", "ndcg@5", "hr@10", "ndcg@10"]
  print(f"\nBeauty retrieval (beam 20, {protocol}; validation: users not used to pick the checkpoint)")
  print(B.format_table(table, keys))

  if ml100k is not None and ml100k.exists():
    ml_dir = ensure_prepared(ml100k, out / "data" / "ml100k", "ml100k")
    ml_model = out / "ml100k_rpat"
    train_model(ml_dir, ml_model, "ml100k_rpat", "ml100k_rating", minutes / 4, size, seed,
                eval_every=0, validation_examples=None)
    plot(ml_model, out / "ml100k_rpat.png", f"T5 {size} from scratch on RpAT (ml-100k)")
    ml = PreparedData.load(ml_dir)
    rt_table = {}
    for split in ("validation", "test"):
      rt_table[f"recalign {size} RpAT / {split}"] = evaluate_best(ml_model, "ml100k_rating", split).metrics
      rt_table[f"History / {split}"] = B.history_rating(ml, split)
    results["ml100k_rating"] = rt_table
    print("\nml-100k rating")
    print(B.format_table(rt_table, ["auc"]))
  (out / "results.json").write_text(json.dumps(results, indent=2))
  print(f"\n[demo] wrote {out / 'results.json'} and plots {sorted(p.name for p in out.glob('*.png'))}")
  return results
