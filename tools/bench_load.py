"""Loading a prepared folder's users from its TFDS copy: TFDS decoding per record vs `tfds_data.read_users`.

    python tools/bench_load.py --data data/beauty [--work DIR]

What `PreparedData.load` costs on a folder without users.jsonl (one `recalign prepare --beam_runner` made):
the folder is copied to `--work` without users.jsonl, and its users read both ways in one run, side by side,
checked equal. Name the CPU (`lscpu`) with the numbers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", required=True, help="a prepared folder")
  p.add_argument("--work", help="where its copy without users.jsonl goes (default: a temporary folder)")
  args = p.parse_args()
  import tensorflow_datasets as tfds
  from recalign.data import PreparedData, tfds_data
  work = Path(args.work or tempfile.mkdtemp(prefix="bench_load_")) / "prepared"
  if not (work / "manifest.json").exists():
    tfds_data.save(PreparedData.load(args.data), work)
    (work / "users.jsonl").unlink()
  builder = tfds.builder_from_directory(str(tfds_data.directory(work)))
  t0 = time.perf_counter()
  rows = builder.as_dataset(split=tfds_data.SPLIT, shuffle_files=False).as_numpy_iterator()
  decoded = {int(r["user"]): r for r in rows}
  t1 = time.perf_counter()
  parsed = tfds_data.read_users(builder)
  t2 = time.perf_counter()
  for u, r in decoded.items():
    assert r["user_id"].decode() == parsed["user_id"][u] and bool(r["validation"]) == parsed["validation"][u]
    for field in ("items", "timestamps", "ratings"):
      np.testing.assert_array_equal(r[field], parsed[field][u])
  print(f"{len(decoded)} users, {sum(len(r['items']) for r in decoded.values())} interactions: TFDS decoding "
        f"{t1 - t0:.1f} s, read_users {t2 - t1:.1f} s ({(t1 - t0) / (t2 - t1):.1f}x faster), equal")


if __name__ == "__main__":
  main()
