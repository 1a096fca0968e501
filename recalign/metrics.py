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


def higher_is_better(metric: str) -> bool:
  """Errors (RMSE, MAE) improve downwards; every other metric here upwards."""
  return not metric.rsplit("/", 1)[-1].endswith(("rmse", "mae"))


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


# seqio metric functions, in the signatures seqio.Evaluator (and T5X's trainer / eval job) calls them
# with. recalign's own evaluator (`recalign eval`) computes more with constrained beam search; these
# are what a model run under seqio can be scored on.


def _item_text(x) -> str:
  return (x.decode() if isinstance(x, bytes) else str(x)).strip()


def seqio_retrieval_metrics(targets: Sequence[str], predictions: Sequence) -> dict[str, float]:
  """Predict metric: `predictions` are seqio's decoded model outputs, one per example -- a string (the
  top decode: one item ID, so HR@1 = NDCG@1 = accuracy) or a ranked list of IDs (all beams, e.g. T5X
  with `return_all_decodes`), which adds HR/NDCG@5 and @10."""
  ranked = [[_item_text(p)] if isinstance(p, (str, bytes)) else [_item_text(x) for x in p] for p in predictions]
  width = min(len(r) for r in ranked) if ranked else 1
  arr = np.array([r[:width] + [""] * (width - len(r[:width])) for r in ranked], dtype=object)
  ks = [k for k in (1, 5, 10) if k <= width] or [1]
  return ranking_metrics(arr, np.array([_item_text(t) for t in targets], dtype=object), ks=ks)


def seqio_rating_metrics(targets: Sequence[str], scores: Sequence[float]) -> dict[str, float]:
  """Score metric: `scores` are seqio's log-likelihoods of each example's own target ("yes" / "no").
  P(yes) is exp(score) for a "yes" example and 1 - exp(score) for a "no" one, which is exact when the
  model puts its mass on the two answers (a trained rating model); `recalign eval` scores both answers
  and normalises, P(yes) / (P(yes) + P(no))."""
  labels = np.array([_item_text(t) == "yes" for t in targets])
  p = np.exp(np.minimum(np.asarray(scores, np.float64), 0.0))
  return {"auc": auc(np.where(labels, p, 1.0 - p), labels)}
