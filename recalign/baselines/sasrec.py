"""SASRec (Kang & McAuley, 2018) in flax: 2 self-attention blocks, hidden size 64, one head, maximum
length 50, Adam 1e-3, full-catalogue evaluation; two losses:

  * "bce": the original binary cross-entropy with one uniformly sampled negative per position (not in
    the user's training items);
  * "ce": cross-entropy over the whole catalogue at every position (SASRec+ / "SASRec with CE",
    Klenitskiy & Vasilev 2023, Petrov & Macdonald's gSASRec), much stronger on Amazon data;
    "sampled_ce" approximates it with `num_negatives` uniform negatives shared by the batch, for
    catalogues too large for a full softmax.

Training stops early on validation NDCG@10 (`eval_every` epochs, `patience` evaluations without a
gain; the best epoch's parameters are kept). Batches group users of similar length (left padding cut
to the batch's longest sequence, positions counted from the end), so short Amazon histories cost
little.
"""

from __future__ import annotations

import dataclasses
import logging
import time
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

LOSSES = ("bce", "ce", "sampled_ce")


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
  hidden: int = 64
  blocks: int = 2
  heads: int = 1
  max_len: int = 50
  dropout: float = 0.5
  learning_rate: float = 1e-3
  batch_size: int = 128
  epochs: int = 200               # at most; early stopping usually ends sooner
  loss: str = "bce"               # bce | ce | sampled_ce
  num_negatives: int = 1024       # sampled_ce
  eval_every: int = 5             # epochs between validation evaluations (0: never, keep the last epoch)
  patience: int = 4               # evaluations without a better validation NDCG@10 before stopping
  validation_users: Optional[int] = None   # validate on a seeded sample (default: all validation users)
  max_minutes: Optional[float] = None      # wall-clock budget: stop after the epoch that crosses it
  exclude_history: bool = False   # the protocol of the validation metric
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
    """seq [b, L] (left-padded with 0, L <= max_len) -> hidden states [b, L, d]. Positions count back
    from the newest item, which is always at position max_len - 1, whatever L."""
    det = not train
    L = seq.shape[1]
    positions = jnp.arange(self.cfg.max_len - L, self.cfg.max_len)
    x = self.item_emb(seq) * (self.cfg.hidden ** 0.5) + self.pos_emb(positions)[None]
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


def _batches(lengths: np.ndarray, batch_size: int, max_len: int, rng) -> list[tuple[np.ndarray, int]]:
  """Shuffled batches of users of similar length: (row indices, padded length)."""
  bucket = np.minimum(-(-np.minimum(lengths, max_len) // 10) * 10, max_len)
  out = []
  for b in np.unique(bucket):
    rows = rng.permutation(np.flatnonzero(bucket == b))
    out += [(rows[i:i + batch_size], int(b)) for i in range(0, len(rows), batch_size)]
  return [out[i] for i in rng.permutation(len(out))]


def _loss_fn(model: "SASRec", cfg: SASRecConfig):
  def loss_fn(p, inp, pos, neg, key):
    h = model.apply({"params": p}, inp, train=True, rngs={"dropout": key})
    emb = p["item_emb"]["embedding"]
    w = (pos > 0).astype(jnp.float32)
    if cfg.loss == "bce":
      lp, ln = (h * emb[pos]).sum(-1), (h * emb[neg]).sum(-1)
      loss = -(jax.nn.log_sigmoid(lp) + jax.nn.log_sigmoid(-ln))
    elif cfg.loss == "ce":        # softmax over every item (row 0 is padding)
      logits = (h @ emb[1:].T).astype(jnp.float32)
      loss = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, jnp.maximum(pos - 1, 0)[..., None], -1)[..., 0]
    else:                         # sampled softmax: the positive against negatives shared by the batch
      lp = (h * emb[pos]).sum(-1, keepdims=True)
      ln = h @ emb[neg].T
      ln = jnp.where(neg[None, None] == pos[..., None], -1e9, ln)     # a sampled positive is no negative
      loss = jax.nn.logsumexp(jnp.concatenate([lp, ln], -1), -1) - lp[..., 0]
    return (loss * w).sum() / jnp.maximum(w.sum(), 1.0)
  return loss_fn


def train_sasrec(data: PreparedData, cfg: SASRecConfig = SASRecConfig(), progress: bool = True):
  """Trains on the training split (items shifted by +1: 0 pads) with early stopping on validation
  NDCG@10. Returns (model, best params, log: a list of {"epoch", "loss"[, "validation"]})."""
  if cfg.loss not in LOSSES:
    raise ValueError(f"SASRec loss must be one of {LOSSES}, not {cfg.loss!r}")
  model = SASRec(data.num_items, cfg)
  rng = np.random.default_rng(cfg.seed)
  train = [data.train_sequence(u) + 1 for u in range(data.num_users)]
  users = np.array([u for u, s in enumerate(train) if len(s) >= 2])
  inputs = _left_pad([train[u][:-1] for u in users], cfg.max_len)
  positives = _left_pad([train[u][1:] for u in users], cfg.max_len)
  lengths = np.array([len(train[u]) - 1 for u in users])
  seen = [train[u] for u in users]      # BCE negatives: items not in the user's training sequence
  params = model.init(jax.random.PRNGKey(cfg.seed), inputs[:2], train=False)["params"]
  tx = optax.adam(cfg.learning_rate, b1=0.9, b2=0.98)
  opt = tx.init(params)
  grad_fn = jax.value_and_grad(_loss_fn(model, cfg))

  @jax.jit
  def step(params, opt, inp, pos, neg, key):
    loss, g = grad_fn(params, inp, pos, neg, key)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  val_ids = None
  if cfg.validation_users:
    from recalign.evaluator import sample_example_ids
    val_ids = sample_example_ids(len(data.validation_users), cfg.validation_users, seed=cfg.seed)
  log, best, best_params, stale = [], -1.0, params, 0
  key = jax.random.PRNGKey(cfg.seed + 1)
  bar = tqdm(range(cfg.epochs), desc=f"sasrec ({cfg.loss})", disable=not progress, dynamic_ncols=True)
  t0 = time.perf_counter()
  for epoch in bar:
    total, count = 0.0, 0
    for rows, L in _batches(lengths, cfg.batch_size, cfg.max_len, rng):
      inp, pos = inputs[rows, -L:], positives[rows, -L:]
      if cfg.loss == "bce":
        neg = _negatives(rng, pos.shape, data.num_items, [seen[r] for r in rows])
      elif cfg.loss == "sampled_ce":
        neg = rng.integers(1, data.num_items + 1, cfg.num_negatives).astype(np.int32)
      else:
        neg = np.zeros(1, np.int32)
      key, sub = jax.random.split(key)
      params, opt, loss = step(params, opt, inp, pos, neg, sub)
      total += float(loss) * len(rows)
      count += len(rows)
    entry = {"epoch": epoch + 1, "loss": total / count}
    out_of_time = cfg.max_minutes is not None and time.perf_counter() - t0 > cfg.max_minutes * 60
    last = epoch + 1 == cfg.epochs or out_of_time
    if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or last):
      ndcg = evaluate_sasrec(model, params, data, "validation", exclude_history=cfg.exclude_history,
                             example_ids=val_ids)["ndcg@10"]
      entry["validation_ndcg@10"] = ndcg
      if ndcg > best:
        best, best_params, stale = ndcg, params, 0
      else:
        stale += 1
      bar.set_postfix(loss=f"{entry['loss']:.4f}", val_ndcg10=f"{ndcg:.4f}", best=f"{best:.4f}")
    log.append(entry)
    if cfg.eval_every and stale >= cfg.patience:
      logging.info("sasrec: stopped at epoch %d (best validation NDCG@10 %.4f)", epoch + 1, best)
      break
    if out_of_time:
      logging.info("sasrec: %.1f-minute budget spent after epoch %d", cfg.max_minutes, epoch + 1)
      break
  bar.close()
  return model, (best_params if cfg.eval_every else params), log


def sasrec_scores(model: "SASRec", params, data: PreparedData, split: str, users: np.ndarray,
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
