"""Jitted beam search over the model's key/value cache, optionally constrained to valid item IDs.

The constraint is a prefix trie over the tokenised item IDs (each followed by EOS) stored as arrays, so it
runs inside the jitted loop:
  * `child_col[node, j]`, `child_node[node, j]`: the node's j-th child -- the column of its token in the
    trie's alphabet and the node it leads to (-1: none), j up to the widest node's children. (Not a dense
    [nodes, alphabet] table: with one piece per item that is ~25k nodes x 12k tokens, 1.2 GB on Beauty.)
  * `item_path[item, d]`: the node reached after the item's d-th token (padding: a dummy node);
  * `leaves_under[node]`: how many items lie below a node.
Per example, either a list of candidates (ranking: count the candidates below each node) or a list
of excluded items (retrieval: the user's history; subtract them from `leaves_under`) marks the
nodes that still lead to an allowed item; beams never leave them. Both cost O(list × depth).

A token that is the only continuation the trie allows (the EOS closing an ID that no other ID
extends, the one code of a single-item cluster) carries no choice and is not scored: an item's score
is the log-likelihood of its tokens at the steps where the trie offers a choice. So a model trained
to continue with further items after an ID (`TaskConfig(next_items=k)`) is not charged for the EOS
it did not learn to put there.

With the constraint on, the output projection is computed only for the trie's alphabet (the ID
digits, "▁I" and EOS: 12 columns instead of 8,192) and the softmax is taken over that alphabet;
`score_items` gives the same restricted log-likelihood by teacher forcing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recalign.models.model import EncoderDecoderModel

EOS = 1
NEG = -1e9


@dataclasses.dataclass
class ItemTrie:
  alphabet: np.ndarray    # [K] vocabulary ids, EOS included
  child_col: np.ndarray   # [nodes, D] int32 alphabet column of each child's token, ascending (-1: none)
  child_node: np.ndarray  # [nodes, D] int32 the child node (-1: none)
  item_path: np.ndarray   # [items, depth] int32 node after each token (padded with `nodes`)
  leaf_item: np.ndarray   # [nodes] int32 item at a leaf, else -1
  leaves_under: np.ndarray  # [nodes] int32 number of items below each node
  depth: int              # max tokens of an ID, EOS included

  @property
  def forced(self) -> np.ndarray:
    """[nodes] bool: the node has one child, so the token after it is not a choice (not scored)."""
    return (self.child_node >= 0).sum(1) == 1

  @property
  def next_node(self) -> np.ndarray:
    """[nodes, K] the child reached by each alphabet token (-1: none), dense: for inspecting small tries."""
    dense = np.full((len(self.child_node), len(self.alphabet)), -1, np.int32)
    rows, slots = np.nonzero(self.child_node >= 0)
    dense[rows, self.child_col[rows, slots]] = self.child_node[rows, slots]
    return dense

  @classmethod
  def build(cls, token_seqs: Sequence[Sequence[int]], eos: int = EOS) -> "ItemTrie":
    seqs = [list(s) + [eos] for s in token_seqs]
    alphabet = np.array(sorted({t for s in seqs for t in s}), np.int32)
    col = {int(t): k for k, t in enumerate(alphabet)}
    depth = max(len(s) for s in seqs)
    children: list[dict[int, int]] = [{}]
    paths = np.full((len(seqs), depth), -1, np.int32)
    leaf = {}
    for i, s in enumerate(seqs):
      node = 0
      for d, t in enumerate(s):
        nxt = children[node].get(col[t])
        if nxt is None:
          nxt = len(children)
          children[node][col[t]] = nxt
          children.append({})
        node = nxt
        paths[i, d] = node
      if node in leaf:
        raise ValueError(f"items {leaf[node]} and {i} have the same token sequence")
      leaf[node] = i
    paths[paths < 0] = len(children)  # the dummy node: absorbs padding in scatter-adds
    width = max(len(ch) for ch in children)
    child_col, child_node = np.full((2, len(children), width), -1, np.int32)
    for n, ch in enumerate(children):
      for j, k in enumerate(sorted(ch)):   # by column: beams tie-break as over the whole alphabet
        child_col[n, j], child_node[n, j] = k, ch[k]
    leaf_item = np.full(len(children), -1, np.int32)
    for n, i in leaf.items():
      leaf_item[n] = i
    leaves_under = np.bincount(paths.reshape(-1), minlength=len(children) + 1)[:-1].astype(np.int32)
    leaves_under[0] = len(seqs)
    return cls(alphabet, child_col, child_node, paths, leaf_item, leaves_under, depth)

  @classmethod
  def for_items(cls, vocab, item_ids: Sequence[str]) -> "ItemTrie":
    return cls.build([vocab.encode(i) for i in item_ids])

  def forced_tokens(self, items: np.ndarray) -> np.ndarray:
    """[..., depth] bool: which tokens of each item's ID (EOS included) the trie forces."""
    before = np.concatenate([np.zeros(self.item_path.shape[:1] + (1,), np.int32), self.item_path[:, :-1]], 1)
    forced = np.append(self.forced, False)[np.minimum(before, len(self.forced))]   # padding: not forced
    return forced[np.asarray(items)]

  @property
  def num_items(self) -> int:
    return len(self.item_path)


def _count_below(item_path: jnp.ndarray, num_nodes: int, items: jnp.ndarray) -> jnp.ndarray:
  """[b, nodes]: how many of each row's items (-1 = padding) lie below each node."""
  b = items.shape[0]
  paths = jnp.where(items[..., None] >= 0, item_path[jnp.maximum(items, 0)], num_nodes)   # [b, n, depth]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], paths.shape)
  return jnp.zeros((b, num_nodes + 1), jnp.int32).at[rows, paths].add(1)[:, :num_nodes]


def allowed_nodes(item_path, leaves_under, candidates=None, excluded=None) -> jnp.ndarray:
  """[b, nodes] bool: nodes below which at least one allowed item remains (the root always)."""
  n = leaves_under.shape[0]
  if candidates is not None:
    ok = _count_below(item_path, n, candidates) > 0
  else:
    ok = (leaves_under[None] - _count_below(item_path, n, excluded)) > 0
  return ok.at[:, 0].set(True)


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "depth", "full_softmax"))
def _constrained(model: EncoderDecoderModel, params, encoder_tokens, alphabet, child_col, child_node, item_path,
                 leaf_item, leaves_under, candidates, excluded, *, beam_size: int, depth: int,
                 full_softmax: bool):
  forced = (child_node >= 0).sum(1) == 1                                       # [nodes]
  B, W, K, D = encoder_tokens.shape[0], beam_size, alphabet.shape[0], child_node.shape[1]
  node_ok = allowed_nodes(item_path, leaves_under, candidates, excluded)     # [B, nodes]
  encoded = model.encode(params, encoder_tokens)
  cache = model.init_cache(B, depth, encoder_tokens.shape[1], W)
  eos_col = jnp.argmax(alphabet == EOS)

  def step_logp(cache, token, first):
    logits, cache = model.decode_step(params, cache, encoded, encoder_tokens, token, depth,
                                      output_tokens=None if full_softmax else alphabet,
                                      cross_from_cache=not first)
    logp = jax.nn.log_softmax(logits, axis=-1)
    if full_softmax:
      logp = logp[:, alphabet]
    return logp.reshape(B, W, K), cache

  def expand(carry, logp):
    node, score, done, tokens, t = carry
    child, cols = child_node[node], child_col[node]                            # [B, W, D]
    valid = (child >= 0) & jnp.take_along_axis(node_ok, jnp.maximum(child, 0).reshape(B, -1), 1
                                               ).reshape(B, W, D)
    logp = jnp.take_along_axis(logp, jnp.maximum(cols, 0), 2)                   # [B, W, D]: the children's
    logp = jnp.where(forced[node][..., None], 0.0, logp)     # a forced token is no choice: not scored
    cand = jnp.where(valid, score[..., None] + logp, NEG)
    # A finished beam continues only as itself (one candidate, score unchanged).
    stay = jnp.where(jnp.arange(D) == 0, score[..., None], NEG)
    cand = jnp.where(done[..., None], stay, cand).reshape(B, W * D)
    top, idx = jax.lax.top_k(cand, W)
    beam = idx // D
    col = jnp.take_along_axis(cols.reshape(B, W * D), idx, 1)
    g = lambda x: jnp.take_along_axis(x, beam, 1)  # noqa: E731
    prev_node, prev_done = g(node), g(done)
    alive = top > NEG / 2            # fewer valid continuations than beams: the rest are dead
    new_node = jnp.where(prev_done, prev_node, jnp.take_along_axis(child.reshape(B, W * D), idx, 1))
    new_node = jnp.where(alive, new_node, 0)
    tok = jnp.where(prev_done | ~alive, 0, alphabet[jnp.maximum(col, 0)])
    new_done = prev_done | (col == eos_col) | ~alive
    tokens = jnp.take_along_axis(tokens, beam[..., None], 1).at[:, :, t].set(tok)
    return (new_node, top, new_done, tokens, t + 1), beam

  def reorder(cache, beam):
    flat = (beam + jnp.arange(B)[:, None] * W).reshape(-1)
    return jax.tree_util.tree_map(lambda x: x[flat] if x.ndim and x.shape[0] == B * W else x, cache)

  # Only beam 0 is alive at the start, so the first expansion yields W distinct children.
  score0 = jnp.where(jnp.arange(W) == 0, 0.0, NEG) * jnp.ones((B, 1))
  carry = (jnp.zeros((B, W), jnp.int32), score0, jnp.zeros((B, W), bool),
           jnp.zeros((B, W, depth), jnp.int32), 0)
  logp, cache = step_logp(cache, jnp.zeros((B * W,), jnp.int32), True)
  carry, beam = expand(carry, logp)
  cache = reorder(cache, beam)

  def body(i, state):
    carry, cache = state
    token = carry[3][:, :, i - 1].reshape(-1)
    logp, cache = step_logp(cache, token, False)
    carry, beam = expand(carry, logp)
    return carry, reorder(cache, beam)

  carry, _ = jax.lax.fori_loop(1, depth, body, (carry, cache))
  node, score, done, tokens, _ = carry
  ok = done & (score > NEG / 2)
  return jnp.where(ok, leaf_item[node], -1), jnp.where(ok, score, NEG), tokens


def _pad_lists(lists, width_multiple: int = 32) -> np.ndarray:
  width = max(1, max((len(x) for x in lists), default=1))
  width = -(-width // width_multiple) * width_multiple   # few distinct shapes: few compilations
  out = np.full((len(lists), width), -1, np.int32)
  for r, x in enumerate(lists):
    out[r, :len(x)] = x
  return out


def beam_search_items(model: EncoderDecoderModel, params, encoder_tokens, trie: ItemTrie, *,
                      beam_size: int = 20, candidates=None, exclude=None,
                      full_softmax: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Top `beam_size` items per example, best first: (item indices [b, W] (-1: none), scores [b, W]).

  Each example may be restricted to `candidates` (a list of item indices per example, e.g. the 100
  ranking candidates) or to the catalogue minus `exclude` (e.g. the user's history); default: the
  whole catalogue. Scores are log-likelihoods under the softmax over the trie's alphabet (or the
  full vocabulary with `full_softmax`).
  """
  b = encoder_tokens.shape[0]
  if candidates is not None and exclude is not None:
    raise ValueError("give candidates or exclude, not both")
  cand = None if candidates is None else jnp.asarray(_pad_lists(candidates))
  if exclude is not None:  # an item excluded twice must be subtracted once
    exclude = [np.unique(np.asarray(x, np.int64)) for x in exclude]
  excl = jnp.asarray(_pad_lists(exclude if exclude is not None else [[]] * b)) if candidates is None else None
  items, scores, _ = _constrained(model, params, jnp.asarray(encoder_tokens), jnp.asarray(trie.alphabet),
                                  jnp.asarray(trie.child_col), jnp.asarray(trie.child_node),
                                  jnp.asarray(trie.item_path),
                                  jnp.asarray(trie.leaf_item), jnp.asarray(trie.leaves_under), cand, excl,
                                  beam_size=beam_size, depth=trie.depth, full_softmax=full_softmax)
  return np.asarray(items), np.asarray(scores)


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "max_length"))
def beam_search(model: EncoderDecoderModel, params, encoder_tokens, *, beam_size: int = 4,
                max_length: int = 32):
  """Unconstrained beam search over the full vocabulary: (tokens [b, W, max_length], scores [b, W]).

  A beam ends at EOS (kept in `tokens`, followed by 0s)."""
  V = model.config.vocab_size
  B, W = encoder_tokens.shape[0], beam_size
  encoded = model.encode(params, encoder_tokens)
  cache = model.init_cache(B, max_length, encoder_tokens.shape[1], W)

  def step(i, state):
    score, done, tokens, cache = state
    token = jnp.where(i == 0, 0, tokens[:, :, jnp.maximum(i - 1, 0)]).reshape(-1)
    logits, cache = jax.lax.cond(
        i == 0,
        lambda c: model.decode_step(params, c, encoded, encoder_tokens, token, max_length),
        lambda c: model.decode_step(params, c, encoded, encoder_tokens, token, max_length,
                                    cross_from_cache=True), cache)
    logp = jax.nn.log_softmax(logits, -1).reshape(B, W, V)
    cand = jnp.where(done[..., None], jnp.where(jnp.arange(V) == 0, score[..., None], NEG),
                     score[..., None] + logp).reshape(B, W * V)
    top, idx = jax.lax.top_k(cand, W)
    beam, tok = idx // V, idx % V
    prev_done = jnp.take_along_axis(done, beam, 1)
    tok = jnp.where(prev_done, 0, tok)
    tokens = jnp.take_along_axis(tokens, beam[..., None], 1).at[:, :, i].set(tok)
    flat = (beam + jnp.arange(B)[:, None] * W).reshape(-1)
    cache = jax.tree_util.tree_map(lambda x: x[flat] if x.ndim and x.shape[0] == B * W else x, cache)
    return top, prev_done | (tok == EOS), tokens, cache

  score0 = jnp.where(jnp.arange(W) == 0, 0.0, NEG) * jnp.ones((B, 1))
  state = (score0, jnp.zeros((B, W), bool), jnp.zeros((B, W, max_length), jnp.int32), cache)
  score, done, tokens, _ = jax.lax.fori_loop(0, max_length, step, state)
  return tokens, score


@functools.partial(jax.jit, static_argnames=("model", "restrict"))
def _score(model, params, encoder_tokens, target_tokens, alphabet, weights, *, restrict: bool):
  """Log-likelihood [b, c] of c target rows per example (token t counted `weights[..., t]` times),
  each prompt encoded once."""
  b, c, depth = target_tokens.shape
  flat = target_tokens.reshape(b * c, depth)
  encoded = model.encode(params, encoder_tokens)
  logits = model.decode_logits(params, encoded, encoder_tokens, flat, output_tokens=alphabet if restrict else None)
  logp = jax.nn.log_softmax(logits, -1)
  col = jnp.argmax(flat[..., None] == alphabet, -1) if restrict else flat
  tok = jnp.take_along_axis(logp, col[..., None], -1)[..., 0]
  return jnp.sum(tok * (flat > 0) * weights.reshape(b * c, depth), -1).reshape(b, c)


def score_items(model: EncoderDecoderModel, params, encoder_tokens: np.ndarray, items: np.ndarray,
                trie: ItemTrie, vocab, item_ids: Sequence[str], *, restrict: bool = True) -> np.ndarray:
  """Teacher-forced log-likelihood of each candidate item [b, c] for each example (same softmax as
  `beam_search_items` when `restrict`; tokens the trie forces are not scored, as there). Each prompt is
  encoded once for all its candidates."""
  b, c = items.shape
  tgt = np.zeros((b, c, trie.depth), np.int32)
  for r, i in enumerate(items.reshape(-1)):
    toks = vocab.encode(item_ids[int(i)]) + [EOS]
    tgt[r // c, r % c, :len(toks)] = toks
  weights = (~trie.forced_tokens(items)).astype(np.float32)
  out = _score(model, params, jnp.asarray(encoder_tokens), jnp.asarray(tgt), jnp.asarray(trie.alphabet),
               jnp.asarray(weights), restrict=restrict)
  return np.asarray(out)


def score_targets(model: EncoderDecoderModel, params, encoder_tokens: np.ndarray,
                  targets: Sequence[Sequence[Sequence[int]]], *, width_multiple: int = 8) -> np.ndarray:
  """Teacher-forced log-likelihood [b, c] (full softmax) of c token sequences per example (EOS added):
  e.g. the candidate answers of a multiple-choice task. Each prompt is encoded once."""
  b, c = len(targets), max(len(t) for t in targets)
  depth = max(len(s) for t in targets for s in t) + 1
  depth = -(-depth // width_multiple) * width_multiple
  tgt = np.zeros((b, c, depth), np.int32)
  for i, rows in enumerate(targets):
    for j, toks in enumerate(rows):
      tgt[i, j, :len(toks) + 1] = list(toks) + [EOS]
  out = np.asarray(_score(model, params, jnp.asarray(encoder_tokens), jnp.asarray(tgt), jnp.zeros([1], jnp.int32),
                          jnp.ones(tgt.shape, jnp.float32), restrict=False))
  return np.where(tgt[..., 0] > 0, out, -np.inf)   # padding rows of examples with fewer candidates


def generate(model: EncoderDecoderModel, params, encoder_tokens, *, max_length: int, beam_size: int = 1) -> np.ndarray:
  """The best decode of each prompt [b, max_length] (greedy with beam_size=1), EOS then 0s."""
  tokens, _ = beam_search(model, params, encoder_tokens, beam_size=beam_size, max_length=max_length)
  return np.asarray(tokens)[:, 0]


def decode_texts(vocab, tokens: np.ndarray) -> list[str]:
  """Token rows (as `generate` returns them) -> text, up to the first EOS."""
  out = []
  for row in np.asarray(tokens).tolist():
    row = row[:row.index(EOS)] if EOS in row else row
    out.append(vocab.decode([t for t in row if t > 0]))
  return out
