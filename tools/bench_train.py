"""Training throughput: recalign (padded, packed) vs transformers PyTorch on the same config and data.

    python tools/bench_train.py [--size small] [--batch 16] [--steps 4]

Data: the ReAT mixture (retrieval + MIM + MLM) on the shared Beauty data, lengths 512/128.
recalign: the trainer's input pipeline and jitted step (Adafactor), with every example padded to
the fixed lengths, with seqio's next-fit packing, and with the trainer's first-fit packing
(several examples per row, same batch shape).
transformers: T5ForConditionalGeneration with transformers' Adafactor, batches of the same
examples padded to the longest in the batch (the usual DataCollatorForSeq2Seq practice).
Reported: useful (non-pad) tokens per second, and ratios against PyTorch.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import recalign.tasks as rt  # noqa: E402
from recalign import trainer  # noqa: E402
from flax import linen as nn  # noqa: E402
from recalign.experiments import ensure_prepared  # noqa: E402
from recalign.models import checkpoints as ck  # noqa: E402
from recalign.models import network as nw  # noqa: E402
from recalign.models.model import EncoderDecoderModel  # noqa: E402
from recalign.tasks import packing  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def next_fit_batches(task, lengths, batch_size):
  """seqio's own packing (EncDecFeatureConverter(pack=True)), for comparison."""
  import seqio
  ds = task.get_dataset(dict(lengths), split="train", shuffle=True, seed=0, num_epochs=None)
  ds = seqio.EncDecFeatureConverter(pack=True)(ds, dict(lengths)).batch(batch_size, drop_remainder=True)
  return ds.as_numpy_iterator()


def run_recalign(task, cfg, lengths, batch_size, steps, pack):
  model = EncoderDecoderModel(cfg)
  params = jax.tree_util.tree_map(jnp.asarray, nn.unbox(model.init(jax.random.PRNGKey(0))))
  tx = trainer.make_optimizer(trainer.learning_rate_schedule(1e-3, 0), name="adafactor")
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch):
    (_, m), g = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, m["loss"]

  it = (next_fit_batches(task, lengths, batch_size) if pack == "next-fit"
        else trainer.InputBatches(task, lengths, batch_size, seed=0, pack=pack == "first-fit"))
  batches = [next(it) for _ in range(steps + 1)]
  params, opt, loss = step(params, opt, batches[0])  # compile
  jax.block_until_ready(loss)
  t0, toks, examples = time.perf_counter(), 0, 0
  for b in batches[1:]:
    params, opt, loss = step(params, opt, b)
    toks += packing.real_tokens(b)
    examples += int(b["decoder_segment_ids"].max(1).sum()) if pack != "none" else len(b["encoder_input_tokens"])
  jax.block_until_ready(loss)
  dt = time.perf_counter() - t0
  return toks / dt, examples / dt, dt / steps


def run_torch(task, cfg, lengths, batch_size, steps):
  hf_cfg = transformers.T5Config(**{k: v for k, v in ck.config_to_hf(cfg).items()
                                    if k not in ("architectures", "model_type")})
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(hf_cfg).train()
  opt = transformers.optimization.Adafactor(model.parameters(), lr=1e-3, relative_step=False,
                                            scale_parameter=True, warmup_init=False)
  ds = task.get_dataset(dict(lengths), split="train", shuffle=True, seed=0, num_epochs=None)
  it = ds.as_numpy_iterator()

  def batch():
    exs = [next(it) for _ in range(batch_size)]
    li, lt = max(len(e["inputs"]) for e in exs), max(len(e["targets"]) for e in exs)
    inp = np.zeros((batch_size, li), np.int64)
    lab = np.full((batch_size, lt), -100, np.int64)
    for i, e in enumerate(exs):
      inp[i, :len(e["inputs"])] = e["inputs"]
      lab[i, :len(e["targets"])] = e["targets"]
    return torch.tensor(inp), torch.tensor(lab)

  batches = [batch() for _ in range(steps + 1)]

  def step(inp, lab):
    opt.zero_grad(set_to_none=True)
    out = model(input_ids=inp, attention_mask=(inp > 0), labels=lab)
    out.loss.backward()
    opt.step()

  step(*batches[0])
  t0, toks = time.perf_counter(), 0
  for inp, lab in batches[1:]:
    step(inp, lab)
    toks += int((inp > 0).sum() + (lab >= 0).sum())
  dt = time.perf_counter() - t0
  return toks / dt, steps * batch_size / dt, dt / steps


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "amazon-beauty"))
  p.add_argument("--size", default="small", choices=sorted(nw.CONFIGS))
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=4)
  args = p.parse_args()
  lengths = {"inputs": 512, "targets": 128}
  with tempfile.TemporaryDirectory() as tmp:
    ensure_prepared(Path(args.data), Path(tmp) / "bench", "bench")
    rt.register_dataset(Path(tmp) / "bench")
    task = rt.get("bench_reat")
    vocab = rt.registry.get_vocabulary(task)
    cfg = nw.CONFIGS[args.size].replace(vocab_size=nw.padded_vocab_size(vocab.vocab_size), dropout_rate=0.0)
    print(f"T5 {args.size}, ReAT on Beauty, batch {args.batch}, lengths {lengths}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    rows = {f"recalign ({pack})": run_recalign(task, cfg, lengths, args.batch, args.steps, pack)
            for pack in ("none", "next-fit", "first-fit")}
    rows["transformers"] = run_torch(task, cfg, lengths, args.batch, args.steps)
  ref = rows["transformers"][0]
  print(f"{'':<24}{'useful tok/s':>14}{'examples/s':>12}{'s/step':>9}{'vs torch':>10}")
  for name, (tps, eps, sps) in rows.items():
    print(f"{name:<24}{tps:>14.0f}{eps:>12.2f}{sps:>9.2f}{tps / ref:>9.2f}x")


if __name__ == "__main__":
  main()
