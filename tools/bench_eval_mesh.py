"""Evaluation over a mesh: users/s of `recalign eval` (retrieval, beam 20, full catalogue) on 1, 2 and 8
simulated CPU devices -- the same cores in every case, so the point is equal results and no regression.

    python tools/bench_eval_mesh.py [--users 256] [--size mini] [--devices 1 2 8]

A random `--size` model (exported as a Hugging Face directory) evaluates the same seeded sample of
Beauty test users in one subprocess per device count (XLA's --xla_force_host_platform_device_count),
data-parallel; each times a second pass (the first compiles). Prints users/s side by side, the ratio
to one device, and whether the metrics and ranked lists equal the one-device run. On a GPU / TPU host
the same command with --devices 0 uses the real devices.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def worker(args) -> None:
  import jax
  from recalign import evaluate as E
  from recalign import partitioning
  import recalign.tasks as rt
  rt.register_dataset(args.data)
  task = f"{Path(args.data).name}_retrieval"
  settings = E.EvalSettings(split="test", beam_size=20, batch_size=args.batch, max_examples=args.users,
                            lengths={"inputs": 512, "targets": 32})
  mesh = partitioning.make_mesh(args.model_parallel)
  E.evaluate_checkpoint(args.ckpt, [task], settings, mesh=mesh, output_dir=Path(args.out) / "warm", progress=False)
  t0 = time.perf_counter()
  res = E.evaluate_checkpoint(args.ckpt, [task], settings, mesh=mesh, output_dir=Path(args.out) / "run",
                              progress=False)[task]
  dt = time.perf_counter() - t0
  ranked = [p["ranked"] for p in res.predictions]
  print("RESULT", json.dumps({"devices": jax.device_count(), "users_per_s": len(ranked) / dt, "seconds": dt,
                              "metrics": res.metrics, "ranked": ranked}))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "amazon-beauty"))
  p.add_argument("--work", default="runs/bench_eval_mesh")
  p.add_argument("--users", type=int, default=256)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--size", default="mini")
  p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 8], help="0: the host's real devices")
  p.add_argument("--model-parallel", type=int, default=1)
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--ckpt", help=argparse.SUPPRESS)
  p.add_argument("--out", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return worker(args)
  import jax
  from flax import linen as nn
  from recalign.data.vocab import load_vocabulary
  from recalign.experiments import ensure_prepared
  from recalign.models import checkpoints as ck
  from recalign.models.model import EncoderDecoderModel
  from recalign.models.network import named_config, padded_vocab_size
  work = Path(args.work)
  data_dir = ensure_prepared(Path(args.data), work / "data" / "beauty", "beauty", 5)
  vocab = load_vocabulary(data_dir / "vocab")
  cfg = named_config(args.size, vocab_size=padded_vocab_size(vocab.vocab_size), dropout_rate=0.0)
  params = nn.unbox(EncoderDecoderModel(cfg).init(jax.random.PRNGKey(0)))
  ckpt = work / f"random_{args.size}"
  ck.save_hf(cfg, jax.tree_util.tree_map(lambda x: __import__("numpy").asarray(x), params), ckpt)
  cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")), "unknown CPU")
  rows = {}
  for n in args.devices:
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    if n:
      env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
    with tempfile.TemporaryDirectory() as out:
      proc = subprocess.run([sys.executable, __file__, "--worker", "--data", str(data_dir), "--ckpt", str(ckpt),
                             "--out", out, "--users", str(args.users), "--batch", str(args.batch),
                             "--model-parallel", str(args.model_parallel)],
                            env=env, capture_output=True, text=True)
    if proc.returncode:
      raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
    rows[n] = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
  base = rows[args.devices[0]]
  print(f"{cpu}, {os.cpu_count()} cores; {args.size}, {base['metrics']['examples']} Beauty test users, beam 20, "
        f"batch {args.batch}, model_parallel {args.model_parallel}")
  print(f"{'devices':>8}{'users/s':>10}{'vs first':>10}  same ranked lists and metrics as the first")
  for n, r in rows.items():
    same = r["ranked"] == base["ranked"] and all(abs(r["metrics"][k] - v) < 1e-9 for k, v in base["metrics"].items())
    print(f"{r['devices']:>8}{r['users_per_s']:>10.2f}{r['users_per_s'] / base['users_per_s']:>9.2f}x  {same}")


if __name__ == "__main__":
  main()
