"""Collaborative filtering in JAX for RecLM-style profile tuning: BiasMF and LightGCN, trained with BPR,
with RecLM's fusion of a text (profile) embedding switched on by a flag.

  * BiasMF: score(u, i) = <e_u, e_i> + b_u + b_i.
  * LightGCN (He et al. 2020): embeddings propagated `layers` times over the symmetric-normalised
    user-item graph of the training interactions, D^-1/2 A D^-1/2, and averaged over layers 0..K.
  * Fusion (RecLM, Jiang et al.): the final ID representation and the fixed profile embedding each go
    through an MLP; the two are concatenated and mapped back by a linear layer + ReLU.

Training: BPR with one uniformly sampled negative per training interaction (an item the user never
had), L2 on the batch's layer-0 embeddings, Adam 1e-3, d = 32, 2 layers (RecLM's settings). Early
stopping on validation NDCG@20 every `eval_every` epochs (`patience` evaluations); the best epoch's
parameters are kept -- selection never looks at the test split. Evaluation ranks the full catalogue
minus the user's training items (and, for test, the validation item): Recall@20 and NDCG@20 with the
one held-out item of the leave-one-out split (Recall@20 = HR@20).
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

from recalign.data.prepare import PreparedData

MODELS = ("biasmf", "lightgcn")


@dataclasses.dataclass(frozen=True)
class CFConfig:
  model: str = "lightgcn"
  dim: int = 32
  layers: int = 2                 # LightGCN propagation layers
  learning_rate: float = 1e-3
  l2: float = 1e-4
  batch_size: int = 2048
  epochs: int = 200               # at most; early stopping usually ends sooner
  eval_every: int = 5
  patience: int = 4
  fusion: bool = False            # RecLM: fuse the profile embeddings given to train_cf
  fusion_hidden: int = 64
  k: int = 20
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class Graph:
  """The bipartite training graph: node u is user u, node U + i is item i; edges both ways, weighted
  1 / sqrt(deg(a) deg(b))."""
  num_users: int
  num_items: int
  rows: np.ndarray
  cols: np.ndarray
  weights: np.ndarray

  @classmethod
  def from_interactions(cls, users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> "Graph":
    u, i = np.asarray(users, np.int64), np.asarray(items, np.int64) + num_users
    rows, cols = np.concatenate([u, i]), np.concatenate([i, u])
    deg = np.bincount(rows, minlength=num_users + num_items).astype(np.float64)
    w = 1.0 / np.sqrt(deg[rows] * deg[cols])
    return cls(num_users, num_items, rows.astype(np.int32), cols.astype(np.int32), w.astype(np.float32))

  def dense(self) -> np.ndarray:
    n = self.num_users + self.num_items
    a = np.zeros((n, n), np.float32)
    np.add.at(a, (self.rows, self.cols), self.weights)
    return a


def train_interactions(data: PreparedData, holdout_items: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
  """(users, items) of every training interaction (all but each user's last two items); interactions with
  `holdout_items` (a zero-shot split's held-out items) are left out."""
  users = np.concatenate([np.full(len(s) - 2, u) for u, s in enumerate(data.sequences)])
  items = np.concatenate([s[:-2] for s in data.sequences])
  if holdout_items is not None:
    keep = ~np.isin(items, holdout_items)
    users, items = users[keep], items[keep]
  return users, items


def zero_shot_items(data: PreparedData, fraction: float = 0.2, seed: int = 0) -> np.ndarray:
  """The zero-shot split's new items: a seeded `fraction` of the catalogue, held out of training with
  all their interactions (only their text / profile is known)."""
  rng = np.random.default_rng([seed, 11])
  return np.sort(rng.choice(data.num_items, int(round(fraction * data.num_items)), replace=False))


def propagate(emb: jnp.ndarray, graph: Graph, layers: int) -> jnp.ndarray:
  """LightGCN: the mean of E, A E, ..., A^K E with A the normalised adjacency (a sparse product)."""
  rows, cols, w = jnp.asarray(graph.rows), jnp.asarray(graph.cols), jnp.asarray(graph.weights)
  out, x = emb, emb
  for _ in range(layers):
    x = jax.ops.segment_sum(w[:, None] * x[cols], rows, num_segments=emb.shape[0])
    out = out + x
  return out / (layers + 1)


def _mlp(p, x):
  return jnp.maximum(x @ p["w1"] + p["b1"], 0.0) @ p["w2"] + p["b2"]


def init_params(key, cfg: CFConfig, num_users: int, num_items: int, profile_dim: Optional[int] = None) -> dict:
  k_emb, k_id, k_prof, k_out = jax.random.split(key, 4)
  params = {"emb": jax.random.normal(k_emb, (num_users + num_items, cfg.dim)) * 0.1}
  if cfg.model == "biasmf":
    params["bias"] = jnp.zeros(num_users + num_items)
  if cfg.fusion:
    if profile_dim is None:
      raise ValueError("fusion needs profile embeddings (user_profiles / item_profiles)")
    def mlp(k, d_in):
      k1, k2 = jax.random.split(k)
      glorot = jax.nn.initializers.glorot_uniform()
      return {"w1": glorot(k1, (d_in, cfg.fusion_hidden)), "b1": jnp.zeros(cfg.fusion_hidden),
              "w2": glorot(k2, (cfg.fusion_hidden, cfg.dim)), "b2": jnp.zeros(cfg.dim)}
    params["fusion"] = {"id": mlp(k_id, cfg.dim), "profile": mlp(k_prof, profile_dim),
                        "out": {"w": jax.nn.initializers.glorot_uniform()(k_out, (2 * cfg.dim, cfg.dim)),
                                "b": jnp.zeros(cfg.dim)}}
  return params


def representations(params: dict, cfg: CFConfig, graph: Graph, profiles: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Every node's final representation [users + items, dim] (fused with `profiles` when cfg.fusion)."""
  x = propagate(params["emb"], graph, cfg.layers) if cfg.model == "lightgcn" else params["emb"]
  if cfg.fusion:
    f = params["fusion"]
    both = jnp.concatenate([_mlp(f["id"], x), _mlp(f["profile"], profiles)], -1)
    x = jnp.maximum(both @ f["out"]["w"] + f["out"]["b"], 0.0)
  return x


def scores(params: dict, cfg: CFConfig, reps: jnp.ndarray, users: jnp.ndarray, items: jnp.ndarray, num_users: int):
  """score(u, i) for aligned arrays of users and items."""
  s = jnp.sum(reps[users] * reps[num_users + items], -1)
  if cfg.model == "biasmf":
    s = s + params["bias"][users] + params["bias"][num_users + items]
  return s


def bpr_loss(params, cfg: CFConfig, graph: Graph, profiles, users, pos, neg):
  reps = representations(params, cfg, graph, profiles)
  n = graph.num_users
  diff = scores(params, cfg, reps, users, pos, n) - scores(params, cfg, reps, users, neg, n)
  e = params["emb"]
  reg = (jnp.sum(e[users] ** 2) + jnp.sum(e[n + pos] ** 2) + jnp.sum(e[n + neg] ** 2)) / 2
  return -jnp.mean(jax.nn.log_sigmoid(diff)) + cfg.l2 * reg / users.shape[0]


def rank_metrics(score_matrix: np.ndarray, targets: np.ndarray, exclude: list[np.ndarray], k: int = 20) -> dict:
  """Recall@k and NDCG@k of one held-out item per row; `exclude[r]` items are never ranked."""
  s = np.array(score_matrix, np.float64, copy=True)
  for r, items in enumerate(exclude):
    s[r, items] = -np.inf
  target = s[np.arange(len(s)), targets]
  rank = (s > target[:, None]).sum(1) + 1     # 1-based; ties count in the target's favour
  inside = rank <= k
  return {f"recall@{k}": float(inside.mean()),
          f"ndcg@{k}": float(np.where(inside, 1.0 / np.log2(rank + 1), 0.0).mean())}


def evaluate_cf(params, cfg: CFConfig, graph: Graph, data: PreparedData, split: str, profiles=None,
                users: Optional[np.ndarray] = None, batch: int = 1024, candidates: Optional[np.ndarray] = None) -> dict:
  """Full-catalogue Recall@k / NDCG@k of the split's held-out item (validation: the seeded validation users).
  `candidates` (the zero-shot split's new items): rank only those, for the users whose held-out item is one."""
  if users is None:
    users = data.validation_users if split == "validation" else np.arange(data.num_users)
  others = None
  if candidates is not None:
    users = np.array([u for u in users if data.held_out(int(u), split)[1] in set(candidates.tolist())], np.int64)
    others = np.setdiff1d(np.arange(data.num_items), candidates)
    if not len(users):
      return {f"recall@{cfg.k}": float("nan"), f"ndcg@{cfg.k}": float("nan"), "users": 0}
  reps = np.asarray(representations(params, cfg, graph, profiles))
  n = graph.num_users
  item_reps = reps[n:]
  out = {f"recall@{cfg.k}": 0.0, f"ndcg@{cfg.k}": 0.0}
  for s in range(0, len(users), batch):
    us = users[s:s + batch]
    sm = reps[us] @ item_reps.T
    if cfg.model == "biasmf":
      sm = sm + np.asarray(params["bias"])[n:][None]
    held = [data.held_out(int(u), split) for u in us]
    exclude = [h if others is None else np.concatenate([h, others]) for h, _ in held]
    m = rank_metrics(sm, np.array([t for _, t in held]), exclude, cfg.k)
    for key in out:
      out[key] += m[key] * len(us)
  return {**{key: v / len(users) for key, v in out.items()}, "users": len(users)}


def train_cf(data: PreparedData, cfg: CFConfig = CFConfig(), profiles: Optional[np.ndarray] = None,
             holdout_items: Optional[np.ndarray] = None) -> tuple[dict, Graph, list[dict]]:
  """Trains on the training interactions; returns (best parameters, graph, log). `profiles`
  [users + items, d]: the text embeddings RecLM's fusion uses (rows of users, then items)."""
  if cfg.model not in MODELS:
    raise ValueError(f"model must be one of {MODELS}, not {cfg.model!r}")
  users, items = train_interactions(data, holdout_items)
  graph = Graph.from_interactions(users, items, data.num_users, data.num_items)
  prof = None if profiles is None else jnp.asarray(profiles, jnp.float32)
  params = init_params(jax.random.PRNGKey(cfg.seed), cfg, data.num_users, data.num_items,
                       None if profiles is None else profiles.shape[1])
  opt = optax.adam(cfg.learning_rate)
  state = opt.init(params)

  @jax.jit
  def step(params, state, u, p, n):
    loss, grads = jax.value_and_grad(bpr_loss)(params, cfg, graph, prof, u, p, n)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  # negatives: never any of the user's items, nor a zero-shot item (training never sees those)
  pool = np.arange(data.num_items)
  pool = np.setdiff1d(pool, holdout_items) if holdout_items is not None else pool
  seen = [set(s.tolist()) for s in data.sequences]
  rng = np.random.default_rng(cfg.seed)
  best, best_params, log, bad = -1.0, params, [], 0
  t0 = time.time()
  for epoch in range(1, cfg.epochs + 1):
    order = rng.permutation(len(users))
    neg = pool[rng.integers(0, len(pool), len(users))]
    for r in range(len(users)):   # resample the (rare) negatives the user has
      while neg[r] in seen[users[r]]:
        neg[r] = pool[rng.integers(0, len(pool))]
    losses = []
    for s in range(0, len(order), cfg.batch_size):
      b = order[s:s + cfg.batch_size]
      params, state, loss = step(params, state, jnp.asarray(users[b]), jnp.asarray(items[b]), jnp.asarray(neg[b]))
      losses.append(float(loss))
    entry = {"epoch": epoch, "loss": float(np.mean(losses)), "minutes": (time.time() - t0) / 60}
    if cfg.eval_every and epoch % cfg.eval_every == 0:
      v = evaluate_cf(params, cfg, graph, data, "validation", prof, candidates=holdout_items)
      entry.update({f"validation_{k}": x for k, x in v.items()})
      if v[f"ndcg@{cfg.k}"] > best:   # (nan -- no validation user -- never improves: the first params stay)
        best, best_params, bad = v[f"ndcg@{cfg.k}"], params, 0
      else:
        bad += 1
      logging.info("%s epoch %d loss %.4f validation %s", cfg.model, epoch, entry["loss"], v)
    log.append(entry)
    if cfg.eval_every and bad >= cfg.patience:
      break
  return (best_params if cfg.eval_every else params), graph, log
