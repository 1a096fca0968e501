"""`prepare` in one process vs its Beam transforms on the DirectRunner: wall time and peak memory.

    python tools/bench_prepare.py --interactions 1000000 [--data DIR] [--workers 2]

Synthetic amazon-tsv data (as tools/bench_stream.py) unless `--data` names a source folder. Each path is the
whole `recalign prepare` in a fresh process, writing the prepared folder and its TFDS copy: in-process =
`read_source` + `prepare` + `tfds_data.save`; Beam = `beam_prepare.prepare_folder` (`--beam_runner
DirectRunner`, `--workers` processes). Prints both and their ratio, and checks they agree (the manifests'
counts). Needs the beam extra. Name the CPU (`lscpu`) with the numbers.
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
    from recalign.data import prepare, read_source, tfds_data
    data = prepare(read_source(path), name="bench")
    tfds_data.save(data, out)
    manifest = data.manifest
  else:
    from recalign.data import beam_prepare
    opts = ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"] if workers > 1 else []
    manifest = beam_prepare.prepare_folder(path, out, name="bench", options=opts)
  return {"mode": mode, "seconds": round(time.perf_counter() - t0, 1), "counts": manifest["counts"],
          "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
          "children_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--interactions", type=int, default=1_000_000)
  p.add_argument("--data", help="an amazon-tsv folder instead of synthetic data")
  p.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes")
  p.add_argument("--work", help="folder for the synthetic data and Beam output (default: a temporary one)")
  p.add_argument("--modes", nargs="+", default=["in-process", "beam"], choices=["in-process", "beam"],
                 help="the paths to run (one alone: a size the other does not fit, or not in the time)")
  p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
  args = p.parse_args()
  work = Path(args.work or tempfile.mkdtemp(prefix="bench_prepare_"))
  if args._child:
    print(json.dumps(child(args._child[0], args._child[1], args.workers, str(work / args._child[1]))))
    return
  src = Path(args.data) if args.data else synthetic_tsv(work / "src", args.interactions)
  rows = []
  for mode in args.modes:
    r = subprocess.run([sys.executable, __file__, "--workers", str(args.workers), "--work", str(work),
                        "--_child", str(src), mode], capture_output=True, text=True)
    if r.returncode:
      sys.exit(r.stderr[-3000:])
    rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
  for r in rows:
    print(f"{r['mode']:10s} {r['seconds']:>8}s  users {r['counts']['users']}  interactions "
          f"{r['counts']['interactions']}  peak RSS "
          f"{r['peak_rss_gib']} GiB (worker processes {r['children_peak_rss_gib']} GiB)")
  if len(rows) < 2:
    return
  a, b = rows
  assert a["counts"] == b["counts"], "the two paths disagree"
  print(f"beam / in-process: time {b['seconds'] / a['seconds']:.2f}x, peak memory "
        f"{max(b['peak_rss_gib'], b['children_peak_rss_gib']) / a['peak_rss_gib']:.2f}x")


if __name__ == "__main__":
  main()
