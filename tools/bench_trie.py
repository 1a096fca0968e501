r"""Constrained beam search speed and trie size per ID scheme, side by side in one run.

    python tools/bench_trie.py collaborative=runs/converge/data/beauty hybrid=runs/cw_hybrid/data/beauty \
        [--users 64] [--beam 20] [--input-length 96]

Each SCHEME=DIR names a prepared folder holding ids/<scheme>.json and its vocabulary. The same random `mini`
T5 shape and the same random encoder inputs for every scheme (decoding speed depends on shapes, not on
what the model learnt): the trie (nodes x widest node, alphabet), its bytes against a dense
[nodes, alphabet] table, and users/s over the full catalogue, with the ratio to the first scheme. Name the
CPU (`lscpu`) with the numbers.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import linen as nn

from recalign.data.ids import id_pieces, load_ids
from recalign.data.vocab import extend, load_vocabulary
from recalign.decoding import ItemTrie, beam_search_items
from recalign.models.model import EncoderDecoderModel
from recalign.models.network import CONFIGS, padded_vocab_size


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("runs", nargs="+", help="SCHEME=PREPARED_DIR")
  p.add_argument("--users", type=int, default=64)
  p.add_argument("--beam", type=int, default=20)
  p.add_argument("--input-length", type=int, default=96)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  enc = np.random.default_rng(0).integers(3, 1000, (args.users, args.input_length)).astype(np.int32)
  first = None
  for run in args.runs:
    scheme, _, path = run.partition("=")
    ids = load_ids(path, scheme)
    vocab = extend(load_vocabulary(f"{path}/vocab"), id_pieces(ids))
    trie = ItemTrie.for_items(vocab, ids)
    model = EncoderDecoderModel(CONFIGS["mini"].replace(vocab_size=padded_vocab_size(vocab.vocab_size)))
    params = nn.unbox(model.init(jax.random.PRNGKey(0)))
    beam_search_items(model, params, enc, trie, beam_size=args.beam)      # compiles
    t0 = time.perf_counter()
    for _ in range(args.repeats):
      beam_search_items(model, params, enc, trie, beam_size=args.beam)
    speed = args.users * args.repeats / (time.perf_counter() - t0)
    first = first or speed
    nodes, width = trie.child_node.shape
    print(f"{scheme:14s} {len(ids)} items, trie {nodes} nodes x {width} children, alphabet {len(trie.alphabet)}, "
          f"depth {trie.depth}: {2 * trie.child_node.nbytes / 2**20:.1f} MiB "
          f"(dense {nodes * len(trie.alphabet) * 4 / 2**20:.0f}"
          f" MiB); {speed:.1f} users/s ({speed / first:.2f}x the first)", flush=True)


if __name__ == "__main__":
  main()
