"""XLA CPU settings side by side: one jitted training step (forward + backward + Adafactor) of a T5 on a
fixed padded batch, timed in a fresh process per setting (XLA_FLAGS are read at start-up).

    python tools/bench_xla_flags.py [--size small] [--batch 16] [--lengths 512 128] [--steps 3]

Settings: XLA's defaults, oneDNN matmuls (--xla_cpu_use_onednn), 512-bit vectors for the fused
element-wise code (--xla_cpu_prefer_vector_width=512), XNNPACK, bfloat16 compute, and combinations;
and PyTorch (transformers T5, its Adafactor) on the *same* padded batch, float32 and bfloat16 autocast,
so that the frameworks are compared on equal work (tools/bench_train.py lets PyTorch pad to the
longest example of each batch, which is less work than XLA's fixed shapes).
Prints seconds per step and the speed-up over the default, with the CPU model and the model FLOPs
per second (6 x parameters x tokens + attention, an estimate).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SETTINGS = {
    "default": ("", "float32"),
    "onednn": ("--xla_cpu_use_onednn=true", "float32"),
    "vector512": ("--xla_cpu_prefer_vector_width=512", "float32"),
    "xnnpack": ("--xla_cpu_use_xnnpack=true", "float32"),
    "bf16": ("", "bfloat16"),
    "onednn+bf16": ("--xla_cpu_use_onednn=true", "bfloat16"),
    "vector512+bf16": ("--xla_cpu_prefer_vector_width=512", "bfloat16"),
    "torch": ("torch", "float32"),
    "torch+bf16": ("torch", "bfloat16"),
}

TORCH_CHILD = r'''
import json, sys, time
import numpy as np, torch, transformers
from transformers.optimization import Adafactor
from recalign.models import checkpoints as ck
from recalign.models.network import CONFIGS
size, dtype = sys.argv[1], sys.argv[6]
batch, li, lt, steps = (int(x) for x in sys.argv[2:6])
torch.set_num_threads(2)
hf = ck.config_to_hf(CONFIGS[size].replace(vocab_size=8192, dropout_rate=0.0))
model = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf))
opt = Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=True, warmup_init=False)
rng = np.random.default_rng(0)
enc = torch.tensor(rng.integers(3, 8000, (batch, li)), dtype=torch.long)
tgt = torch.tensor(rng.integers(3, 8000, (batch, lt)), dtype=torch.long)
def step():
  with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
    loss = model(input_ids=enc, labels=tgt).loss
  loss.backward(); opt.step(); opt.zero_grad()
  return loss
step()
t = time.perf_counter()
for _ in range(steps):
  loss = step()
print("RESULT", json.dumps({"s_per_step": (time.perf_counter() - t) / steps, "loss": float(loss)}))
'''

CHILD = r'''
import json, sys, time
import jax, jax.numpy as jnp, numpy as np, optax
from flax import linen as nn
from recalign import trainer
from recalign.models.model import EncoderDecoderModel
from recalign.models.network import CONFIGS
size, dtype = sys.argv[1], sys.argv[6]
batch, li, lt, steps = (int(x) for x in sys.argv[2:6])
cfg = CONFIGS[size].replace(vocab_size=8192, dtype=dtype, dropout_rate=0.0)
model = EncoderDecoderModel(cfg)
params = jax.tree_util.tree_map(jnp.asarray, nn.unbox(model.init(jax.random.PRNGKey(0))))
tx = trainer.make_optimizer(trainer.learning_rate_schedule(1e-3, 0), name="adafactor")
opt = tx.init(params)
rng = np.random.default_rng(0)
tgt = rng.integers(3, 8000, (batch, lt)).astype(np.int32)
b = {"encoder_input_tokens": rng.integers(3, 8000, (batch, li)).astype(np.int32), "decoder_target_tokens": tgt,
     "decoder_input_tokens": np.pad(tgt, ((0, 0), (1, 0)))[:, :-1]}
@jax.jit
def step(params, opt, batch):
  (_, m), g = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch)
  upd, opt = tx.update(g, opt, params)
  return optax.apply_updates(params, upd), opt, m["loss"]
params, opt, loss = step(params, opt, b); loss.block_until_ready()
t = time.perf_counter()
for _ in range(steps):
  params, opt, loss = step(params, opt, b)
loss.block_until_ready()
print("RESULT", json.dumps({"s_per_step": (time.perf_counter() - t) / steps, "loss": float(loss)}))
'''


def model_flops(size: str, batch: int, li: int, lt: int) -> float:
  """Training FLOPs of one step: 6 x parameters x tokens for the layers, plus attention scores."""
  from recalign.models.network import CONFIGS
  c = CONFIGS[size].replace(vocab_size=8192)
  d, h, m = c.emb_dim, c.num_heads * c.head_dim, c.mlp_dim * len(c.mlp_activations) + c.mlp_dim
  enc = c.num_encoder_layers * (4 * d * h + d * m)
  dec = c.num_decoder_layers * (8 * d * h + d * m)
  attn = c.num_encoder_layers * li * li * h * 2 + c.num_decoder_layers * (lt * lt + lt * li) * h * 2
  return 6 * batch * (li * enc + lt * (dec + d * c.vocab_size)) + 3 * batch * attn


def cpu_model() -> str:
  for line in Path("/proc/cpuinfo").read_text().splitlines():
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return "unknown CPU"


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", default="small")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--lengths", type=int, nargs=2, default=[512, 128])
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
  args = p.parse_args()
  print(f"T5 {args.size}, batch {args.batch} x {args.lengths[0]}/{args.lengths[1]} padded, {os.cpu_count()} CPUs "
        f"({cpu_model()})", flush=True)
  results = {}
  for name in args.settings:
    flags, dtype = SETTINGS[name]
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(), TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=str(REPO))
    child, flags = (TORCH_CHILD, "") if flags == "torch" else (CHILD, flags)
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    out = subprocess.run([sys.executable, "-c", child, args.size, str(args.batch), *map(str, args.lengths),
                          str(args.steps), dtype], env=env, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
      print(f"{name:<16} failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}", flush=True)
      continue
    results[name] = json.loads(line[0][7:])
    base = results.get("default", results[name])["s_per_step"]
    flops = model_flops(args.size, args.batch, *args.lengths) / results[name]["s_per_step"] / 1e9
    print(f"{name:<16} {results[name]['s_per_step']:7.3f} s/step  {base / results[name]['s_per_step']:5.2f}x  "
          f"{flops:6.0f} GFLOP/s  loss {results[name]['loss']:.4f}  "
          f"{'PyTorch' if name.startswith('torch') else f'XLA_FLAGS={flags!r}'} dtype={dtype}", flush=True)


if __name__ == "__main__":
  main()
