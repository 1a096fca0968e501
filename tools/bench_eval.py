"""Retrieval decoding speed: recalign's jitted constrained beam search vs transformers' generate.

    python tools/bench_eval.py [--size mini] [--users 256] [--hf-users 16]

Both decode the same Beauty test prompts with the same weights (a random T5 of `--size` exported
through `checkpoints.save_hf`), beam 20 over the full catalogue of item IDs:
  * transformers: generate(num_beams=20, num_return_sequences=20, length_penalty=0,
    prefix_allowed_tokens_fn=<trie over the tokenised IDs>);
  * recalign: beam_search_items, with the sliced projection (default) and with the full softmax
    (the same scores as generate, so their top items must agree).
Prints users/s side by side, the speed-up, the agreement of the top-20 lists, and the projected
time of a full test pass over every user.
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
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import linen as nn  # noqa: E402

import recalign.tasks as rt  # noqa: E402
from recalign.data import PreparedData, item_id  # noqa: E402
from recalign.data.vocab import load_vocabulary  # noqa: E402
from recalign.experiments import ensure_prepared  # noqa: E402
from recalign.decoding import ItemTrie, beam_search_items  # noqa: E402
from recalign.evaluate import pad_inputs, task_examples  # noqa: E402
from recalign.models import checkpoints as ck  # noqa: E402
from recalign.models.model import EncoderDecoderModel  # noqa: E402
from recalign.models.network import CONFIGS, padded_vocab_size  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "amazon-beauty"))
  p.add_argument("--size", default="mini")
  p.add_argument("--users", type=int, default=256)
  p.add_argument("--hf-users", type=int, default=16)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--hf-batch", type=int, default=8)
  p.add_argument("--beam", type=int, default=20)
  p.add_argument("--no-sort", action="store_true", help="keep the users' order (random prompt lengths)")
  args = p.parse_args()
  lengths = {"inputs": 512, "targets": 16}
  with tempfile.TemporaryDirectory() as tmp:
    data = PreparedData.load(ensure_prepared(Path(args.data), Path(tmp) / "bench", "bench"))
    vocab = load_vocabulary(Path(tmp) / "bench" / "vocab")
    rt.register_dataset(Path(tmp) / "bench")
    examples = task_examples("bench_retrieval", "test", lengths, args.users)
    if not args.no_sort:  # as `recalign eval` does, for both sides: similar lengths in a batch
      examples.sort(key=lambda e: -len(e["inputs"]))
    cfg = CONFIGS[args.size].replace(vocab_size=padded_vocab_size(vocab.vocab_size), dropout_rate=0.0)
    model = EncoderDecoderModel(cfg)
    params = jax.tree_util.tree_map(np.asarray, nn.unbox(model.init(jax.random.PRNGKey(0))))
    ck.save_hf(cfg, params, Path(tmp) / "hf")
    hf = transformers.T5ForConditionalGeneration.from_pretrained(Path(tmp) / "hf").eval()
  params = jax.tree_util.tree_map(jnp.asarray, params)
  ids = [item_id(k) for k in range(data.num_items)]
  trie = ItemTrie.for_items(vocab, ids)
  print(f"T5 {args.size}, Beauty test prompts, beam {args.beam}, catalogue {len(ids)} items, trie "
        f"{trie.child_node.shape[0]} nodes x {trie.child_node.shape[1]} children ({len(trie.alphabet)} tokens); "
        f"{os.cpu_count()} CPUs, jax "
        f"{jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")

  def run_recalign(exs, full):
    batches = []
    for s in range(0, len(exs), args.batch):
      chunk = exs[s:s + args.batch]
      batches.append((pad_inputs(chunk + [chunk[-1]] * (args.batch - len(chunk))), len(chunk)))
    for enc, _ in batches:   # compile every padded width first (as a long evaluation amortises it)
      beam_search_items(model, params, enc, trie, beam_size=args.beam, full_softmax=full)
    t0, out = time.perf_counter(), []
    for enc, n in batches:
      items, _ = beam_search_items(model, params, enc, trie, beam_size=args.beam, full_softmax=full)
      out.append(items[:n])
    return np.concatenate(out), len(exs) / (time.perf_counter() - t0)

  # transformers: a dict trie for prefix_allowed_tokens_fn
  children: dict[tuple, list[int]] = {}
  for iid in ids:
    toks = vocab.encode(iid) + [1]
    for d in range(len(toks)):
      children.setdefault(tuple(toks[:d]), [])
      if toks[d] not in children[tuple(toks[:d])]:
        children[tuple(toks[:d])].append(toks[d])

  def allowed(batch_id, input_ids):
    return children.get(tuple(input_ids.tolist()[1:]), [0])

  def run_hf(exs):
    out = []
    t0 = time.perf_counter()
    for s in range(0, len(exs), args.hf_batch):
      chunk = exs[s:s + args.hf_batch]
      enc = torch.tensor(pad_inputs(chunk, bucket=1).astype(np.int64))
      with torch.no_grad():
        gen = hf.generate(input_ids=enc, attention_mask=enc > 0, num_beams=args.beam,
                          num_return_sequences=args.beam, max_new_tokens=trie.depth, length_penalty=0.0,
                          prefix_allowed_tokens_fn=allowed, do_sample=False, early_stopping=True)
      for row in gen.reshape(len(chunk), args.beam, -1).tolist():
        out.append([ids.index(vocab.decode([t for t in r if t > 1])) if vocab.decode([t for t in r if t > 1])
                    in set(ids) else -1 for r in row])
    return np.array(out), len(exs) / (time.perf_counter() - t0)

  def encoder_seconds_per_user_recalign(exs):
    enc_fn = jax.jit(model.encode)
    batches = [pad_inputs(exs[s:s + args.batch]) for s in range(0, len(exs) - args.batch + 1, args.batch)]
    for b in batches:  # compile every shape first
      enc_fn(params, b).block_until_ready()
    t0 = time.perf_counter()
    for b in batches:
      enc_fn(params, b).block_until_ready()
    return (time.perf_counter() - t0) / (len(batches) * args.batch)

  def encoder_seconds_per_user_hf(exs):
    t0 = time.perf_counter()
    for s in range(0, len(exs), args.hf_batch):
      enc = torch.tensor(pad_inputs(exs[s:s + args.hf_batch], bucket=1).astype(np.int64))
      with torch.no_grad():
        hf.encoder(input_ids=enc, attention_mask=enc > 0)
    return (time.perf_counter() - t0) / len(exs)

  examples = examples[:args.users]
  ours, ups = run_recalign(examples, full=False)
  full, ups_full = run_recalign(examples, full=True)
  # generate gets an evenly spaced sample of the same users (its speed depends on lengths too)
  hf_idx = np.linspace(0, args.users - 1, args.hf_users).astype(int)
  ref, ups_hf = run_hf([examples[i] for i in hf_idx])
  enc_ours = encoder_seconds_per_user_recalign(examples)
  enc_hf = encoder_seconds_per_user_hf([examples[i] for i in hf_idx])
  dec_ours, dec_hf = 1 / ups - enc_ours, 1 / ups_hf - enc_hf
  top1 = np.mean(full[hf_idx, 0] == ref[:, 0])
  overlap = np.mean([len(set(a) & set(b)) / args.beam for a, b in zip(full[hf_idx], ref)])
  print(f"{'':<34}{'users/s':>10}{'vs generate':>13}{'full test pass':>16}")
  for name, u in (("recalign (sliced projection)", ups), ("recalign (full softmax)", ups_full),
                  ("transformers generate", ups_hf)):
    print(f"{name:<34}{u:>10.2f}{u / ups_hf:>12.1f}x{data.num_users / u / 60:>13.1f} min")
  print(f"encoder share of the time: recalign {enc_ours * ups:.0%}, generate {enc_hf * ups_hf:.0%}; "
        f"decoding alone: recalign {1 / dec_ours:.1f} users/s vs generate {1 / dec_hf:.1f} users/s "
        f"= {dec_hf / dec_ours:.1f}x")
  print(f"full-softmax recalign vs generate on {len(ref)} users: top-1 agreement {top1:.2f}, "
        f"top-{args.beam} overlap {overlap:.2f}")


if __name__ == "__main__":
  main()
