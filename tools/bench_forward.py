"""Forward+backward time of recalign (jax, jit) vs transformers (PyTorch) on the same T5 weights.

    python tools/bench_forward.py [--size small] [--batch 8] [--inputs 512] [--targets 32] [--steps 5]

Builds a random HF T5ForConditionalGeneration of the given FLAN-T5 size, imports it into recalign
through `checkpoints.load_hf`, checks that both give the same loss, then times a full
forward+backward pass of each (after warm-up) in one run and prints them side by side.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from recalign.models import checkpoints as ck  # noqa: E402
from recalign.models import network as nw  # noqa: E402
from recalign.models.model import EncoderDecoderModel, shift_right  # noqa: E402


def timeit(fn, steps: int) -> float:
  fn()  # warm-up (compilation for jax)
  fn()
  t0 = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - t0) / steps


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--size", default="small", choices=sorted(nw.CONFIGS))
  p.add_argument("--vocab", type=int, default=8100, help="the project's vocabulary size")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--inputs", type=int, default=512)
  p.add_argument("--targets", type=int, default=32)
  p.add_argument("--steps", type=int, default=5)
  args = p.parse_args()

  cfg = nw.CONFIGS[args.size].replace(vocab_size=args.vocab, dropout_rate=0.0)
  hf_cfg = transformers.T5Config(**{k: v for k, v in ck.config_to_hf(cfg).items()
                                    if k not in ("architectures", "model_type")})
  torch.manual_seed(0)
  hf = transformers.T5ForConditionalGeneration(hf_cfg)
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    cfg, params = ck.load_hf(d)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  model = EncoderDecoderModel(cfg, z_loss=0.0)

  rng = np.random.default_rng(0)
  enc = rng.integers(2, args.vocab, (args.batch, args.inputs))
  tgt = rng.integers(2, args.vocab, (args.batch, args.targets))
  batch = {"encoder_input_tokens": jnp.asarray(enc), "decoder_target_tokens": jnp.asarray(tgt),
           "decoder_input_tokens": shift_right(jnp.asarray(tgt))}
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b: model.loss_fn(p, b)[0]))

  def jax_step():
    loss, grads = grad_fn(params, batch)
    jax.block_until_ready(grads)
    return float(loss)

  hf.train()
  hf.config.dropout_rate = 0.0
  for m in hf.modules():
    if isinstance(m, torch.nn.Dropout):
      m.p = 0.0
  t_enc, t_lab = torch.tensor(enc), torch.tensor(tgt)

  def torch_step():
    hf.zero_grad(set_to_none=True)
    out = hf(input_ids=t_enc, labels=t_lab)
    out.loss.backward()
    return float(out.loss.detach())

  l_jax, l_torch = jax_step(), torch_step()
  print(f"T5 {args.size} (vocab {args.vocab}), batch {args.batch} x {args.inputs} inputs / {args.targets} "
        f"targets, {os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  print(f"loss: recalign {l_jax:.5f}  transformers {l_torch:.5f}  (same weights and batch)")
  tj, tt = timeit(jax_step, args.steps), timeit(torch_step, args.steps)
  toks = args.batch * (args.inputs + args.targets)
  print(f"{'':<14}{'s/step':>10}{'tokens/s':>12}")
  print(f"{'recalign':<14}{tj:>10.3f}{toks / tj:>12.0f}")
  print(f"{'transformers':<14}{tt:>10.3f}{toks / tt:>12.0f}")
  print(f"speed-up: {tt / tj:.2f}x")


if __name__ == "__main__":
  main()
