"""Throughput of the input pipeline: examples/s and tokens/s of each task and of the UT+AT mixture.

    python tools/bench_data.py [--data ../shared/data/amazon-beauty] [--examples 3000]

Prepares the data set and vocabulary in a temporary folder, then pulls examples through seqio
(rendering, dynamic sampling, tokens) as the trainer would, on this machine's CPU cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


import recalign.tasks as rt  # noqa: E402
from recalign.data import PreparedData  # noqa: E402
from recalign.experiments import ensure_prepared  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def measure(ds, n: int) -> tuple[float, float]:
  it = ds.as_numpy_iterator()
  for _ in range(200):  # warm-up: tracing, table constants, first shuffle buffer
    next(it)
  t0, tokens = time.perf_counter(), 0
  for _ in range(n):
    ex = next(it)
    tokens += len(ex["inputs"]) + len(ex["targets"])
  dt = time.perf_counter() - t0
  return n / dt, tokens / dt


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "amazon-beauty"))
  p.add_argument("--examples", type=int, default=3000)
  p.add_argument("--inputs", type=int, default=1024)
  p.add_argument("--targets", type=int, default=128)
  args = p.parse_args()
  lengths = {"inputs": args.inputs, "targets": args.targets}
  with tempfile.TemporaryDirectory() as tmp:
    data = PreparedData.load(ensure_prepared(Path(args.data), Path(tmp) / "bench", "bench"))
    t0 = time.perf_counter()
    names = rt.register_dataset(Path(tmp) / "bench")
    print(f"registered {len(names)} tasks/mixtures in {time.perf_counter() - t0:.1f}s "
          f"({data.num_users} users, {data.num_items} items); lengths {lengths}, {os.cpu_count()} CPUs")
    print(f"{'task':<18} {'examples/s':>11} {'tokens/s':>11}")
    for name in ["bench_retrieval", "bench_ranking", "bench_mim", "bench_mlm", "bench_bpr", "bench_ut_at"]:
      ds = rt.get(name).get_dataset(lengths, split="train", shuffle=True, seed=0)
      eps, tps = measure(ds, args.examples)
      print(f"{name.removeprefix('bench_'):<18} {eps:>11.0f} {tps:>11.0f}")


if __name__ == "__main__":
  main()
