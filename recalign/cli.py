"""`recalign` command line: prepare / stats / vocab (data), and the model commands as they land."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

DEFAULT_SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def cmd_prepare(args) -> int:
  from recalign.data import AMAZON, MOVIES, IngestReport, prepare, read_source, tfds_data
  from recalign.data.prepare import format_stats, name_from_path
  source = args.source   # local, or gs:// (read through etils.epath)
  t0 = time.time()
  domain = {"amazon": AMAZON, "movies": MOVIES}[args.domain] if args.domain else None
  name = args.name or name_from_path(args.out)
  if args.beam_runner:
    from recalign.data import beam_prepare
    print(f"preparing {source} with Beam ({args.beam_runner}) ...", flush=True)
    manifest = beam_prepare.prepare_folder(
        source, args.out, fmt=args.format, meta=args.meta, name=name, domain=domain, kcore=args.kcore,
        seed=args.seed, num_validation_users=args.validation_users, strict=args.strict, runner=args.beam_runner,
        options=shlex.split(args.beam_options or ""), split_bytes=int(args.beam_split_mb * 2 ** 20))
    examples = manifest["report"]["examples"]
  else:
    print(f"reading {source} ...", flush=True)
    raw = read_source(source, args.format, meta=args.meta, report=IngestReport(strict=args.strict), domain=domain)
    data = prepare(raw, name=name, kcore=args.kcore, seed=args.seed, num_validation_users=args.validation_users)
    tfds_data.save(data, args.out)
    manifest, examples = data.manifest, raw.report.examples
  print(format_stats(manifest))
  for kind, found in examples.items():
    for ex in found:
      print(f"  e.g. [{kind}] {ex}")
  print(f"wrote {args.out} in {time.time() - t0:.1f}s")
  return 0


def cmd_stats(args) -> int:
  from recalign.data.ids import format_id_stats
  from recalign.data.prepare import format_stats
  path = Path(args.data) / "manifest.json"
  if not path.exists():
    print(f"error: {path} not found (run `recalign prepare` first)", file=sys.stderr)
    return 2
  manifest = json.loads(path.read_text())
  print(json.dumps(manifest, indent=2) if args.json else "\n".join([format_stats(manifest),
                                                                     *format_id_stats(manifest)]))
  return 0


def cmd_ids(args) -> int:
  import numpy as np
  from recalign.data import PreparedData
  from recalign.data.ids import build_ids, format_id_stats
  data = PreparedData.load(args.data)
  features = np.load(args.features) if args.features else None
  t0 = time.time()
  ids = build_ids(data, args.scheme, seed=args.seed, levels=args.levels, codebook=args.codebook, features=features,
                  base=args.base, leaf=args.leaf)
  path = ids.save(args.data)
  print(f"wrote {path} in {time.time() - t0:.1f}s; e.g. {ids.ids[0]}, {ids.ids[1]}")
  print("\n".join(format_id_stats(json.loads((Path(args.data) / "manifest.json").read_text()))))
  if ids.pieces():
    print(f"now `recalign vocab {args.data}` adds their {len(ids.pieces())} pieces to the project vocabulary "
          "(a pretrained vocabulary gets them appended as new ids)")
  return 0


def cmd_vocab(args) -> int:
  from recalign.data import PreparedData
  from recalign.data.ids import SCHEMES, load_ids, scheme_pieces
  from recalign.data.vocab import extend, load_vocabulary, train_vocabulary
  data = PreparedData.load(args.data)
  pieces = scheme_pieces(args.data)
  if args.spm:  # a user-supplied model (e.g. the standard T5 / FLAN-T5 one): only check it
    path = Path(args.spm)
  else:
    t0 = time.time()
    path = train_vocabulary(data, Path(args.data) / "vocab", vocab_size=args.size, pieces=pieces)
    print(f"trained {path} in {time.time() - t0:.1f}s" + (f" with {len(pieces)} item ID pieces" if pieces else ""))
  vocab = load_vocabulary(path)
  status = 0
  schemes = [s for s in SCHEMES if s == "random" or (Path(args.data) / "ids" / f"{s}.json").exists()]
  for scheme in schemes:
    ids = load_ids(args.data, scheme, data.num_items)
    print(f"[{scheme} IDs]")
    status = max(status, _report_ids(extend(vocab, pieces if scheme != "random" else []), ids))
  return status


def _report_ids(vocab, ids) -> int:
  from recalign.data.vocab import check_item_ids
  check = check_item_ids(vocab, ids)
  print(f"vocabulary size {vocab.vocab_size} (incl. {getattr(vocab, 'base', vocab).extra_ids} sentinels); item IDs: "
        f"{len(ids)} checked, {check.mean_tokens:.2f} tokens on average, at most {check.max_tokens}, "
        f"{len(check.token_ids)} distinct tokens")
  if check.merged_in_context:
    print(f"{len(check.merged_in_context)} IDs would tokenise differently inside a prompt tokenised as one "
          "string (the vocabulary does not split digits); recalign gives each ID its own tokens everywhere "
          "(prompts, targets, the decoding trie), so this is consistent. e.g.")
    for m in check.merged_in_context[:3]:
      print("  ", m)
  for f in check.failures[:10]:
    print("  unusable:", f)
  if check.failures:
    print(f"error: {len(check.failures)} item IDs cannot be tokenised consistently", file=sys.stderr)
    return 1
  print("consistent: every ID has one tokenisation in prompts, targets and the decoding trie")
  return 0


def cmd_demo(args) -> int:
  """The README's main job: data, vocabulary, a bounded CPU training run, evaluation, baselines."""
  from recalign.demo import run_demo
  ml = Path(args.ml100k) if args.ml100k else None
  run_demo(Path(args.data), Path(args.out), minutes=args.minutes, ml100k=ml, size=args.size,
           seed=args.seed, recipe=args.recipe, sasrec_epochs=args.sasrec_epochs, max_test=args.max_test_users,
           exclude_history=args.exclude_history, eval_every_minutes=args.eval_every_minutes, name=args.name)
  return 0


def cmd_profiles(args) -> int:
  """RecLM: every user's (or, with --items, every item's) profile, written by a trained profiler (a run
  trained on <name>_reclm)."""
  from recalign.data import PreparedData
  from recalign.data.vocab import load_vocabulary
  from recalign.evaluate import load_model
  from recalign.models import checkpoints as ck
  from recalign.tasks import reclm
  data = PreparedData.load(args.data)
  vocab_path = args.vocabulary or ck.checkpoint_vocabulary(args.checkpoint) or Path(args.data) / "vocab"
  vocab = load_vocabulary(vocab_path)
  model, params = load_model(args.checkpoint, vocab, size=args.size)
  if args.items:   # item prompts show the items' users with these (e.g. generated) profiles
    users = reclm.load_profiles(args.items, data)
    missing = sum(p is None for p in users)
    if missing:
      raise SystemExit(f"{args.items}: {missing} of {data.num_users} users have no profile; item prompts need all")
    prompts, key = reclm.item_prompts(data, vocab, users), "item"
  else:
    prompts, key = reclm.profile_prompts(data, vocab), "user"
  done = reclm.generate_profiles(model, params, vocab, prompts, args.out, batch_size=args.batch_size,
                                 max_length=args.max_length, key=key)
  print(f"{len(done)} {key} profiles in {args.out}")
  return 0


# ---------------------------------------------------------------------------------------------
# gin, T5X style: --gin_file=F (repeatable), --gin.NAME=VALUE (repeatable), --gin_search_paths=a,b



def split_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str], list[str]]:
  """Returns (gin files, bindings, search paths, remaining args)."""
  files, bindings, paths, rest = [], [], [], []
  it = iter(argv)
  for a in it:
    key, eq, val = a.partition("=")
    if key in ("--gin_file", "--gin_search_paths") or key.startswith("--gin."):
      if not eq:
        val = next(it, None)
        if val is None:
          raise SystemExit(f"error: {key} needs a value")
      if key == "--gin_file":
        files.append(val)
      elif key == "--gin_search_paths":
        paths.extend(p for p in val.split(",") if p)
      else:
        bindings.append(f"{key.removeprefix('--gin.')} = {val}")
    else:
      rest.append(a)
  return files, bindings, paths, rest


def parse_gin(files: Sequence[str], bindings: Sequence[str], paths: Sequence[str]) -> None:
  """T5X's order: search paths, then files (later override earlier), then --gin. bindings. recalign's
  own configs are package resources (`recalign/gin/...`), found by gin's package reader from anywhere;
  a file's own folder is searched too, for includes relative to it."""
  import gin
  for p in [*paths, *(str(Path(f).resolve().parent) for f in files)]:
    gin.add_config_file_search_path(p)
  gin.parse_config_files_and_bindings(list(files), list(bindings))


DEFAULT_RUN = ["recalign/gin/models/small.gin", "recalign/gin/runs/from_scratch.gin"]


def _binds_a_run() -> bool:
  """Whether the parsed gin files (or what they include) bind the run: train.model_dir, as every runs/*.gin."""
  import gin
  try:
    gin.query_parameter("train.model_dir")
    return True
  except ValueError:
    return False


def parse_train_config(files: Sequence[str], bindings: Sequence[str], paths: Sequence[str]) -> list[str]:
  """Parses `recalign train`'s gin; returns the run files added. Files that define no run (a mixture file,
  a model file, both) get the from-scratch run first, as T5X's example files are composed, and it is said;
  the user's files and bindings still override it."""
  import gin
  try:
    parse_gin(files, bindings, paths)
    if _binds_a_run():
      return []
  except ValueError as e:   # a model file's macros (DROPOUT_RATE, ...) are set by run files
    if "No bindings specified for" not in str(e) or any("model_dir" in _read_gin(f) for f in files):
      raise
  gin.clear_config()
  try:
    parse_gin(DEFAULT_RUN + list(files), bindings, paths)
  except ValueError as e:
    raise ValueError(f"{e}\nThe gin files given define no run and {' + '.join(DEFAULT_RUN)} do not complete them: "
                     "add a run file, e.g. --gin_file=gin/runs/from_scratch.gin (or gin/runs/finetune.gin)") from None
  return list(DEFAULT_RUN)


def _read_gin(path: str) -> str:
  try:
    return Path(path).read_text()
  except OSError:   # a package resource (recalign/gin/...): found by gin, not here
    from importlib import resources
    parts = Path(path).parts
    try:
      return resources.files(".".join(parts[:-1])).joinpath(parts[-1]).read_text()
    except (ModuleNotFoundError, FileNotFoundError, OSError):
      return ""


def cmd_train(args, gin_args) -> int:
  import gin
  from recalign import train as train_lib
  files, bindings, paths = gin_args
  if not files:
    print("error: give at least one --gin_file (e.g. gin/reat.gin)", file=sys.stderr)
    return 2
  for module in args.module:
    __import__(module)  # user modules that register their own seqio tasks / mixtures
  added = parse_train_config(files, bindings, paths)
  if added:
    print(f"recalign train: no run file given; adding {' and '.join(added)} "
          "(give gin/runs/finetune.gin to fine-tune)", file=sys.stderr)
  from recalign import paths
  from recalign.faults import ModelDirLock
  model_dir = paths.as_path(gin.query_parameter("%MODEL_DIR"))      # local or gs://
  with ModelDirLock(model_dir):     # (train() takes it again) a second job must not overwrite config.gin
    (model_dir / "config.gin").write_text(gin.config_str())
    result = train_lib.train()
  print(json.dumps({k: v for k, v in result.items() if k != "best"}, indent=2))
  return 0


def _lengths(text: Optional[str], default: dict) -> dict:
  if not text:
    return dict(default)
  return {k: int(v) for k, v in (kv.split("=") for kv in text.split(","))}


def cmd_eval(args, gin_args) -> int:
  """One checkpoint (MODEL_DIR/checkpoints/<step>, MODEL_DIR/best, a Hugging Face or T5X directory), or
  a MODEL_DIR: every saved step (T5X's eval job). Flags, or gin as for training (gin/eval.gin); flags
  given on the command line override gin."""
  from recalign import evaluate as E
  from recalign.baselines import format_table
  files, bindings, paths = gin_args
  if files or bindings:
    parse_gin(files, bindings, paths)
  given = {"checkpoint_path": args.checkpoint, "mixture_or_task_name": args.task, "split": args.split,
           "restore_mode": args.restore_mode, "steps": args.steps, "wait": args.wait or None,
           "until_step": args.until_step, "poll_seconds": args.poll_seconds, "beam_size": args.beam,
           "batch_size": args.batch, "max_examples": args.max_examples,
           "exclude_history": args.exclude_history or None, "task_feature_lengths": _lengths(args.lengths, {}) or None,
           "data_dirs": args.data, "vocabulary": args.vocabulary, "size": args.size, "output_dir": args.output_dir,
           "model_parallel": args.model_parallel}
  given = {k: v for k, v in given.items() if v is not None}
  for required, flag in (("checkpoint_path", "--checkpoint"), ("mixture_or_task_name", "--task")):
    if required not in given and not files:
      print(f"error: give {flag} (or --gin_file=gin/eval.gin with its macros)", file=sys.stderr)
      return 2
  print(format_table(E.eval_job(**given)))
  return 0


def cmd_baseline(args) -> int:
  from recalign import baselines as B
  from recalign.data import PreparedData
  from recalign.metrics import protocol_name
  data = PreparedData.load(args.data)
  rows = {}
  candidates = None
  if args.name != "history" and (Path(args.data) / "vocab").exists():
    import recalign.tasks as rt
    from recalign.evaluator import task_examples
    rt.register_dataset(args.data)
    exs = task_examples(f"{data.name}_ranking", args.split, {"inputs": 4096, "targets": 64})
    candidates = np.stack([e["candidates"] for e in exs])
  if args.name == "popularity":
    rows["popularity/retrieval"] = B.popularity(data, args.split, exclude_history=args.exclude_history)
    if candidates is not None:
      rows["popularity/ranking"] = B.popularity(data, args.split, candidates)
  elif args.name == "sasrec":
    from recalign.baselines.sasrec import SASRecConfig, evaluate_sasrec, train_sasrec
    runs = []
    for seed in args.seeds:
      cfg = SASRecConfig(epochs=args.epochs, seed=seed, loss=args.loss, exclude_history=args.exclude_history,
                         max_minutes=args.max_minutes,
                         **({"dropout": args.dropout} if args.dropout is not None else {}))
      model, params, log = train_sasrec(data, cfg)
      best = max((e for e in log if "validation_ndcg@10" in e), key=lambda e: e["validation_ndcg@10"],
                 default=log[-1])
      print(f"sasrec ({args.loss}, seed {seed}): {len(log)} epochs, loss {log[0]['loss']:.4f} -> "
            f"{log[-1]['loss']:.4f}, best epoch {best['epoch']}")
      run = {"retrieval": evaluate_sasrec(model, params, data, args.split, exclude_history=args.exclude_history)}
      if candidates is not None:
        run["ranking"] = evaluate_sasrec(model, params, data, args.split, candidates)
      runs.append(run)
    for kind in runs[0]:
      rows[f"sasrec-{args.loss}/{kind}"] = B.mean_std([r[kind] for r in runs])
  else:
    rows["history/rating"] = B.history_rating(data, args.split)
  protocol = protocol_name(args.exclude_history)
  print(f"{data.name}, {args.split} split; retrieval protocol: {protocol}")
  print(B.format_table(rows))
  if args.out:
    Path(args.out).write_text(json.dumps({"protocol": protocol, **rows}, indent=2))
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="recalign", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True)

  s = sub.add_parser("prepare", help="ingest a raw data set, k-core, leave-one-out split, random IDs")
  s.add_argument("--source", required=True, help="amazon-tsv folder, Amazon 2014 / 2018 reviews (reviews_*_5.json[.gz] "
                 "or <Category>_5.json[.gz]) or 2023 reviews (<Category>.jsonl[.gz]) or their folder, a RecBole "
                 "folder with *.inter / *.item, a MovieLens folder with ratings.csv, or a one-line-per-user sequence "
                 "file (user item item ...)")
  s.add_argument("--format", choices=["amazon-tsv", "amazon-raw", "amazon-2023", "recbole", "movielens-csv",
                                      "sequences"], help="default: detected")
  s.add_argument("--meta", help="item metadata: Amazon meta_<Category>.json[l][.gz] (default: found beside the "
                 "reviews); sequences: an items.tsv or a meta_*.json[.gz]")
  s.add_argument("--domain", choices=["amazon", "movies"],
                 help="template words (default: amazon 'products ... buy'; movies for RecBole and MovieLens)")
  s.add_argument("--out", required=True, help="output folder")
  s.add_argument("--name", help="data set name used in task names (default: from --out)")
  s.add_argument("--kcore", type=int, default=5)
  s.add_argument("--seed", type=int, default=0, help="seeds the item ID permutation and validation subset")
  s.add_argument("--validation-users", type=int, default=3000)
  s.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping")
  s.add_argument("--beam_runner", help="prepare with an Apache Beam pipeline on this runner (DirectRunner, "
                 "FlinkRunner, SparkRunner, DataflowRunner; needs the beam extra): the same folder, its users "
                 "only in the TFDS copy; row formats (amazon-tsv, amazon-raw, amazon-2023, movielens-csv)")
  s.add_argument("--beam_options", help="Beam pipeline options as one string, given with '=': a cluster's "
                 "--beam_options=\"--flink_master=... \" or --project=... (the DirectRunner's multi_processing mode "
                 "lost data at 30M interactions: the pipeline's ledger then fails the run; one process is safe)")
  s.add_argument("--beam_split_mb", type=float, default=64, help="with --beam_runner: the source file is read "
                 "in pieces of this many MiB, each by a worker (a gzipped file by one)")
  s.set_defaults(fn=cmd_prepare)

  s = sub.add_parser("stats", help="print a prepared data set's manifest")
  s.add_argument("data")
  s.add_argument("--json", action="store_true")
  s.set_defaults(fn=cmd_stats)

  s = sub.add_parser("ids", help="build item IDs under a scheme (random, collaborative, semantic, atomic, hybrid)")
  s.add_argument("data")
  s.add_argument("--scheme", required=True, choices=["random", "collaborative", "semantic", "atomic", "hybrid"],
                 help="atomic: one vocabulary piece per item; hybrid: collaborative (or --base semantic) codes "
                 "followed by the item's own piece (P5's CID+IID)")
  s.add_argument("--base", default="collaborative", choices=["collaborative", "semantic"],
                 help="hybrid: the codes before the item's own piece")
  s.add_argument("--leaf", default="codes", choices=["codes", "item"],
                 help="hybrid: 'codes' keeps every code and appends the item's piece (P5's CID+IID: the piece is "
                 "decided by the codes); 'item' puts the piece in place of the last code, the one that tells items "
                 "apart")
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--levels", type=int, default=3, help="semantic: residual k-means levels (+1 de-duplication code)")
  s.add_argument("--codebook", type=int, help="codes per level (default: semantic 256, collaborative 32)")
  s.add_argument("--features", help="semantic: a .npy of item vectors, row k = item k of items.jsonl "
                 "(default: TF-IDF of title + categories reduced by SVD)")
  s.set_defaults(fn=cmd_ids)

  s = sub.add_parser("vocab", help="train (or check) the SentencePiece vocabulary of a prepared data set")
  s.add_argument("data")
  s.add_argument("--size", type=int, default=8000, help="pieces, excluding the 100 sentinels")
  s.add_argument("--spm", help="check this existing SentencePiece model instead of training one")
  s.set_defaults(fn=cmd_vocab)

  s = sub.add_parser("train", help="train with gin: --gin_file=... --gin.MODEL_DIR=\"'/tmp/run'\" ...")
  s.add_argument("--module", action="append", default=[],
                 help="import this Python module first (it may register seqio tasks/mixtures)")
  s.set_defaults(fn=cmd_train, gin=True)

  s = sub.add_parser("eval", help="evaluate a checkpoint, or every checkpoint of a run (metrics JSON + predictions)")
  s.add_argument("--checkpoint",
                 help="MODEL_DIR (every saved step, as T5X's eval job), MODEL_DIR/checkpoints/<step>, MODEL_DIR/best, "
                      "a Hugging Face directory or a T5X checkpoint_<step>")
  s.add_argument("--restore-mode", choices=["all", "latest", "specific"],
                 help="for a MODEL_DIR: every step (default), the newest, or --steps")
  s.add_argument("--steps", type=int, nargs="+", help="for a MODEL_DIR: these steps (restore mode 'specific')")
  s.add_argument("--wait", action="store_true", help="for a MODEL_DIR: keep evaluating new checkpoints as a "
                 "training job writes them, until TRAIN_STEPS (or --until-step) is evaluated")
  s.add_argument("--until-step", type=int)
  s.add_argument("--poll-seconds", type=float)
  s.add_argument("--task", help="task or mixture, e.g. beauty_retrieval")
  s.add_argument("--split", choices=["validation", "test"], help="default test")
  s.add_argument("--data", action="append", help="prepared data set(s) (default: from the run's run.json)")
  s.add_argument("--beam", type=int, help="beam width (default 20)")
  s.add_argument("--batch", type=int, help="users per batch (default 32)")
  s.add_argument("--max-examples", type=int, help="evaluate a seeded random sample of N users")
  s.add_argument("--lengths", help="e.g. inputs=1024,targets=64 (default: the run's)")
  s.add_argument("--exclude-history", action="store_true",
                 help="retrieval ranks the catalogue minus the user's history (default: the paper's full catalogue)")
  s.add_argument("--vocabulary", help="SentencePiece model (default: the run's, from run.json, or the "
                 "checkpoint's own spiece.model)")
  s.add_argument("--model-parallel", type=int, help="split parameters over N devices as training does (T5X's "
                 "logical-axis rules; for xl / xxl checkpoints too large for one device); default 1")
  s.add_argument("--size", help="model size of a T5X checkpoint (it records no config), e.g. base")
  s.add_argument("--output-dir", help="where metrics and predictions go (default: MODEL_DIR/eval/<step>, "
                 "MODEL_DIR/eval/best_<step> for MODEL_DIR/best; <folder>/../eval/<name> outside a recalign run)")
  s.set_defaults(fn=cmd_eval, gin=True)

  s = sub.add_parser("baseline", help="popularity / SASRec / history baselines with the same metrics")
  s.add_argument("name", choices=["popularity", "sasrec", "history"])
  s.add_argument("--data", required=True)
  s.add_argument("--split", default="test", choices=["validation", "test"])
  s.add_argument("--epochs", type=int, default=200, help="SASRec: at most (early stopping on validation NDCG@10)")
  s.add_argument("--loss", default="ce", choices=["bce", "ce", "sampled_ce"],
                 help="SASRec: binary cross-entropy with one negative (the original) or cross-entropy over the "
                      "catalogue (full or sampled softmax)")
  s.add_argument("--dropout", type=float, help="SASRec dropout (default 0.5)")
  s.add_argument("--max-minutes", type=float, help="SASRec: wall-clock budget per seed (keeps the best epoch)")
  s.add_argument("--seeds", type=int, nargs="+", default=[0], help="SASRec: one run per seed; mean and spread")
  s.add_argument("--out", help="write the metrics as JSON here")
  s.add_argument("--exclude-history", action="store_true",
                 help="retrieval ranks the catalogue minus the user's history (default: the paper's full catalogue)")
  s.set_defaults(fn=cmd_baseline)

  s = sub.add_parser("profiles", help="RecLM: write every user's (--items: item's) profile with a trained profiler "
                     "(resumable JSONL)")
  s.add_argument("--checkpoint", required=True, help="a checkpoint of a run trained on <name>_reclm")
  s.add_argument("--data", required=True, help="the prepared data set")
  s.add_argument("--out", required=True, help="JSONL {user|item, profile}; IDs already in it are skipped")
  s.add_argument("--items", metavar="USER_PROFILES",
                 help="write item profiles; item prompts show up to 5 of the item's users with these profiles (JSONL)")
  s.add_argument("--vocabulary", help="default: the run's (run.json), else the data set's vocab/")
  s.add_argument("--size", help="model size, for checkpoints that record no config")
  s.add_argument("--batch-size", type=int, default=32)
  s.add_argument("--max-length", type=int, default=64)
  s.set_defaults(fn=cmd_profiles)

  s = sub.add_parser("demo", help="end-to-end demo on the shared Amazon Beauty data (or --data: any Amazon-style set)")
  s.add_argument("--data", default=str(DEFAULT_SHARED / "amazon-beauty"),
                 help="source folder of any format `recalign prepare` reads")
  s.add_argument("--name", help="the data set's name in task names (default: from the folder, amazon-beauty -> beauty)")
  s.add_argument("--ml100k", default=str(DEFAULT_SHARED / "ml-100k"), help="'' to skip the rating part")
  s.add_argument("--out", default="runs/demo")
  s.add_argument("--minutes", type=float, default=12.0, help="training budget for the retrieval data (ml-100k: 1/4)")
  s.add_argument("--size", default="mini", help="model size (gin/models/*.gin; mini trains on a CPU)")
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--recipe", default="bare", choices=["bare", "compact", "paper"],
                 help="bare: retrieval, the history's collaborative IDs alone, rsqrt decay (fastest on a CPU); "
                      "compact: the same with the template's words, constant rate; paper: the paper's prompts, "
                      "random IDs, ReAT")
  s.add_argument("--sasrec-epochs", type=int, default=200,
                 help="at most this many epochs for each SASRec (BCE, sampled-softmax CE); both stop early")
  s.add_argument("--eval-every-minutes", type=float, help="validation during training (default: minutes / 8)")
  s.add_argument("--max-test-users", type=int, help="evaluate test on a seeded sample of N users (default: all)")
  s.add_argument("--exclude-history", action="store_true",
                 help="retrieval ranks the catalogue minus the user's history (default: the paper's full catalogue)")
  s.set_defaults(fn=cmd_demo)
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  import os
  from recalign.data.report import DataError
  from recalign.faults import Preempted, RunError
  argv = list(sys.argv[1:] if argv is None else argv)
  files, bindings, paths, rest = split_gin_args(argv)
  args = build_parser().parse_args(rest)
  if not getattr(args, "gin", False) and (files or bindings):
    print(f"error: {args.command} takes no --gin options", file=sys.stderr)
    return 2
  if args.command != "stats":   # (stats reads a JSON file; every other command starts TensorFlow)
    from recalign.console import quiet_startup
    # TensorFlow / XLA start-up lines off the console (RECALIGN_VERBOSE=1 keeps them); prepare and ids need no JAX
    quiet_startup(start_jax=args.command not in ("prepare", "ids"))
  try:
    return args.fn(args, (files, bindings, paths)) if getattr(args, "gin", False) else args.fn(args)
  except Preempted as e:   # the checkpoint is saved (training) or nothing was half-recorded (eval)
    print(f"{e}", file=sys.stderr)
    return e.code
  except (DataError, FileNotFoundError, ValueError, RunError) as e:
    if os.environ.get("RECALIGN_DEBUG"):
      raise
    # Bad input or configuration: one line that names the file/field or the setting.
    print(f"error: {e}", file=sys.stderr)
    print("(set RECALIGN_DEBUG=1 for the traceback)", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
