"""Memory and start-up of a training input pipeline: examples held in memory vs streamed from TFDS.

    python tools/bench_stream.py --interactions 1000000 [--data DIR] [--train-examples prefixes] [--itdr]

Writes synthetic Amazon-style data (zipf item popularity, users of 5+ interactions) unless `--data` names
an amazon-tsv folder, prepares it as `recalign prepare` does (JSON lines + TFDS copy), then, in a fresh
process each, registers the data set's tasks (TaskConfig.streamed False / True) and pulls the retrieval
task's training examples through seqio: seconds to the first example, examples/s after it, and the
process's peak resident memory (ru_maxrss, TF and JAX included). Side by side in one run; name the CPU
(`lscpu`) with the numbers.

    python tools/bench_stream.py --prepared DIR --measure train [--validate 64]

times `recalign train` instead (one step of the retrieval task, mini T5, bare prompts, batch 64, in memory
and streamed; `--validate N`: then a validation on N users): seconds from the process's start to its end
and its peak memory, on a folder prepared before (with its vocabulary).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
START = time.time()


def synthetic_tsv(out: Path, interactions: int, seed: int = 0) -> Path:
  """~`interactions` rows: users of 5 + geometric(0.1) items, item popularity zipf(1.1) over users/5 items."""
  import numpy as np
  rng = np.random.default_rng(seed)
  lengths = 5 + rng.geometric(0.1, size=interactions // 14)
  lengths = lengths[np.cumsum(lengths) <= interactions]
  items = max(1000, len(lengths) // 5)
  weights = 1.0 / np.arange(1, items + 1) ** 1.1
  weights /= weights.sum()
  out.mkdir(parents=True, exist_ok=True)
  draws = rng.choice(items, size=int(lengths.sum()) * 2, p=weights)   # one draw for everyone: O(items) once
  ends = np.cumsum(lengths * 2)
  with open(out / "interactions.tsv", "w") as f:
    f.write("user_id\titem_id\ttimestamp\n")
    for u, (n, end) in enumerate(zip(lengths, ends)):
      picks = draws[end - 2 * n:end]
      picks = picks[np.sort(np.unique(picks, return_index=True)[1])][:n]   # distinct, in draw order
      f.write("".join(f"u{u}\ti{i}\t{t}\n" for t, i in enumerate(picks)))
  (out / "items.tsv").write_text("item_id\ttitle\n" + "".join(f"i{i}\tThing {i}\n" for i in range(items)))
  return out


def peak_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def pipeline(data: str, streamed: bool, train_examples: str, n: int, itdr: bool = False) -> dict:
  """(in a process of its own) register, then pull `n` retrieval training examples (`itdr`: with ITDR's
  tasks registered too, TKR's examples)."""
  import recalign.tasks as rt
  t0 = time.perf_counter()
  rt.register_dataset(data, config=rt.TaskConfig(streamed=streamed, train_examples=train_examples, itdr=itdr))
  name = json.loads((Path(data) / "manifest.json").read_text())["name"]
  task = rt.get(f"{name}_{'itdr_tkr' if itdr else 'retrieval'}")
  lengths = {"inputs": 2048, "targets": 512} if itdr else {"inputs": 512, "targets": 16}
  it = task.get_dataset(lengths, split="train", shuffle=True, seed=0).as_numpy_iterator()
  t_reg = time.perf_counter() - t0
  next(it)
  first = time.perf_counter() - t0
  t1 = time.perf_counter()
  for _ in range(n):
    next(it)
  return {"streamed": streamed, "register_s": round(t_reg, 1), "first_example_s": round(first, 1),
          "examples_per_s": round(n / (time.perf_counter() - t1)), "train_examples": task.num_input_examples("train"),
          "peak_rss_gib": round(peak_gib(), 2)}


def train_start(data: str, streamed: bool, run: str, validate: int = 0) -> dict:
  """(in a process of its own) `recalign train` for one step of the retrieval task (mini T5, bare prompts,
  batch 64) on the prepared folder: seconds from the process's start to its end (imports, registration,
  compilation, the first step, the closing checkpoint) and its peak resident memory."""
  from recalign.cli import main as cli
  name = json.loads((Path(data) / "manifest.json").read_text())["name"]
  gin = Path(__file__).resolve().parent.parent / "recalign" / "gin"
  code = cli(["train", f"--gin_file={gin / 'models' / 'mini.gin'}", f"--gin_file={gin / 'runs' / 'from_scratch.gin'}",
              f"--gin.DATA_DIRS=['{data}']", f"--gin.MIXTURE_OR_TASK_NAME='{name}_retrieval'",
              "--gin.TASK_FEATURE_LENGTHS={'inputs': 96, 'targets': 16}", "--gin.TRAIN_STEPS=1",
              "--gin.BATCH_SIZE=64", f"--gin.MODEL_DIR='{run}'", f"--gin.registry.TaskConfig.streamed={streamed}",
              "--gin.registry.TaskConfig.prompt_words=False", "--gin.registry.TaskConfig.with_titles=False",
              "--gin.registry.TaskConfig.item_prefix=False",
              *([] if not validate else ["--gin.trainer.ValidationConfig.every=1",
                                         f"--gin.trainer.ValidationConfig.task='{name}_retrieval'",
                                         f"--gin.trainer.ValidationConfig.examples={validate}"])])
  return {"streamed": streamed, "code": code, "seconds": round(time.time() - START, 1),
          "peak_rss_gib": round(peak_gib(), 2)}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--interactions", type=int, default=1_000_000)
  p.add_argument("--data", help="an amazon-tsv folder instead of synthetic data")
  p.add_argument("--train-examples", default="prefixes", choices=["windows", "prefixes"])
  p.add_argument("--examples", type=int, default=3000, help="examples pulled after the first")
  p.add_argument("--work", help="folder for the synthetic and prepared data (default: a temporary one)")
  p.add_argument("--prepared", help="a prepared folder with its vocabulary (skips making and preparing data)")
  p.add_argument("--measure", choices=["pipeline", "train"], default="pipeline", help="pipeline: seqio's examples "
                 "(register, first example, examples/s); train: `recalign train` to the end of its first step")
  p.add_argument("--validate", type=int, default=0, help="with --measure train: validate after the step on "
                 "this many validation users (0: no validation)")
  p.add_argument("--itdr", action="store_true", help="register ITDR's tasks too and pull TKR's training examples")
  p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
  p.add_argument("--_train", nargs=3, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args._child:
    print(json.dumps(pipeline(args._child[0], args._child[1] == "1", args.train_examples, args.examples, args.itdr)))
    return
  if args._train:
    print(json.dumps(train_start(args._train[0], args._train[1] == "1", args._train[2], args.validate)))
    return
  work = Path(args.work or tempfile.mkdtemp(prefix="bench_stream_"))
  prepared = Path(args.prepared) if args.prepared else work / "prepared"
  if not args.prepared:
    src = Path(args.data) if args.data else synthetic_tsv(work / "src", args.interactions)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "recalign.cli", "prepare", "--source", str(src), "--out",
                          str(prepared), "--name", "bench"], capture_output=True, text=True)
    if out.returncode:
      sys.exit(out.stdout + out.stderr)
    print(f"prepare (JSON lines + TFDS copy): {time.perf_counter() - t0:.0f}s")
    subprocess.run([sys.executable, "-m", "recalign.cli", "vocab", str(prepared), "--size", "2000"],
                   check=True, capture_output=True)
  manifest = json.loads((prepared / "manifest.json").read_text())
  print(f"{manifest['counts']['users']} users, {manifest['counts']['interactions']} interactions")
  if args.measure == "train":
    return train_rows(prepared, work, args.validate)
  rows = [in_child("--train-examples", args.train_examples, "--examples", str(args.examples),
                   *(["--itdr"] if args.itdr else []), "--_child",
                   str(prepared), "1" if streamed else "0") for streamed in (False, True)]
  print(f"{'examples':10s} {'register s':>10s} {'1st example s':>14s} {'examples/s':>10s} {'peak RSS GiB':>12s}")
  for r in rows:
    print(f"{'streamed' if r['streamed'] else 'in memory':10s} {r['register_s']:>10} {r['first_example_s']:>14} "
          f"{r['examples_per_s']:>10} {r['peak_rss_gib']:>12}")
  m, s = rows
  kind = "ITDR TKR" if args.itdr else args.train_examples
  print(f"{m['train_examples']} {kind} training examples; streamed / in memory: peak memory "
        f"{s['peak_rss_gib'] / m['peak_rss_gib']:.2f}x, time to the first example "
        f"{s['first_example_s'] / m['first_example_s']:.2f}x, "
        f"examples/s {s['examples_per_s'] / m['examples_per_s']:.2f}x")


def in_child(*argv: str) -> dict:
  """This script run with `argv` in a fresh process: the JSON line it prints last."""
  res = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
  if res.returncode:
    sys.exit(res.stderr[-3000:])
  return json.loads(res.stdout.strip().splitlines()[-1])


def train_rows(prepared: Path, work: Path, validate: int = 0) -> None:
  starts = [in_child("--validate", str(validate), "--_train", str(prepared), "1" if streamed else "0",
                     str(work / f"run_{int(streamed)}_v{validate}")) for streamed in (False, True)]
  if any(r["code"] for r in starts):   # a failed run's seconds and memory are not a measurement
    sys.exit(f"recalign train failed: {starts}")
  print(f"`recalign train`, 1 step (start-up, registration, compilation, the step, "
        f"{f'validation on {validate} users, ' if validate else ''}the checkpoint): "
        + ", ".join(f"{'streamed' if r['streamed'] else 'in memory'} {r['seconds']} s, peak RSS "
                    f"{r['peak_rss_gib']} GiB" for r in starts))


if __name__ == "__main__":
  main()
