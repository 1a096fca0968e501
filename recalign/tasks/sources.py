"""Examples before rendering: sliding windows over the leave-one-out splits, as tf.data sources.

Every example is a user's history (item indices, chronological) and a target item. The `train`
split is an endless stream of epochs: each element carries its `epoch` and a `sample_seed`, and the
preprocessors fold (`sample_seed`, split, task, `example_id`, `epoch`) into their stateless keys, so
masks and negatives are re-drawn every epoch and reproduced exactly for a seed, independent of
shuffling, parallelism or host sharding. The training `sample_seed` is the run's seed (RANDOM_SEED);
validation and test use a fixed evaluation seed, the same for every run, so that runs stay comparable
and evaluation draws never repeat a training draw.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import tensorflow as tf

from recalign.data.prepare import PreparedData

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class Examples:
  """One split's examples as flat numpy arrays (histories ragged via row splits)."""
  user: np.ndarray            # int32 [E]
  target: np.ndarray          # int32 [E]
  history: np.ndarray         # int32 [sum of history lengths]
  history_splits: np.ndarray  # int64 [E + 1]
  target_rating: Optional[np.ndarray] = None
  history_rating: Optional[np.ndarray] = None
  following: Optional[np.ndarray] = None         # int32: the items after the target (continuations)
  following_splits: Optional[np.ndarray] = None

  def __len__(self) -> int:
    return len(self.user)

  def histories(self) -> list[np.ndarray]:
    return [self.history[a:b] for a, b in zip(self.history_splits[:-1], self.history_splits[1:])]

  def features(self) -> dict:
    out = {"user": self.user, "target": self.target,
           "history": tf.RaggedTensor.from_row_splits(self.history, self.history_splits)}
    if self.target_rating is not None:
      out["target_rating"] = self.target_rating
      out["history_rating"] = tf.RaggedTensor.from_row_splits(self.history_rating, self.history_splits)
    if self.following is not None:
      out["following"] = tf.RaggedTensor.from_row_splits(self.following, self.following_splits)
    return out


@dataclasses.dataclass
class Records:
  """Examples as named columns, one row per example: numpy arrays, or lists of arrays / strings of
  varying lengths (ragged), e.g. the ITDR tasks' histories, candidates and attributes."""
  columns: dict

  def __len__(self) -> int:
    return len(self.columns["user"])

  def features(self) -> dict:
    out = {}
    for k, v in self.columns.items():
      if isinstance(v, list):   # ragged: one array per example
        lengths = np.array([len(x) for x in v], np.int64)
        flat = np.concatenate([np.asarray(x) for x in v]) if len(v) else np.zeros([0], np.int32)
        v = tf.RaggedTensor.from_row_lengths(flat, lengths)
      out[k] = v
    return out


def _flat(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  splits = np.concatenate([[0], np.cumsum([len(h) for h in arrays])]).astype(np.int64)
  return (np.concatenate(arrays).astype(np.int32) if arrays else np.zeros([0], np.int32)), splits


def _pack(rows: list[tuple[int, np.ndarray, int, Optional[np.ndarray], Optional[float]]],
          following: Optional[list[np.ndarray]] = None) -> Examples:
  history, splits = _flat([r[1] for r in rows])
  with_r = rows and rows[0][3] is not None
  more = _flat(following) if following is not None else (None, None)
  return Examples(
      user=np.array([r[0] for r in rows], np.int32),
      target=np.array([r[2] for r in rows], np.int32),
      history=history, history_splits=splits,
      history_rating=np.concatenate([r[3] for r in rows]).astype(np.float32) if with_r else None,
      target_rating=np.array([r[4] for r in rows], np.float32) if with_r else None,
      following=more[0], following_splits=more[1])


TRAIN_EXAMPLES = ("windows", "prefixes", "continuations")


def build_examples(data: PreparedData, split: str, window: int = 20, train_examples: str = "windows",
                   train_lengths: Optional[np.ndarray] = None, next_items: int = 1) -> Examples:
  """Windows of `window` items; the last item of a window is the target, the rest its history.

  train, "windows" (the paper's): windows [i_k .. i_{k+w-1}] over the training split,
    1 <= k <= max(1, L-w+1); windows without any history (L = 1) are not examples.
  train, "prefixes": every training item after the first is a target, with the w-1 items before it
    as history (as TIGER / P5 train) -- L-1 examples per user instead of max(1, L-w+1).
  train, "continuations": one row per chunk of `next_items` training items after the first (chunk j
    starts at lo = 1 + j * next_items): `history` the w-1 items before lo, `target` item lo, `following`
    the items after it up to lo + 2 * next_items - 2. The retrieval preprocessor draws the split point
    b in [lo, lo + next_items) every epoch and trains on the next `next_items` items after the w-1 before
    b -- each a true next item given all before it; every item is a target about once per epoch.
  validation: the last w-1 training items -> validation item (seeded user subset). test: the last
    w-1 items up to and including the validation item -> test item (all users).
  `train_lengths`: per user, how many items training may use (default: all but the last two); the
  ITDR list tasks hold out more of their evaluation users' items (`itdr.train_lengths`).
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  if train_examples not in TRAIN_EXAMPLES:
    raise ValueError(f"train_examples must be one of {TRAIN_EXAMPLES}, not {train_examples!r}")
  if next_items < 1 or (next_items > 1 and train_examples != "continuations"):
    raise ValueError(f"next_items={next_items}: must be >= 1, and > 1 only with train_examples='continuations'")
  rows, following = [], []
  ratings = data.ratings
  users = data.validation_users if split == "validation" else range(data.num_users)
  for u in users:
    seq = data.sequences[u]
    r = ratings[u] if ratings is not None else None
    if split == "train" and train_examples == "continuations":
      n = len(seq) - 2 if train_lengths is None else int(train_lengths[u])
      for lo in range(1, n, next_items):
        k = max(0, lo - (window - 1))
        rows.append((u, seq[k:lo], int(seq[lo]), None if r is None else r[k:lo],
                     None if r is None else float(r[lo])))
        following.append(np.asarray(seq[lo + 1:min(n, lo + 2 * next_items - 1)]))
    elif split == "train":
      n = len(seq) - 2 if train_lengths is None else int(train_lengths[u])
      ends = (range(2, n + 1) if train_examples == "prefixes" else
              [min(k + window, n) for k in range(max(1, n - window + 1))])
      for end in ends:
        k = max(0, end - window)
        if end - k < 2:
          continue
        rows.append((u, seq[k:end - 1], int(seq[end - 1]),
                     None if r is None else r[k:end - 1], None if r is None else float(r[end - 1])))
    else:
      end = len(seq) - (2 if split == "validation" else 1)
      start = max(0, end - (window - 1))
      rows.append((u, seq[start:end], int(seq[end]),
                   None if r is None else r[start:end], None if r is None else float(r[end])))
  return _pack(rows, following if split == "train" and train_examples == "continuations" else None)


def mix_seed(*parts: int) -> int:
  """A non-negative int64 from several integers (shuffle seeds, sample seeds)."""
  h = 0
  for p in parts:
    h = (h * 1_000_003 + int(p)) % (1 << 62)
  return h


def to_dataset(ex: Examples | Records, *, split: str, shuffle: bool, seed: int, salt: int = 0) -> tf.data.Dataset:
  """A tf.data stream of dicts; `train` repeats forever with a fresh shuffle and `epoch` per pass.

  `seed` is the sample seed every element carries (the run's seed for train, the evaluation seed
  otherwise); `salt` (the task's) makes the tasks of a mixture shuffle independently.
  """
  n = len(ex)
  features = ex.features()
  with tf.init_scope():   # captured by the gather, not copied into every epoch's graph
    columns = {k: v if isinstance(v, tf.RaggedTensor) else tf.constant(v) for k, v in features.items()}

  def example(i):
    return {"example_id": i, "sample_seed": tf.constant(seed, tf.int64),
            **{k: v[i] if isinstance(v, tf.RaggedTensor) else tf.gather(v, i) for k, v in columns.items()}}

  def epoch_ds(epoch):
    # the epoch's order shuffles example indices, not examples: the same order as shuffling the
    # examples themselves (a shuffle's draws do not depend on what it holds), and a checkpoint of the
    # input iterator holds 8 bytes an example instead of every waiting example's features
    ds = tf.data.Dataset.range(n)
    if shuffle:
      ds = ds.shuffle(n, seed=_epoch_seed(seed, salt, epoch), reshuffle_each_iteration=False)
    return ds.map(lambda i: {**example(i), "epoch": epoch})

  return _epochs(epoch_ds, split)


def _epoch_seed(seed: int, salt: int, epoch, factor: int = 1_000_003):
  """A shuffle's seed in one epoch: re-drawn every epoch, reproduced for the same (seed, salt)."""
  return tf.constant(mix_seed(seed, salt) % (1 << 40), tf.int64) * factor + epoch


def _epochs(epoch_ds, split: str) -> tf.data.Dataset:
  """`train`: epoch 0, 1, ... forever (each element tagged by `epoch_ds`); other splits: epoch 0 once."""
  if split == "train":
    return tf.data.Dataset.counter().flat_map(epoch_ds)
  return epoch_ds(tf.constant(0, tf.int64))


# -- the same examples, streamed from a prepared data set's TFDS copy ------------------------------------


def example_counts(lengths: np.ndarray, validation: np.ndarray, split: str, window: int = 20,
                   train_examples: str = "windows", train_lengths: Optional[np.ndarray] = None,
                   next_items: int = 1) -> np.ndarray:
  """How many examples `build_examples` makes of each user (from sequence lengths alone): what numbers a
  streamed user's examples as the in-memory ones are numbered (example_id = examples of the users before)."""
  if split == "validation":
    return validation.astype(np.int64)
  if split == "test":
    return np.ones(len(lengths), np.int64)
  n = (lengths - 2 if train_lengths is None else np.asarray(train_lengths)).astype(np.int64)
  if train_examples == "continuations":
    return np.maximum(0, -(-(n - 1) // next_items))
  if train_examples == "prefixes":
    return np.maximum(0, n - 1)
  return np.where(n >= 2, np.maximum(1, n - window + 1), 0)


def stream_examples(users: tf.data.Dataset, split: str, *, first_ids: np.ndarray, window: int = 20,
                    train_examples: str = "windows", train_lengths: Optional[np.ndarray] = None,
                    next_items: int = 1, with_ratings: bool = False, with_user_items: bool = False) -> tf.data.Dataset:
  """`build_examples` over a stream of user records (tfds_data's `users` split): the same examples, with
  the same fields and `example_id`s (`first_ids[u]`: the id of user u's first example), each user's made
  when its record is read. `with_user_items`: each example also carries all of its user's items
  (`user_items`, what negative sampling excludes), so no per-user table need be held in memory."""
  with tf.init_scope():   # eager tensors the map captures: graph constants would be copied into every graph
    first = tf.constant(first_ids, tf.int64)
    limit = None if train_lengths is None else tf.constant(np.asarray(train_lengths, np.int64))

  def spans(r):   # (history start, history end = target position, following end) per example
    length = tf.shape(r["items"], tf.int64)[0]
    if split != "train":
      end = length - (2 if split == "validation" else 1)
      return tf.maximum(end - (window - 1), 0)[None], end[None], end[None] + 1
    n = length - 2 if limit is None else tf.gather(limit, r["user"])
    if train_examples == "continuations":
      lo = tf.range(1, n, next_items, dtype=tf.int64)
      return tf.maximum(lo - (window - 1), 0), lo, tf.maximum(lo + 1, tf.minimum(n, lo + 2 * next_items - 1))
    ends = (tf.range(2, n + 1, dtype=tf.int64) if train_examples == "prefixes" else
            tf.minimum(tf.range(tf.maximum(n - window + 1, 1), dtype=tf.int64) + window, n))
    starts = tf.maximum(ends - window, 0)
    keep = ends - starts >= 2
    ends, starts = ends[keep], starts[keep]
    return starts, ends - 1, ends

  def examples(r):
    start, pos, follow = spans(r)
    count = tf.shape(pos, tf.int64)[0]
    window_idx = tf.ragged.range(start, pos)
    out = {"example_id": tf.gather(first, r["user"]) + tf.range(count),
           "user": tf.fill([count], r["user"]), "target": tf.gather(r["items"], pos),
           "history": tf.gather(r["items"], window_idx)}
    if with_ratings:
      out["target_rating"] = tf.gather(r["ratings"], pos)
      out["history_rating"] = tf.gather(r["ratings"], window_idx)
    if split == "train" and train_examples == "continuations":
      out["following"] = tf.gather(r["items"], tf.ragged.range(pos + 1, follow))
    if with_user_items:
      out["user_items"] = repeated_items(r["items"], count)
    return out

  if split == "validation":
    users = users.filter(lambda r: r["validation"])
  # a batch of examples per user, then one element per example (faster than a dataset per user)
  return users.map(examples, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def first_ids(counts: np.ndarray) -> np.ndarray:
  """Every user's first example id, from how many examples each user makes (the users before it)."""
  return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def repeated_items(items: tf.Tensor, count: tf.Tensor) -> tf.RaggedTensor:
  """A user's items once per example of theirs (`user_items`: what the examples' negatives exclude)."""
  return tf.RaggedTensor.from_row_lengths(tf.tile(items, [count]), tf.fill([count], tf.shape(items, tf.int64)[0]))


@dataclasses.dataclass
class StreamedExamples:
  """One split's examples as `stream_examples` makes them from user records: only their count and every
  user's first example id are held (O(users)), nothing per example."""
  split: str
  first_ids: np.ndarray
  count: int
  options: dict   # stream_examples' settings: window, train_examples, train_lengths, next_items, with_ratings,
                  # with_user_items

  def __len__(self) -> int:
    return self.count

  def make(self, users: tf.data.Dataset) -> tf.data.Dataset:
    return stream_examples(users, self.split, first_ids=self.first_ids, **self.options)

  def with_user_items(self) -> "StreamedExamples":
    """The same examples, each carrying its user's items (`stream_examples`' `with_user_items`)."""
    return dataclasses.replace(self, options={**self.options, "with_user_items": True})


def streamed_examples(lengths: np.ndarray, validation: np.ndarray, split: str, window: int = 20,
                      train_examples: str = "windows", train_lengths: Optional[np.ndarray] = None,
                      next_items: int = 1, *, with_ratings: bool = False) -> StreamedExamples:
  """`build_examples`' examples, to be streamed: from every user's sequence length and validation flag
  (`tfds_data.index`) alone."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  counts = example_counts(lengths, validation, split, window, train_examples, train_lengths, next_items)
  return StreamedExamples(split, first_ids(counts), int(counts.sum()), dict(
      window=window, train_examples=train_examples, train_lengths=train_lengths, next_items=next_items,
      with_ratings=with_ratings))


def stream_to_dataset(users: tf.data.Dataset, make_examples, *, split: str, shuffle: bool, seed: int,
                      salt: int = 0, user_buffer: int = 4_096, example_buffer: int = 65_536) -> tf.data.Dataset:
  """`to_dataset` over streamed examples: every element carries `sample_seed` and `epoch`, `train` repeats
  forever. Shuffling is buffered (users, then examples), re-drawn every epoch from `seed`, `salt` and
  the epoch: the same examples and draws as in memory, visited in another order."""
  def epoch_ds(epoch):
    u = users
    if shuffle:
      u = u.shuffle(user_buffer, seed=_epoch_seed(seed, salt, epoch), reshuffle_each_iteration=False)
    ds = make_examples(u)
    if shuffle:
      ds = ds.shuffle(example_buffer, seed=_epoch_seed(seed, salt, epoch, 1_000_033), reshuffle_each_iteration=False)
    return ds.map(lambda x: {**x, "sample_seed": tf.constant(seed, tf.int64), "epoch": epoch})

  return _epochs(epoch_ds, split)
