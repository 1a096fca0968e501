r"""The paper's ablation at small scale: retrieval only -> + MLM -> + MLM + MIM (ReAT), and UT vs UT+AT.

    python tools/study.py --out runs/study --recipe compact --minutes 6 --seeds 0 1 2 --rows retrieval reat
    python tools/study.py --out runs/study_sem --id-scheme semantic --rows retrieval reat
    python tools/study.py --data ../shared/data/ml-100k --name ml100k --out runs/study_ml --rows retrieval reat ut ut_at

Every row: a T5 (`--size`, default the recipe's) from scratch with the demo's recipe (`recalign.experiments.RECIPES`:
its data configuration, item IDs, learning rate, dtype) and the row's mixture, trained for the same
`--minutes` of training (validation excluded), validated every `--minutes`/3 on the demo's
selection users (`recalign.experiments.SELECTION_USERS`); the best step is evaluated on all test users
(or `--test-users` seeded ones) and on the validation users outside the selection sample (or `--val-users`
of them), beam 20, full catalogue: the paper's protocol. Seeds change the model's initialisation and the training data
(masks, spans, negatives, order). Writes <record>/study.json (`--record`, default <out>) and a Markdown
table: mean ± std over seeds, and each row's difference from the row it adds to (+ MLM and ReAT from
retrieval only, UT + AT from UT, RpAT from rating only; test NDCG@10, AUC for the rating rows)
with whether it exceeds the seeds' spread (|difference| > std_a + std_b, sample standard deviations).
Rows whose mixture holds the rating task (ml-100k) are also scored by rating AUC on all test users.
Popularity (and, with ratings, History), SASRec-BCE and SASRec-CE (sampled softmax; one per seed, early-stopped
within `--sasrec-epochs`, kept in <record>/sasrec.json) on the same users are rows of the same table.
`--id-scheme` replaces the recipe's item IDs (random: the paper's; collaborative; semantic). Rows with
ranking (UT, UT + AT) take `--ranking-inputs` input tokens and proportionally fewer rows per batch.

To convergence (the budget in steps, not minutes: a busy machine does not change a row's result):

    python tools/study.py --out runs/study_conv --recipe compact --max-steps 8000 --every 500 --patience 6 \
        --rows retrieval re_mlm reat --seeds 0 1 2 [--users-fraction 0.25] [--aux-share 0.3]

validates every `--every` steps on the selection users, stops after `--patience` validations without a
better NDCG@10 or at `--max-steps` (the same cap for every row), checkpoints every `--every` steps: run
the same command again after an interruption and every row goes on where it stopped; finished rows are
read back from <record>/study.json and the table is printed again. `--record DIR` keeps what a study
concluded apart from its checkpoints and prepared data: study.json, sasrec.json, baselines.json, the curves
and every finished run's logs (~100 KB a run, for docs/), so a study survives losing <out> between
sittings -- only an unfinished run starts over. `--report`: the table and the curves of what the record holds
so far, while the study is still going, training nothing. `--users-fraction`: a seeded subset of
the users (the data-limited regime; the recipe's IDs, built from the subset's own training sequences).
`--aux-share`: the auxiliary tasks' share of the examples, together (default: the paper's mixing by
example counts); such runs are rows of their own in the same record (`reat@aux30/seed0`), set against the
same base row, so one table holds both mixings. After the table, the auxiliary rows against their base
rows at the same main-task examples rather than the same steps (`at_equal_supervision`): does an auxiliary
task make each retrieval / rating example worth more?

At paper scale (a GPU / TPU VM): the paper's run file, fine-tuning FLAN-T5-Base on its own vocabulary, with
`--gin` bindings as `recalign train` takes them:

    python tools/study.py --out runs/study_flan --recipe recalign/gin/runs/paper_base.gin \
        --gin "INITIAL_CHECKPOINT_PATH = '/ckpt/flan-t5-base'" --max-steps 10000 --every 1000 --patience 6
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))   # (curves: its recipes)
ROWS = {  # name -> (mixture suffix, description)
    "retrieval": ("retrieval", "retrieval only"),
    "re_mlm": ("re_mlm", "retrieval + MLM"),
    "reat": ("reat", "retrieval + MLM + MIM (ReAT)"),
    "ut": ("ut", "UT (retrieval + ranking [+ rating])"),
    "ut_at": ("ut_at", "UT + AT (+ MLM + MIM)"),
    "rating": ("rating", "rating only"),
    "rpat": ("rpat", "rating + MLM + MIM (RpAT)"),
}
KEYS = ["hr@5", "ndcg@5", "hr@10", "ndcg@10"]
# what each row is compared with (the same row without its addition): the auxiliary rows with the row they
# add to, UT with retrieval alone (on test NDCG@10, or AUC where neither has retrieval: `_against_base`)
BASE_ROW = {"re_mlm": "retrieval", "reat": "retrieval", "ut": "retrieval", "ut_at": "ut", "rpat": "rating"}
# a gin run file's lengths when it leaves them to a mixture file (as recalign/gin/reat.gin sets them)
PAPER_LENGTHS = {"inputs": 512, "targets": 128}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "amazon-beauty"))
  p.add_argument("--name", default="beauty", help="the data set's task prefix (beauty, ml100k)")
  p.add_argument("--id-scheme", choices=["random", "collaborative", "semantic", "atomic", "hybrid"],
                 help="item IDs (default: the recipe's)")
  p.add_argument("--out", default="runs/study")
  p.add_argument("--report", action="store_true", help="print the table and the curves of the runs the record "
                 "holds so far, training nothing (SASRec included)")
  p.add_argument("--record", help="where the study's results, baselines, curves and finished runs' logs are kept "
                 "(default: --out)")
  p.add_argument("--recipe", default="compact", help="a recipe of recalign.experiments (compact, bare, paper), of "
                 "tools/curves.py, variants included (e.g. 'bare_prefixes_hybrid_item@dropout=0.1,decay=linear'), "
                 "or a gin run file (e.g. recalign/gin/runs/paper_base.gin; without TASK_FEATURE_LENGTHS, those of "
                 "the paper's mixture files: inputs 512, targets 128)")
  p.add_argument("--gin", action="append", default=[], metavar="BINDING",
                 help="a gin binding applied after the recipe's, as recalign train's --gin.NAME=VALUE (repeatable): "
                 "e.g. \"INITIAL_CHECKPOINT_PATH = '/ckpt/flan-t5-base'\"")
  p.add_argument("--rows", nargs="+", default=["retrieval", "re_mlm", "reat"], choices=sorted(ROWS))
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  p.add_argument("--size", help="the model size (default: the recipe's)")
  p.add_argument("--minutes", type=float, default=6.0, help="training minutes per run (validation excluded)")
  # every user by default: on a sample of 2,000 the users alone move NDCG@10 by ~10% (one standard error),
  # three times the seeds' spread at convergence
  p.add_argument("--test-users", type=int, default=0, help="test users scored (0: all; else a seeded sample)")
  p.add_argument("--val-users", type=int, default=0,
                 help="validation users reported, none of the selection sample (0: all of them)")
  p.add_argument("--kcore", type=int, default=5)
  p.add_argument("--ranking-inputs", type=int, default=1024, help="input length of the rows with ranking")
  p.add_argument("--max-steps", type=int, help="a budget in steps with early stopping (instead of --minutes)")
  p.add_argument("--every", type=int, default=500, help="steps between validations and checkpoints (--max-steps)")
  p.add_argument("--patience", type=int, default=6, help="validations without a new best before stopping")
  p.add_argument("--users-fraction", type=float, default=1.0, help="a seeded subset of the users (data-limited)")
  p.add_argument("--aux-share", type=float, help="the auxiliary tasks' share of the examples (default: by counts)")
  p.add_argument("--sasrec-epochs", type=int, default=200, help="SASRec-BCE / -CE per seed, early-stopped within "
                 "these epochs, on the same users (0: none)")
  args = p.parse_args()

  from recalign.console import quiet_startup
  quiet_startup()
  from recalign import baselines as B
  from recalign.data import PreparedData
  from recalign.experiments import evaluate_best, pending_runs, report_ids, selection_size, train_model
  out = Path(args.out)
  record = Path(args.record or args.out)
  results_path = record / "study.json"
  rows = {run_label(r, args.aux_share): r for r in args.rows}   # (a row at --aux-share is a row of its own)
  results, todo = pending_runs(results_path, list(rows), args.seeds)
  same = {"recipe": args.recipe, "gin": list(args.gin), "users_fraction": args.users_fraction}
  check_record(results_path, results, same)   # (before preparing anything)
  recipe, long_recipe, data_dir, scheme = study_setup(args)
  check_record(results_path, results, {"id_scheme": scheme})   # (--id-scheme)
  same["id_scheme"] = scheme
  data = PreparedData.load(data_dir)
  name = data.name
  for r in results.values():   # (rows kept from an earlier command: the curves after each run need their mixtures)
    aux_mixture(name, r["row"], r.get("aux_share"))
  todo = [] if args.report else todo
  task = f"{name}_retrieval"
  ids = {s: report_ids(task, s, args.test_users if s == "test" else args.val_users) for s in ("validation", "test")}
  # on the very users the rows are scored on (seconds: computed every time, never stale for other --test-users)
  base_rows = {f"popularity / {s}": B.popularity(data, s, example_ids=ids[s]) for s in ids}
  if data.has_ratings:
    base_rows["History / test"] = B.history_rating(data, "test")
  record.mkdir(parents=True, exist_ok=True)
  (record / "baselines.json").write_text(json.dumps(base_rows, indent=2))
  print(B.format_table(base_rows))
  # (--report: no seed to train, what the record holds)
  sasrec = (sasrec_baselines(record / "sasrec.json", data, [] if args.report else args.seeds, ids, args.sasrec_epochs)
            if args.sasrec_epochs else {})
  for key, label, seed in todo:
    row = rows[label]
    model_dir = out / label / f"seed{seed}"
    t0 = time.time()
    members = row_members(row)
    retrieval = "retrieval" in members
    # the checkpoint is picked on retrieval, or on rating for the rows without retrieval
    mixture = aux_mixture(name, row, args.aux_share)
    budget = (dict(minutes=None, steps=args.max_steps, validation_examples=selection_size(len(data.validation_users)),
                   extra=[f"ValidationConfig.every = {args.every}", f"ValidationConfig.patience = {args.patience}",
                          f"CheckpointConfig.every = {args.every}", "CheckpointConfig.keep = 2"])
              if args.max_steps else dict(minutes=args.minutes, eval_every_minutes=args.minutes / 3))
    run = train_model(data_dir, model_dir, mixture, task if retrieval else f"{name}_rating", size=args.size, seed=seed,
                      recipe=long_recipe if "ranking" in members else recipe, **budget)
    m = {split: evaluate_best(model_dir, task, split, example_ids=ids[split]).metrics if retrieval else {}
         for split in ids}
    if "rating" in members and data.has_ratings:
      m["test"]["auc"] = evaluate_best(model_dir, f"{name}_rating", "test").metrics["auc"]
    log = [json.loads(x) for x in (model_dir / "train_log.jsonl").read_text().splitlines()]
    results[key] = {"row": row, "seed": seed, "mixture": mixture, **same, "steps": run["step"],
                    "best_step": (run.get("best") or {}).get("step"),
                    "early_stopped": (model_dir / "early_stop.json").exists(),
                    "examples_seen": log[-1]["examples_seen"], "training_minutes": round(log[-1]["minutes"], 1),
                    "aux_share": args.aux_share,
                    "wall_minutes_this_sitting": round((time.time() - t0) / 60, 1),
                    **{f"{s}/{k}": v for s in m for k, v in m[s].items() if k in KEYS + ["auc"]}}
    keep_logs(model_dir, record / label / f"seed{seed}")
    results_path.write_text(json.dumps(results, indent=2))
    plot_curves(record, results)   # (after every run: a sitting preempted later still leaves current curves)
    print(key, results[key], flush=True)
  print(table(with_trend(record, with_epochs(results)), baseline_runs(base_rows, sasrec)))
  if equal := at_equal_supervision(record, results):
    print("at the same main-task examples (selection validation, the runs' last point):\n" + equal)
  print(f"validation curves: {plot_curves(record, results)}")
  print(compute_used(results, sasrec))


def study_setup(args) -> tuple:
  """(the rows' recipe, the recipe of the rows with ranking, the prepared data -- its tasks registered with
  the recipe's configuration --, the item ID scheme) from the command line's --recipe, --gin, --id-scheme,
  --data, --name, --kcore, --users-fraction, --ranking-inputs and --out."""
  import recalign.tasks as rt
  from recalign.experiments import dataset_config, ensure_prepared, ensure_subset
  named, id_settings = named_recipe(args.recipe, args.id_scheme)
  named = named.bind(*args.gin)
  base = dataset_config(named)
  lengths = {**base.task_feature_lengths, "targets": max(32, base.task_feature_lengths["targets"])}
  # every row sees the same target length: MIM needs room for several masked IDs
  recipe = named.bind(f"TASK_FEATURE_LENGTHS = {lengths}",
                      *([f"ITEM_IDS = {args.id_scheme!r}"] if args.id_scheme else []))
  # ranking prompts hold 100 candidates: the rows with ranking get longer inputs and proportionally fewer
  # rows per batch (the same tokens per step as the others)
  rows_per_batch = max(1, base.batch_size * lengths["inputs"] // args.ranking_inputs)
  long_recipe = recipe.bind(f"TASK_FEATURE_LENGTHS = {({**lengths, 'inputs': args.ranking_inputs})}",
                            f"BATCH_SIZE = {rows_per_batch}")
  task_config = dataset_config(recipe).task_config
  scheme = task_config.id_scheme
  schemes = {} if scheme == "random" else {scheme: id_settings}
  data_dir = ensure_prepared(Path(args.data), Path(args.out) / "data" / args.name, args.name, args.kcore,
                             id_schemes=schemes)
  if args.users_fraction < 1:   # (its IDs built from the subset's own training sequences)
    data_dir = ensure_subset(data_dir, args.users_fraction, id_schemes=schemes)
  rt.register_dataset(data_dir, config=task_config, replace=True)   # rows differ in config
  return recipe, long_recipe, data_dir, scheme


AUX_SUFFIX = "@aux"   # `run_label`'s mark of a row trained at an --aux-share (`reat@aux30`)


def check_record(path: Path, results: dict, settings: dict) -> None:
  """Stop when the record's runs were trained with other `settings` (recipe, gin bindings, ID scheme, users
  fraction) than this command's: its new runs would not be comparable, and the table's epochs and the curves
  come from the mixtures this command registers. A setting a run does not hold (older records) is not checked."""
  for key, run in results.items():
    for field, value in settings.items():
      if run.get(field) is not None and run[field] != value:
        raise SystemExit(f"{path}: {key} was trained with {field} {run[field]!r}, this command has {value!r}: "
                         f"give the record's settings (--recipe, --gin, --id-scheme, --users-fraction) or "
                         f"another --record")


def run_label(row: str, share: Optional[float]) -> str:
  """A row's name in the study (its runs' keys and directories): the row, or `<row>@aux<percent>` when it was
  trained at an --aux-share and has auxiliary tasks to share (for the others the share changes nothing)."""
  from recalign.tasks.registry import AUX_TASKS
  shares = share is not None and set(row_members(row)) & set(AUX_TASKS)
  return f"{row}{AUX_SUFFIX}{round(share * 100)}" if shares else row


def row_of(label: str) -> str:
  """The row a `run_label` names (`reat@aux30` -> `reat`)."""
  return label.partition(AUX_SUFFIX)[0]


def label_of(r: dict) -> str:
  """A run's row name (`run_label`) from what the study recorded for it."""
  return run_label(r["row"], r.get("aux_share"))


def describe(label: str) -> str:
  """A row's description in the table and the plot's legend."""
  row, _, share = label.partition(AUX_SUFFIX)
  return ROWS[row][1] + (f", auxiliary tasks {share}% of the examples" if share else "")


def row_members(row: str) -> tuple:
  """The tasks a row's mixture holds (its one task for a task): "ranking" among them takes the long recipe."""
  import recalign.tasks as rt
  return rt.MIXTURES.get(ROWS[row][0], (ROWS[row][0],))


def named_recipe(name: str, id_scheme=None):
  """(the experiments.Recipe named `name` -- one of recalign.experiments.RECIPES, a tools/curves.py recipe
  with its variant, as gin, or a gin run file --, the `build_ids` settings of its item IDs (a curves recipe's
  "ids"; none when `id_scheme` replaces its scheme))."""
  from recalign.experiments import RECIPES, Recipe, dataset_config
  if name in RECIPES:
    return RECIPES[name], {}
  if name.endswith(".gin"):   # (each row binds its own mixture)
    path = next((f for f in (Path(name), REPO / name) if f.is_file()), None)
    if path is None:
      raise SystemExit(f"--recipe {name}: no such gin file")
    r = Recipe(str(path), "retrieval")
    try:
      dataset_config(r)
    except ValueError as e:   # a run file leaves the lengths to a mixture file: the paper's mixture files'
      if "TASK_FEATURE_LENGTHS" not in str(e):
        raise
      r = r.bind(f"TASK_FEATURE_LENGTHS = {PAPER_LENGTHS}")
    return r, {}
  import curves
  try:
    r = curves.recipe(name)
  except KeyError:
    raise SystemExit(f"--recipe {name!r}: neither {sorted(RECIPES)} nor a recipe of tools/curves.py") from None
  return curves.gin_recipe(r), {} if id_scheme else r.get("ids", {})


RUN_LOGS = ("train_log.jsonl", "validation_log.jsonl", "early_stop.json")


def keep_logs(model_dir: Path, dest: Path) -> None:
  """A finished run's logs (`RUN_LOGS`: what the table and the curves read) copied to the study's record."""
  if dest.resolve() == model_dir.resolve():
    return
  dest.mkdir(parents=True, exist_ok=True)
  for name in RUN_LOGS:
    if (model_dir / name).exists():
      shutil.copyfile(model_dir / name, dest / name)


def plot_curves(out: Path, results: dict) -> Path:
  """<record>/validation_curves.png (`out`): every run's validation metric (NDCG@10; the rating rows' AUC on
  a row of panels of its own), one colour per row (its --aux-share runs dashed), against the steps (the same
  compute) and against the examples of its main tasks seen (the same supervision: examples seen x
  `main_share`) -- a row still rising when the cap stopped it shows it."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  curves = {}
  for r, metric, *curve in main_task_curves(out, dict(sorted(results.items()))):
    curves.setdefault(metric, []).append((r, *curve))
  n = max(len(curves), 1)
  fig, axes = plt.subplots(n, 2, figsize=(15, 4.5 * n), squeeze=False)
  colours = dict(zip(ROWS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for panels, (metric, runs) in zip(axes, sorted(curves.items(), reverse=True)):
    for ax, xlabel, col in ((panels[0], "training steps", 1), (panels[1], "main-task examples seen", 2)):
      labelled = set()
      for run in runs:
        r, label = run[0], label_of(run[0])
        ax.plot(run[col], run[3], "o--" if AUX_SUFFIX in label else "o-", ms=3, color=colours[r["row"]],
                label=None if label in labelled else describe(label))
        labelled.add(label)
      ax.set_xlabel(xlabel)
      ax.set_ylabel(f"validation {metric.upper()} (selection users)")
      ax.legend()
  fig.tight_layout()
  fig.savefig(out / "validation_curves.png", dpi=120)
  plt.close(fig)
  return out / "validation_curves.png"


def main_task_curves(out: Path, results: dict, share: Optional[Callable[[str], float]] = None) -> list[tuple]:
  """Every run's validation curve that has a point: (run, metric, steps, main-task examples seen -- examples
  seen x `share` of its mixture, default `main_share` --, the metric's values), the last three arrays."""
  share = share or main_share
  curves = []
  for r in results.values():
    metric, val = validation_log(out, r)
    if val:
      steps, seen, y = (np.array([v[k] for v in val]) for k in ("step", "examples_seen", metric))
      curves.append((r, metric, steps, seen * share(r["mixture"]), y))
  return curves


def row_order(label: str) -> tuple:
  """Tables list rows in `ROWS` order (an --aux-share row after its row at the paper's mixing)."""
  return list(ROWS).index(row_of(label)), label


def main_share(mixture: str) -> float:
  """The share of a mixture's examples that are its main tasks' (retrieval, ranking, rating: not MIM, MLM,
  BPR, item QA), from its mixing rates; 1 for a task."""
  import seqio
  from recalign.tasks.registry import AUX_TASKS
  task = seqio.get_mixture_or_task(mixture)
  if not isinstance(task, seqio.Mixture):
    return 1.0
  rates = {t.name: task.get_rate(t) for t in task.tasks}
  return sum(v for t, v in rates.items() if not t.endswith(tuple(f"_{a}" for a in AUX_TASKS))) / sum(rates.values())


def sasrec_baselines(path: Path, data, seeds, ids: dict, epochs: int = 200) -> dict:
  """SASRec-BCE and SASRec-CE per seed, early-stopped (`recalign.experiments.train_sasrecs`), scored on the
  study's users (`ids`: split -> example ids, full catalogue): {"<BCE|CE>/seed<s>": {"validation": metrics,
  "test": metrics, "epochs", "best_epoch", "minutes", "users", "max_epochs"}}, kept in `path` -- a seed trains
  once, and again only if the study's users (their checksum) or the epoch budget change."""
  from recalign.baselines.sasrec import evaluate_sasrec
  from recalign.experiments import train_sasrecs
  done = json.loads(path.read_text()) if path.exists() else {}
  # what an entry was trained and scored for (the users by their checksum)
  wanted = {"users": {s: zlib.crc32(np.asarray(v, np.int64).tobytes()) for s, v in sorted(ids.items())},
            "max_epochs": epochs}
  for seed in seeds:
    if all({k: done.get(f"{label}/seed{seed}", {}).get(k) for k in wanted} == wanted for label in ("BCE", "CE")):
      continue
    models, summary = train_sasrecs(data, seed, epochs, exclude_history=False)
    for label, (model, params, _) in models.items():
      done[f"{label}/seed{seed}"] = {**summary[label], **wanted, **{
          s: evaluate_sasrec(model, params, data, s, example_ids=v) for s, v in ids.items()}}
    path.write_text(json.dumps(done, indent=2))
  return done


def baseline_runs(base_rows: dict, sasrec: dict) -> dict[str, list[dict]]:
  """The baselines as the table's runs (keys as the study's: "test/ndcg@10"): popularity (one run: it has no
  seed), History's rating AUC, SASRec-BCE and -CE (one run per seed)."""
  def flat(by_split: dict) -> dict:
    return {f"{s}/{k}": v for s, m in by_split.items() for k, v in m.items()}
  runs = {"popularity": [flat({s: base_rows[f"popularity / {s}"] for s in ("validation", "test")})]}
  if "History / test" in base_rows:
    runs["History (training like-rate)"] = [flat({"test": base_rows["History / test"]})]
  for label, desc in (("BCE", "SASRec-BCE"), ("CE", "SASRec-CE (sampled softmax)")):
    seeds = [{**flat({s: r[s] for s in ("validation", "test")}),
              **{k: r[k] for k in ("epochs", "best_epoch", "minutes")}}
             for key, r in sorted(sasrec.items()) if key.startswith(f"{label}/")]
    if seeds:
      runs[desc] = seeds
  return runs


def aux_mixture(name: str, row: str, share) -> str:
  """The row's mixture; with `share`, one where its auxiliary tasks (MIM, MLM, BPR, item QA) take `share` of
  the examples together and the others the rest, each group mixed within by example counts as the
  paper's mixtures are (registered as <mixture>_aux<percent>)."""
  import seqio
  import recalign.tasks as rt
  from recalign.tasks.registry import AUX_TASKS
  base, label = f"{name}_{ROWS[row][0]}", run_label(row, share)
  if label == row:  # no --aux-share, or no auxiliary tasks to share
    return base
  mix = f"{base}_{label.partition('@')[2]}"
  members = row_members(row)
  aux = [f"{name}_{m}" for m in members if m in AUX_TASKS]
  main = [f"{name}_{m}" for m in members if m not in AUX_TASKS]
  if mix not in seqio.MixtureRegistry.names():
    count = {t: rt.get(t).num_input_examples("train") for t in aux + main}
    rates = [(t, share * count[t] / sum(count[a] for a in aux)) for t in aux]
    rates += [(t, (1 - share) * count[t] / sum(count[m] for m in main)) for t in main]
    seqio.MixtureRegistry.add(mix, rates)
  return mix


def seed_std(vals: np.ndarray) -> float:
  """The runs' sample standard deviation (ddof=1: over three seeds the population one understates the spread
  by 18%); 0 for a single run."""
  return float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def mean_std(runs: list[dict], key: str) -> str:
  """"mean ± std" (`seed_std`) of `key` over the runs that have it; the mean alone for one; "—" for none."""
  vals = np.array([r[key] for r in runs if key in r])
  if not len(vals):
    return "—"
  return f"{vals.mean():.4f}" + (f" ± {seed_std(vals):.4f}" if len(vals) > 1 else "")


def table(results: dict, baselines: Optional[dict[str, list[dict]]] = None) -> str:
  """The Markdown table of a study: per row, mean ± std over seeds, the difference from its base row
  (`BASE_ROW`: test NDCG@10, or rating AUC for rows without retrieval; an --aux-share row's also from the
  row at the paper's mixing) against the seeds' spread, and
  rating AUC when any row has it; then `baselines` (`baseline_runs`) on the same users."""
  auc = any("test/auc" in r for r in results.values())
  lines = ["| row | seeds | " + " | ".join(f"test {k}" for k in KEYS) + " | val NDCG@10 | vs its base row (test) |"
           + (" test rating AUC |" if auc else "") + " training (mean) |",
           "|---|---|" + "---|" * (len(KEYS) + 3 + auc)]
  labels = sorted({label_of(v) for v in results.values()}, key=row_order)
  for label in labels:
    runs = [v for v in results.values() if label_of(v) == label]
    cells = [*_cells(runs), _against_base(results, label, runs)]
    if auc:
      cells.append(mean_std(runs, "test/auc"))
    cells.append(_training(runs))
    lines.append(f"| {describe(label)} (`{runs[0]['mixture']}`) | {len(runs)} | " + " | ".join(cells) + " |")
  for desc, runs in (baselines or {}).items():
    cells = [*_cells(runs), "—", *([mean_std(runs, "test/auc")] if auc else []), _training(runs)]
    lines.append(f"| {desc} | {len(runs)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _against_base(results: dict, label: str, runs: list[dict]) -> str:
  """The row's mean test NDCG@10 (AUC where it has no retrieval) minus its base row's (`BASE_ROW`) and, for a
  row trained at an --aux-share, minus the same row's at the paper's mixing; each against the two rows'
  spreads added; "—" with neither in the study."""
  row = row_of(label)
  refs = [(BASE_ROW.get(row), None)] + ([(row, "the paper's mixing")] if label != row else [])
  return "; ".join(d for ref, name in refs if ref and (d := _difference(results, runs, ref, name))) or "—"


def _difference(results: dict, runs: list[dict], ref: str, name: Optional[str]) -> Optional[str]:
  ref_runs = [v for v in results.values() if label_of(v) == ref]
  key = next((k for k in ("test/ndcg@10", "test/auc") if all(k in r for r in runs + ref_runs)), None)
  if not ref_runs or key is None:
    return None
  vals, base = (np.array([r[key] for r in rs]) for rs in (runs, ref_runs))
  diff, spread = vals.mean() - base.mean(), seed_std(vals) + seed_std(base)
  metric = {"test/ndcg@10": "NDCG@10", "test/auc": "AUC"}[key]
  verdict = ("one seed each: no spread yet" if len(vals) == len(base) == 1 else
             f"{'exceeds' if abs(diff) > spread else 'within'} spread {spread:.4f}")
  return f"{diff:+.4f} {metric} vs {name or ROWS[ref][1]} ({verdict})"


def at_equal_supervision(out: Path, results: dict, share: Optional[Callable[[str], float]] = None) -> str:
  """The auxiliary rows against their base rows at the same supervision rather than the same steps: at a
  run's last validation, the main-task examples it had seen (examples seen x `share`, default `main_share`)
  and its selection metric there, beside its base row's at as many main-task examples (each base seed's
  curve interpolated; the mean over the seeds whose curve spans that point). Whether an auxiliary task makes
  each main-task example worth more -- what the step-matched table cannot say. (The row is then at the end of
  its learning-rate decay, the base row part-way through its own: a bias in the row's favour.) Markdown;
  "" when no auxiliary row has its base row's curves."""
  from recalign.tasks.registry import AUX_TASKS
  curves: dict[str, list] = {}
  for r, metric, _, x, y in main_task_curves(out, results, share):
    curves.setdefault(label_of(r), []).append((metric, x, y))
  lines = []
  for label in sorted(curves, key=row_order):
    base = curves.get(BASE_ROW.get(row_of(label)))
    if not base or not set(row_members(row_of(label))) & set(AUX_TASKS):   # (UT adds main tasks)
      continue
    at = [(metric, x[-1], y[-1], np.mean(b)) for metric, x, y in curves[label]
          if (b := [np.interp(x[-1], bx, by) for m, bx, by in base if m == metric and bx[0] <= x[-1] <= bx[-1]])]
    if at:
      gap = np.array([y - b for _, _, y, b in at])
      lines.append(f"| {describe(label)} | {len(at)} | {at[0][0].upper()} | "
                   f"{np.mean([x for _, x, _, _ in at]) / 1e3:.0f}k | {np.mean([y for _, _, y, _ in at]):.4f} | "
                   f"{np.mean([b for *_, b in at]):.4f} | {gap.mean():+.4f}"
                   + (f" ± {seed_std(gap):.4f}" if len(gap) > 1 else "") + " |")
  head = ["| row | seeds | selection metric | main-task examples at its last validation | the row there "
          "| its base row at as many | difference |", "|---|---|---|---|---|---|---|"]
  return "\n".join(head + lines) if lines else ""


def _cells(runs: list[dict]) -> list[str]:
  return [mean_std(runs, k) for k in [f"test/{k}" for k in KEYS] + ["validation/ndcg@10"]]


def with_epochs(results: dict) -> dict:
  """`results` with each run's epochs: examples seen over its mixture's training examples (every member's,
  auxiliary ones included; passes over the mixture, whatever its rates). Computed when printed, from the
  registered tasks, so rows a study kept from before have them too."""
  import seqio
  def size(mixture: str) -> int:
    task = seqio.get_mixture_or_task(mixture)
    return sum(t.num_input_examples("train") for t in getattr(task, "tasks", [task]))
  sizes = {m: size(m) for m in {r["mixture"] for r in results.values()}}
  return {k: {**r, "epochs": round(r["examples_seen"] / sizes[r["mixture"]], 2)} for k, r in results.items()}


def with_trend(out: Path, results: dict, last: int = 4) -> dict:
  """`results` with each run's "trend": the least-squares slope of its validation metric (NDCG@10, AUC for
  the rating rows) over its `last` validations, per 1,000 steps -- where a run the cap stopped was heading
  (with a decay that ends at the cap, flattening there is partly the learning rate's doing)."""
  def trend(r: dict):
    metric, val = validation_log(out, r)
    val = val[-last:]
    if len(val) < 2:
      return None
    return float(np.polyfit([v["step"] for v in val], [v[metric] for v in val], 1)[0]) * 1000
  return {k: {**r, "trend": trend(r)} for k, r in results.items()}


def validation_log(out: Path, r: dict) -> tuple[Optional[str], list[dict]]:
  """(the metric a run validated on -- NDCG@10, or AUC for the rating rows --, its validations in order);
  (None, []) before its first validation."""
  log = out / label_of(r) / f"seed{r['seed']}" / "validation_log.jsonl"
  val = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
  return ("ndcg@10" if "ndcg@10" in val[0] else "auc") if val else None, val


def _training(runs: list[dict]) -> str:
  """How long the runs trained (means): steps and the best step, epochs (`with_epochs`), training minutes,
  how many stopped early (the others hit the cap) and where the capped ones were heading (`with_trend`) for
  recalign's rows; epochs for SASRec's."""
  def avg(key):
    return np.mean([r[key] for r in runs])
  if all("steps" in r for r in runs):
    best = np.mean([r["best_step"] or r["steps"] for r in runs])
    early = sum(bool(r.get("early_stopped")) for r in runs)
    epochs = f"{avg('epochs'):.1f} epochs, " if all("epochs" in r for r in runs) else ""
    capped = [r["trend"] for r in runs if not r.get("early_stopped") and r.get("trend") is not None]
    heading = f"; capped runs' validation {np.mean(capped):+.4f} per 1k steps at the end" if capped else ""
    return (f"{avg('steps'):.0f} steps (best {best:.0f}), {epochs}{avg('training_minutes'):.0f} min, "
            f"{early}/{len(runs)} stopped early{heading}")
  if all("epochs" in r for r in runs):
    return f"{avg('epochs'):.0f} epochs (best {avg('best_epoch'):.0f}), {avg('minutes'):.1f} min"
  return "—"


def compute_used(results: dict, sasrec: dict) -> str:
  """The training time the record holds: the runs' own training minutes (their validations and scoring not
  counted; a resume's replay counted) and SASRec's, in hours."""
  runs = sum(r["training_minutes"] for r in results.values()) / 60
  base = sum(r["minutes"] for r in sasrec.values()) / 60
  return (f"training time in the record: {len(results)} runs {runs:.1f} h + {len(sasrec)} SASRec runs {base:.1f} h "
          f"= {runs + base:.1f} h (validation and scoring not counted)")


if __name__ == "__main__":
  main()
