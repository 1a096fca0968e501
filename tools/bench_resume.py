"""What a resumed run spends reaching its step's batches: replaying the input stream vs restoring its state.

    python tools/bench_resume.py --model-dir runs/study29/re_mlm/seed1 --step 1000

Reads a run's config.gin (its data, mixture, lengths, batch size and seed) and draws `--step` batches -- what
a resume without a saved input state does (a killed run, or CheckpointConfig.input_state = 'never') -- then
saves the input stream's state there, as a preempted run does, and restores it into a fresh stream. Checks
that both streams then give the same batch, and prints replay, save and restore times side by side, their
ratio and the state's size, with the CPU (lscpu). Writes nothing into the run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model-dir", required=True, help="a run whose config.gin says what it trains on")
  p.add_argument("--step", type=int, default=1000, help="the step the run resumes at")
  args = p.parse_args()

  from recalign.console import quiet_startup
  quiet_startup()
  import gin
  import numpy as np

  import curves
  from recalign import cli, trainer
  from recalign.train import register_tasks
  cli.parse_gin([str(Path(args.model_dir) / "config.gin")], [], [])
  data, model = trainer.DatasetConfig(), trainer.ModelConfig()
  seed = gin.query_parameter("%RANDOM_SEED")
  task, _ = register_tasks(data, model)

  def stream():
    return trainer.InputBatches(task, data.task_feature_lengths, data.batch_size, seed=seed, pack=data.pack)

  replayed = stream()
  t = time.perf_counter()
  for _ in range(args.step):
    next(replayed)
  replay_s = time.perf_counter() - t
  with tempfile.TemporaryDirectory() as d:
    t = time.perf_counter()
    replayed.save(d, args.step)
    save_s = time.perf_counter() - t
    size = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
    restored = stream()
    t = time.perf_counter()
    how = restored.resume(d, args.step)
    restore_s = time.perf_counter() - t
  a, b = next(replayed), next(restored)
  same = all(np.array_equal(a[k], b[k]) for k in a)
  print(f"{data.mixture_or_task_name}, batch {data.batch_size}, lengths {dict(data.task_feature_lengths)}, "
        f"seed {seed}, resumed at step {args.step} ({curves.cpu_model()}):")
  print(f"  replaying the stream   {replay_s:8.1f} s  ({replay_s / args.step * 1e3:.0f} ms a step)")
  print(f"  saving its state       {save_s:8.1f} s  ({size / 1e6:.1f} MB)")
  print(f"  restoring its state    {restore_s:8.1f} s  ({how})")
  print(f"  restore / replay: {restore_s / replay_s:.3f}; the next batch {'the same' if same else 'DIFFERS'}")
  if not same:
    sys.exit(1)


if __name__ == "__main__":
  main()
