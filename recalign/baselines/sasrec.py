"""SASRec (Kang & McAuley, 2018) in flax, standard settings: 2 self-attention blocks, hidden size
64, one head, maximum length 50, dropout 0.5 (sparse Amazon data), Adam 1e-3, binary cross-entropy
with one uniformly sampled negative per position; evaluation ranks the full catalogue.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from tqdm.auto import tqdm

from recalign import metrics as M
from recalign.baselines import eval_users, targets_and_history, top_k_excluding
from recalign.data.prepare import PreparedData


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
  hidden: int = 64
  blocks: int = 2
  heads: int = 1
  max_len: int = 50
  dropout: float = 0.5
  learning_rate: float = 1e-3
  batch_size: int = 128
  epochs: int = 50
  seed: int = 0


class SASRec(nn.Module):
  num_items: int          # item ids are 1..num_items; 0 pads
  cfg: SASRecConfig

  def setup(self):
    c = self.cfg
    self.item_emb = nn.Embed(self.num_items + 1, c.hidden, embedding_init=nn.initializers.xavier_normal())
    self.pos_emb = nn.Embed(c.max_len, c.hidden)
    self.attn = [nn.MultiHeadDotProductAttention(c.heads, dropout_rate=c.dropout) for _ in range(c.blocks)]
    self.ln_attn = [nn.LayerNorm(epsilon=1e-8) for _ in range(c.blocks)]
    self.ln_ffn = [nn.LayerNorm(epsilon=1e-8) for _ in range(c.blocks)]
    self.ffn = [(nn.Dense(c.hidden), nn.Dense(c.hidden)) for _ in range(c.blocks)]
    self.ln_out = nn.LayerNorm(epsilon=1e-8)
    self.drop = nn.Dropout(c.dropout)

  def __call__(self, seq, train: bool):
    """seq [b, L] (left-padded with 0) -> hidden states [b, L, d]."""
    det = not train
    x = self.item_emb(seq) * (self.cfg.hidden ** 0.5) + self.pos_emb(jnp.arange(seq.shape[1]))[None]
    keep = (seq > 0)[..., None]
    x = self.drop(x, deterministic=det) * keep
    mask = nn.combine_masks(nn.make_causal_mask(seq), nn.make_attention_mask(seq > 0, seq > 0))
    for i in range(self.cfg.blocks):
      q = self.ln_attn[i](x)
      x = q + self.attn[i](q, x, mask=mask, deterministic=det)
      h = self.ln_ffn[i](x)
      d1, d2 = self.ffn[i]
      h = d2(self.drop(nn.relu(d1(h)), deterministic=det))
      x = (x + self.drop(h, deterministic=det)) * keep
    return self.ln_out(x)

  def item_embeddings(self):
    return self.item_emb.embedding


def _left_pad(seqs: list[np.ndarray], length: int) -> np.ndarray:
  out = np.zeros((len(seqs), length), np.int32)
  for r, s in enumerate(seqs):
    s = s[-length:]
    if len(s):
      out[r, -len(s):] = s
  return out


def _negatives(rng, shape, num_items: int, seen: list[np.ndarray]) -> np.ndarray:
  """Uniform items (1-based) that row r's user never interacted with (vectorised rejection)."""
  rows = np.repeat(np.arange(shape[0]), [len(s) for s in seen])
  banned = rows * (num_items + 1) + np.concatenate(seen)
  neg = rng.integers(1, num_items + 1, shape)
  bad = np.isin(np.arange(shape[0])[:, None] * (num_items + 1) + neg, banned)
  while bad.any():
    neg[bad] = rng.integers(1, num_items + 1, int(bad.sum()))
    bad = np.isin(np.arange(shape[0])[:, None] * (num_items + 1) + neg, banned)
  return neg.astype(np.int32)


def train_sasrec(data: PreparedData, cfg: SASRecConfig = SASRecConfig(), progress: bool = True):
  """Trains on the training split (items shifted by +1: 0 pads). Returns (model, params, losses)."""
  model = SASRec(data.num_items, cfg)
  rng = np.random.default_rng(cfg.seed)
  train = [data.train_sequence(u) + 1 for u in range(data.num_users)]
  users = np.array([u for u, s in enumerate(train) if len(s) >= 2])
  inputs = _left_pad([train[u][:-1] for u in users], cfg.max_len)
  positives = _left_pad([train[u][1:] for u in users], cfg.max_len)
  seen = [data.sequences[u] + 1 for u in users]
  params = model.init(jax.random.PRNGKey(cfg.seed), inputs[:2], train=False)["params"]
  tx = optax.adam(cfg.learning_rate, b1=0.9, b2=0.98)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, inp, pos, neg, key):
    def loss_fn(p):
      h = model.apply({"params": p}, inp, train=True, rngs={"dropout": key})
      emb = p["item_emb"]["embedding"]
      lp, ln = (h * emb[pos]).sum(-1), (h * emb[neg]).sum(-1)
      w = (pos > 0).astype(jnp.float32)
      loss = -(jax.nn.log_sigmoid(lp) + jax.nn.log_sigmoid(-ln)) * w
      return loss.sum() / w.sum()
    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  losses = []
  key = jax.random.PRNGKey(cfg.seed + 1)
  for epoch in tqdm(range(cfg.epochs), desc="sasrec", disable=not progress, dynamic_ncols=True):
    order = rng.permutation(len(users))
    total = 0.0
    for s in range(0, len(order), cfg.batch_size):
      b = order[s:s + cfg.batch_size]
      neg = _negatives(rng, positives[b].shape, data.num_items, [seen[r] for r in b])
      key, sub = jax.random.split(key)
      params, opt, loss = step(params, opt, inputs[b], positives[b], neg, sub)
      total += float(loss) * len(b)
    losses.append(total / len(order))
  return model, params, losses


def sasrec_scores(model: SASRec, params, data: PreparedData, split: str, users: np.ndarray,
                  batch_size: int = 1024) -> np.ndarray:
  """[users, items] scores from the last position of the sequence before the held-out item."""
  seqs = _left_pad([data.held_out(int(u), split)[0] + 1 for u in users], model.cfg.max_len)
  emb = params["item_emb"]["embedding"][1:]
  fn = jax.jit(lambda s: model.apply({"params": params}, s, train=False)[:, -1] @ emb.T)
  return np.concatenate([np.asarray(fn(seqs[i:i + batch_size])) for i in range(0, len(seqs), batch_size)])


def evaluate_sasrec(model: SASRec, params, data: PreparedData, split: str = "test",
                    candidates: Optional[np.ndarray] = None, *, exclude_history: bool = False,
                    example_ids: Optional[np.ndarray] = None) -> dict:
  users = eval_users(data, split, example_ids)
  targets, history = targets_and_history(data, split, users)
  scores = sasrec_scores(model, params, data, split, users)
  if candidates is not None:
    return M.ranking_metrics(M.rank_by_scores(np.take_along_axis(scores, candidates, 1), candidates),
                             targets, (1, 5, 10))
  return M.ranking_metrics(top_k_excluding(scores, history if exclude_history else [[]] * len(users), 10),
                           targets, (5, 10))
