"""`prepare` in one process vs its Beam transforms on the DirectRunner: wall time and peak memory.

    python tools/bench_prepare.py --interactions 1000000 [--data DIR] [--workers 2]

Synthetic amazon-tsv data (as tools/bench_stream.py) unless `--data` names an amazon-tsv folder. Each
path runs in a fresh process: in-process = `read_source` + `prepare` (what `recalign prepare` does before
writing); Beam = `beam_prepare.run_local` (parse, dedup, order, k-core, numbering, records written as JSON
lines), DirectRunner with `--workers` processes. Prints both and their ratio, and checks they agree
(users, items per user). Needs the beam extra. Name the CPU (`lscpu`) with the numbers.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream import synthetic_tsv  # noqa: E402


def child(path: str, mode: str, workers: int, out: str) -> dict:
  t0 = time.perf_counter()
  if mode == "in-process":
    from recalign.data import prepare, read_source
    data = prepare(read_source(path), name="bench")
    users, interactions = data.num_users, int(sum(len(s) for s in data.sequences))
  else:
    from recalign.data import beam_prepare
    opts = ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"] if workers > 1 else []
    records = beam_prepare.run_local(Path(path) / "interactions.tsv", out, options=opts)
    users, interactions = len(records), sum(len(r["items"]) for r in records)
  return {"mode": mode, "seconds": round(time.perf_counter() - t0, 1), "users": users,
          "interactions": interactions, "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
          "children_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--interactions", type=int, default=1_000_000)
  p.add_argument("--data", help="an amazon-tsv folder instead of synthetic data")
  p.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes")
  p.add_argument("--work", help="folder for the synthetic data and Beam output (default: a temporary one)")
  p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
  args = p.parse_args()
  work = Path(args.work or tempfile.mkdtemp(prefix="bench_prepare_"))
  if args._child:
    print(json.dumps(child(args._child[0], args._child[1], args.workers, str(work / "beam_out"))))
    return
  src = Path(args.data) if args.data else synthetic_tsv(work / "src", args.interactions)
  rows = []
  for mode in ("in-process", "beam"):
    r = subprocess.run([sys.executable, __file__, "--workers", str(args.workers), "--work", str(work),
                        "--_child", str(src), mode], capture_output=True, text=True)
    if r.returncode:
      sys.exit(r.stderr[-3000:])
    rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
  for r in rows:
    print(f"{r['mode']:10s} {r['seconds']:>8}s  users {r['users']}  interactions {r['interactions']}  peak RSS "
          f"{r['peak_rss_gib']} GiB (worker processes {r['children_peak_rss_gib']} GiB)")
  a, b = rows
  assert (a["users"], a["interactions"]) == (b["users"], b["interactions"]), "the two paths disagree"
  print(f"beam / in-process: time {b['seconds'] / a['seconds']:.2f}x, peak memory "
        f"{max(b['peak_rss_gib'], b['children_peak_rss_gib']) / a['peak_rss_gib']:.2f}x")


if __name__ == "__main__":
  main()
