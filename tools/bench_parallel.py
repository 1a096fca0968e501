r"""A study's throughput on a CPU: one training on all the cores vs one training per core, side by side.

    python tools/bench_parallel.py --out runs/study29 --recipe 'bare_prefixes_hybrid_item@dropout=0.1,decay=linear' \
        --row reat --steps 150

tools/study.py trains its runs one after another, each on every core. On a small model XLA's CPU kernels
use two cores far less than twice as well as one, so runs trained side by side, each pinned to cores of its
own, may finish a study sooner. Both ways train the study's row (its recipe and mixture: `study_setup`, the
same `--out` reuses the study's prepared data) from the same seed for `--steps` steps, no validation:
first the reference, one process on every core (`--cores`), then one process per core group at once.
Each process's rate is taken from its train_log.jsonl after its first `--skip` steps (compilation, the input
pipeline's start); printed: each process's steps/s, the machine's total and its ratio to the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))   # (study: the rows' recipe and data)


def worker(args) -> None:
  """One training pinned to `args.worker` (cores as "0,1"), before JAX starts: XLA sizes its thread pool
  from the cores this process may run on."""
  os.sched_setaffinity(0, {int(c) for c in args.worker.split(",")})
  from recalign.console import quiet_startup
  quiet_startup()
  import study
  from recalign.data import PreparedData
  from recalign.experiments import train_model
  recipe, long_recipe, data_dir, _ = study.study_setup(args)
  mixture = study.aux_mixture(PreparedData.load(data_dir).name, args.row, None)
  train_model(data_dir, Path(args.model_dir), mixture, None, minutes=None, size=None, seed=0,
              recipe=long_recipe if "ranking" in study.row_members(args.row) else recipe, steps=args.steps,
              extra=[f"train.log_every = {args.log_every}"])


def rate(model_dir: Path, skip: int) -> float:
  """Steps per second of training after step `skip`, from the run's own log (validation has none here)."""
  log = [json.loads(x) for x in (model_dir / "train_log.jsonl").read_text().splitlines()]
  first = next((e for e in log[:-1] if e["step"] >= skip), None)
  if first is None:
    raise SystemExit(f"{model_dir}: no log between step {skip} and the last: more --steps or a smaller --log-every")
  return (log[-1]["step"] - first["step"]) / ((log[-1]["minutes"] - first["minutes"]) * 60)


def run(groups: list[str], args, label: str) -> list[float]:
  """Trains one process per core group, all at once; their steps/s."""
  dirs = [Path(args.out) / "bench_parallel" / f"{label}_{i}" for i in range(len(groups))]
  procs = []
  for cores, d in zip(groups, dirs):
    shutil.rmtree(d, ignore_errors=True)   # (a run from scratch, not resumed)
    procs.append(subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--worker", cores, "--model-dir", str(d)],
                                  stdout=subprocess.DEVNULL, stderr=open(f"{d}.log", "w")))
  for p, d in zip(procs, dirs):
    if p.wait():
      raise SystemExit(f"the {label} run on {d} failed: see {d}.log")
  return [rate(d, args.skip) for d in dirs]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "amazon-beauty"))
  p.add_argument("--name", default="beauty")
  p.add_argument("--out", default="runs/study", help="the study's --out (its prepared data are reused)")
  p.add_argument("--recipe", default="compact")
  p.add_argument("--gin", action="append", default=[])
  p.add_argument("--id-scheme")
  p.add_argument("--kcore", type=int, default=5)
  p.add_argument("--users-fraction", type=float, default=1.0)
  p.add_argument("--ranking-inputs", type=int, default=1024)
  p.add_argument("--row", default="retrieval", help="a row of tools/study.py (its mixture)")
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--skip", type=int, default=50, help="steps left out of the rate (compilation, warm-up)")
  p.add_argument("--log-every", type=int, default=25, help="steps between logs (and a mixture's task probes), "
                 "as the study's")
  p.add_argument("--cores", default=",".join(map(str, sorted(os.sched_getaffinity(0)))),
                 help="the cores to use (default: every core this process may run on)")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  p.add_argument("--model-dir", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return worker(args)
  cores = args.cores.split(",")
  (Path(args.out) / "bench_parallel").mkdir(parents=True, exist_ok=True)
  print(f"{args.row} with {args.recipe}, {args.steps} steps (rate after step {args.skip}), cores {args.cores}",
        flush=True)
  [one] = run([args.cores], args, "together")
  print(f"1 process on {len(cores)} cores: {one:.3f} steps/s", flush=True)
  each = run(cores, args, "apart")
  print(f"{len(cores)} processes on 1 core each: {' / '.join(f'{r:.3f}' for r in each)} steps/s, "
        f"{sum(each):.3f} in all -- {sum(each) / one:.2f}x the one process's throughput, each run "
        f"{one / min(each):.2f}x as long")


if __name__ == "__main__":
  main()
