"""Conventional baselines on the same splits and the same metric code as the language models.

  * popularity: the most popular (training split) items the user has not interacted with;
  * SASRec (`sasrec.py`): self-attentive sequential recommendation, full-catalogue ranking;
  * history (rating): the user's training like-rate as P(like).

Retrieval ranks the whole catalogue (the paper's protocol) or, with `exclude_history`, the catalogue
minus the user's history, as `recalign eval` does; ranking ranks the same 100 candidates the ranking
task draws for each user.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from recalign import metrics as M
from recalign.data.prepare import PreparedData


def eval_users(data: PreparedData, split: str, example_ids: Optional[np.ndarray] = None) -> np.ndarray:
  """The users of a split's evaluation examples (all, or those of `example_ids`, the tasks' ids)."""
  users = data.validation_users if split == "validation" else np.arange(data.num_users)
  return users if example_ids is None else users[np.asarray(example_ids)]


def targets_and_history(data: PreparedData, split: str, users: np.ndarray):
  pairs = [data.held_out(int(u), split) for u in users]
  return np.array([t for _, t in pairs]), [h for h, _ in pairs]


def top_k_excluding(scores: np.ndarray, history: list[np.ndarray], k: int) -> np.ndarray:
  """Top-k item indices per row of `scores` [n, items], history items excluded."""
  scores = np.array(scores, np.float64, copy=True)
  for r, h in enumerate(history):
    scores[r, h] = -np.inf
  k = min(k, scores.shape[1])  # (tiny catalogues)
  top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
  return np.take_along_axis(top, order, 1)


def popularity(data: PreparedData, split: str = "test", candidates: Optional[np.ndarray] = None, *,
               exclude_history: bool = False, example_ids: Optional[np.ndarray] = None) -> dict:
  """The most popular training items (minus the user's history with `exclude_history`)."""
  users = eval_users(data, split, example_ids)
  targets, history = targets_and_history(data, split, users)
  pop = data.train_popularity().astype(np.float64)
  if candidates is not None:
    return M.ranking_metrics(M.rank_by_scores(pop[candidates], candidates), targets, (1, 5, 10))
  ranked = top_k_excluding(np.broadcast_to(pop, (len(users), data.num_items)),
                           history if exclude_history else [[]] * len(users), 10)
  return M.ranking_metrics(ranked, targets, (5, 10))


def history_rating(data: PreparedData, split: str = "test") -> dict:
  """AUC of the user's training like-rate (rating > 3) for the held-out item's like/dislike."""
  if data.ratings is None:
    raise ValueError(f"{data.name} has no ratings")
  users = eval_users(data, split)
  cut = {"validation": 2, "test": 1}[split]   # position of the held-out item, as PreparedData.held_out
  rate = np.array([np.mean(data.ratings[u][:-2] > 3) for u in users])
  labels = np.array([data.ratings[u][-cut] > 3 for u in users])
  return {"auc": M.auc(rate, labels)}


def mean_std(runs: list[dict]) -> dict:
  """Metrics averaged over runs (seeds), with each metric's standard deviation as `<metric>_std`."""
  keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float)) and k != "examples"]
  out = {k: float(np.mean([r[k] for r in runs])) for k in keys}
  if len(runs) > 1:
    out.update({f"{k}_std": float(np.std([r[k] for r in runs])) for k in keys})
  out["runs"] = len(runs)
  return out


def format_table(rows: dict[str, dict], keys: Optional[list[str]] = None) -> str:
  """A fixed-width table; a metric with `<metric>_std` (several seeds) prints as mean±std. No rows: an empty
  string (an eval job whose checkpoints were all evaluated before)."""
  if not rows:
    return ""
  keys = keys or sorted({k for r in rows.values() for k in r
                         if k not in ("examples", "runs") and not k.endswith("_std")})
  width = max(len(n) for n in rows) + 2
  cell = max(12, 16 if any(f"{k}_std" in r for r in rows.values() for k in keys) else 12)

  def fmt(r, k):
    if k not in r:
      return f"{'-':>{cell}}"
    return f"{r[k]:.4f}±{r[k + '_std']:.4f}".rjust(cell) if f"{k}_std" in r else f"{r[k]:>{cell}.4f}"

  if len(keys) > 10:   # rows with many different metrics (ITDR's tasks): a block per row, a line per prefix
    lines = []
    for name, r in rows.items():
      lines.append(name + (f"  ({r['examples']} examples)" if "examples" in r else ""))
      groups: dict[str, list[str]] = {}
      for k in (k for k in keys if k in r):
        groups.setdefault(k.rpartition("/")[0], []).append(f"{k} {fmt(r, k).strip()}")
      lines += ["  " + "  ".join(v) for v in groups.values()]
    return "\n".join(lines)
  lines = [" " * width + "".join(f"{k:>{cell}}" for k in keys)]
  for name, r in rows.items():
    lines.append(f"{name:<{width}}" + "".join(fmt(r, k) for k in keys))
  return "\n".join(lines)
