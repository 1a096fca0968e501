"""Ranking and rating metrics (one relevant item per example), shared by models and baselines.

HR@k = 1 if the target is among the first k; NDCG@k = 1 / log2(rank + 1) for a 1-based rank <= k.
AUC is the Mann-Whitney statistic with ties counted half.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

# Retrieval protocols. The paper ranks the entire catalogue (items the user already has included);
# many sequential-recommendation papers exclude the user's history. Every metrics file says which.
FULL_CATALOGUE = "full catalogue"
HISTORY_EXCLUDED = "history excluded"


def protocol_name(exclude_history: bool) -> str:
  return HISTORY_EXCLUDED if exclude_history else FULL_CATALOGUE


def target_ranks(ranked: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """1-based rank of each target in its row of `ranked` [n, k] (0 when absent)."""
  ranked, targets = np.asarray(ranked), np.asarray(targets)
  hit = ranked == targets[:, None]
  return np.where(hit.any(1), hit.argmax(1) + 1, 0)


def ranking_metrics(ranked: np.ndarray, targets: np.ndarray, ks: Iterable[int] = (5, 10)) -> dict[str, float]:
  ranks = target_ranks(ranked, targets)
  out = {}
  for k in ks:
    inside = (ranks > 0) & (ranks <= k)
    out[f"hr@{k}"] = float(inside.mean())
    out[f"ndcg@{k}"] = float(np.where(inside, 1.0 / np.log2(np.maximum(ranks, 1) + 1), 0.0).mean())
  return out


def rank_by_scores(scores: np.ndarray, items: np.ndarray) -> np.ndarray:
  """Items [n, c] ordered by descending score (stable: ties keep candidate order)."""
  order = np.argsort(-np.asarray(scores), axis=1, kind="stable")
  return np.take_along_axis(np.asarray(items), order, 1)


def auc(scores: Sequence[float], labels: Sequence[int]) -> float:
  s, y = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
  n_pos, n_neg = y.sum(), (~y).sum()
  if n_pos == 0 or n_neg == 0:
    raise ValueError("AUC needs at least one positive and one negative label")
  order = np.argsort(s, kind="mergesort")
  ranks = np.empty(len(s))
  sorted_s = s[order]
  i = 0
  while i < len(s):  # average ranks over ties
    j = i
    while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
      j += 1
    ranks[order[i:j + 1]] = (i + j) / 2 + 1
    i = j + 1
  return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def p_yes(logp_yes: np.ndarray, logp_no: np.ndarray) -> np.ndarray:
  """P(yes) / (P(yes) + P(no)) from the two answers' log-likelihoods."""
  return 1.0 / (1.0 + np.exp(np.asarray(logp_no) - np.asarray(logp_yes)))


# seqio metric functions: predictions are space-separated ranked item IDs, targets the true ID.


def seqio_retrieval_metrics(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  ranked = [p.split() for p in predictions]
  width = max((len(r) for r in ranked), default=1)
  arr = np.array([r + [""] * (width - len(r)) for r in ranked], dtype=object)
  return ranking_metrics(arr, np.array(list(targets), dtype=object), ks=(1, 5, 10))


def seqio_rating_metrics(targets: Sequence[str], scores: Sequence[float]) -> dict[str, float]:
  """`scores` are P(yes); targets are "yes" / "no"."""
  return {"auc": auc(scores, [t == "yes" for t in targets])}
