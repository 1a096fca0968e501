"""Where the time of one training step goes on this machine, for a curves recipe (tools/curves.py).

    python tools/profile_step.py --data runs/cw_atomic/data/beauty --recipes compact_collaborative cont_atomic

For each recipe, on the same packed batches: the input pipeline alone (tf.data + first-fit packing),
the encoder's forward pass, the forward pass with the loss, forward + backward, the whole jitted step
(with Adafactor), the output layer alone (decoder states x vocabulary embedding, softmax cross-entropy,
forward + backward), and the pipeline and the step together as the trainer runs them (do the two share
the cores badly?). Prints milliseconds per step, examples / targets per second, the CPU (lscpu) and the
ratio of every recipe's examples/s and targets/s to the first recipe's, side by side in one run.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))


def timed(fn, n: int) -> float:
  """Seconds per call of fn() (after one warm-up call that compiles)."""
  import jax
  jax.block_until_ready(fn())
  t = time.perf_counter()
  for _ in range(n):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / n


def profile(name: str, data_dir: Path, steps: int) -> dict:
  import jax
  import jax.numpy as jnp
  import curves
  import recalign.tasks as rt
  from flax import linen as nn
  from recalign import trainer
  from recalign.models.model import EncoderDecoderModel, compute_loss
  from recalign.models.network import padded_vocab_size
  from recalign.tasks import packing
  r = curves.recipe(name)
  rt.register_dataset(data_dir, config=rt.TaskConfig(**r["data"]), replace=True)
  task = rt.get(f"{data_dir.name}_{r['mixture']}")
  vocab = rt.registry.get_vocabulary(task)
  cfg = curves.network_config(r["size"]).replace(dropout_rate=r["dropout"], dtype=r["dtype"],
                                                 vocab_size=padded_vocab_size(vocab.vocab_size))
  model = EncoderDecoderModel(cfg)
  lengths = r["lengths"]
  batches = trainer.InputBatches(task, lengths, r["batch"], seed=0, pack=True)
  next(batches)                                                   # tf.data start-up
  t = time.perf_counter()
  held = [next(batches) for _ in range(steps)]
  t_input = (time.perf_counter() - t) / steps
  examples = sum(packing.num_examples(b) for b in held) / steps
  targets = sum(int((b["decoder_target_tokens"] > 1).sum()) for b in held) / steps   # no EOS, no padding
  next_items = r["data"].get("next_items", 1)
  items_per_target = targets / max(examples, 1)                   # target tokens per example, without EOS

  sched = trainer.learning_rate_schedule(base=r["lr"], warmup_steps=r["warmup"])
  tx = trainer.make_optimizer(sched, name=r["optimizer"])
  params = nn.unbox(model.init(jax.random.PRNGKey(0)))
  state = {"step": jnp.zeros([], jnp.int32), "params": params, "opt_state": tx.init(params)}
  batch = jax.tree_util.tree_map(jnp.asarray, held[0])
  step = jax.jit(functools.partial(trainer.train_step, model=model, tx=tx, schedule=sched, accum=1,
                                   dropout_key=jax.random.PRNGKey(1)))
  encode = jax.jit(lambda p, b: model.encode(p, b["encoder_input_tokens"]))
  loss = jax.jit(lambda p, b: model.loss_fn(p, b)[0])
  grad = jax.jit(jax.grad(lambda p, b: model.loss_fn(p, b)[0]))
  rows, tlen, d = batch["decoder_target_tokens"].shape + (cfg.emb_dim,)
  h = jax.random.normal(jax.random.PRNGKey(2), (rows, tlen, d), jnp.dtype(cfg.dtype))
  emb = jax.random.normal(jax.random.PRNGKey(3), (cfg.vocab_size, d), jnp.float32)

  def out_layer(h, emb):
    logits = jnp.einsum("btd,vd->btv", h, emb.astype(h.dtype), preferred_element_type=jnp.float32)
    return compute_loss(logits, batch["decoder_target_tokens"])[0]

  out_grad = jax.jit(jax.grad(out_layer, argnums=(0, 1)))
  n = max(3, steps // 2)
  res = {"recipe": name, "lengths": lengths, "batch_rows": r["batch"], "vocab": cfg.vocab_size,
         "examples_per_step": round(examples, 1), "target_tokens_per_step": round(targets, 1),
         "next_items": next_items, "target_tokens_per_example": round(items_per_target, 2),
         "ms": {"input pipeline": 1e3 * t_input,
                "encoder forward": 1e3 * timed(lambda: encode(params, batch), n),
                "forward + loss": 1e3 * timed(lambda: loss(params, batch), n),
                "forward + backward": 1e3 * timed(lambda: grad(params, batch), n),
                "output layer alone (fwd + bwd)": 1e3 * timed(lambda: out_grad(h, emb), n),
                "whole step (+ Adafactor)": 1e3 * timed(lambda: step(state, batch)[1]["loss"], n)}}
  # The trainer's loop: the next batch is produced while the step runs (both on the same 2 cores).
  st = state
  st, m = step(st, batch)
  jax.block_until_ready(m["loss"])
  t = time.perf_counter()
  for _ in range(steps):
    st, m = step(st, jax.tree_util.tree_map(jnp.asarray, next(batches)))
  jax.block_until_ready(m["loss"])
  together = (time.perf_counter() - t) / steps
  res["ms"]["pipeline + step together"] = 1e3 * together
  res["examples_per_s"] = examples / together
  res["target_tokens_per_s"] = targets / together
  return res


def cpu() -> str:
  out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
  model = next((x.split(":", 1)[1].strip() for x in out.splitlines() if x.startswith("Model name")), "?")
  cores = next((x.split(":", 1)[1].strip() for x in out.splitlines() if x.startswith("CPU(s)")), "?")
  return f"{model}, {cores} CPUs"


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", required=True, type=Path, help="a prepared data set with the recipes' ID schemes")
  p.add_argument("--recipes", nargs="+", default=["compact_collaborative"])
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--out", type=Path, help="write the results as JSON")
  args = p.parse_args()
  from recalign.console import quiet_startup
  quiet_startup()
  rows = [profile(name, args.data, args.steps) for name in args.recipes]
  print(f"\nCPU: {cpu()}; ms per training step (batch of packed rows), same batches per recipe")
  stages = list(rows[0]["ms"])
  print(f"{'':34}" + "".join(f"{r['recipe']:>24}" for r in rows))
  for s in stages:
    print(f"{s:34}" + "".join(f"{r['ms'][s]:24.1f}" for r in rows))
  for key, label in (("examples_per_step", "examples per step"), ("target_tokens_per_step", "target tokens per step"),
                     ("examples_per_s", "examples/s"), ("target_tokens_per_s", "target tokens/s (no EOS)")):
    print(f"{label:34}" + "".join(f"{r[key]:24.1f}" for r in rows))
  print(f"{'ratio to ' + rows[0]['recipe'] + ' (targets/s)':34}"
        + "".join(f"{r['target_tokens_per_s'] / rows[0]['target_tokens_per_s']:23.2f}x" for r in rows))
  if args.out:
    args.out.write_text(json.dumps({"cpu": cpu(), "rows": rows}, indent=1))


if __name__ == "__main__":
  main()
