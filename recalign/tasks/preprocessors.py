"""Rendering and dynamic sampling in TensorFlow: from (history, target) to `inputs` / `targets`.

Prompts are assembled at the token level from per-item token tables (tokenised once, when a task
is built) -- equal to tokenising the rendered text because all joins are at white space (see
`templates`) -- so the oldest history items can be dropped exactly to fit TASK_FEATURE_LENGTHS and
the target is never cut. Each example also carries its text (`inputs_pretokenized`, ...).

All randomness is stateless: `example_key` folds the example's sample seed (split and run seed, or
the evaluation seed), the task, the example's id and the epoch into a `tf.random.stateless_*` key.
"""

from __future__ import annotations

import functools
import inspect
import logging
import zlib
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from recalign.data.prepare import PreparedData, item_id
from recalign.data.vocab import continuation_encoder
from recalign.tasks import templates as tpl

RNG = tf.Tensor  # shape [2] int64 stateless key


# ---------------------------------------------------------------------------------------------
# Tables


class Options(dict):
  """A preprocessor's options (`make_preprocessor`'s keywords), which keep the tensors `table_tensors` made
  of them: every dataset of the task (training, each validation) captures the same ones."""
  tensors: Optional[dict] = None


def table_tensors(options: Mapping[str, object], strings: Sequence[str] = ()) -> dict:
  """`options` with its tables as eager tensors, for a tf.data map function to capture by reference:
  `log_popularity` (float32), `user_items` ((values, row lengths) -> RaggedTensor) and the lists of
  strings named in `strings`. Made inside the map function they would be graph constants, which tf.data
  copies into every graph it serialises and rewrites: one string table of 133k items cost +0.24 GiB of
  resident memory that way, +0.03 GiB captured; the negatives' table grows with the interactions.
  Made once per `Options` (later calls return the same tensors), afresh for a plain mapping."""
  if isinstance(options, Options) and options.tensors is not None:
    return options.tensors
  out = dict(options)
  with tf.init_scope():   # eagerly, even while a function is traced
    if "log_popularity" in out:
      out["log_popularity"] = tf.constant(out["log_popularity"], tf.float32)
    if out.get("user_items") is not None and not isinstance(out["user_items"], tf.RaggedTensor):
      out["user_items"] = tf.RaggedTensor.from_row_lengths(*out["user_items"])
    for k in strings:
      if k in out and not isinstance(out[k], tf.Tensor):
        out[k] = tf.constant(list(out[k]), tf.string)
  if isinstance(options, Options):
    options.tensors = out
  return out


class TokenTable:
  """Texts and their token ids; `tf()` gives (RaggedTensor [n, None] int32, string Tensor [n]), made
  once, eagerly (see `table_tensors`), and shared by every pipeline of the tasks that use the table."""

  def __init__(self, texts: list[str], tokens: Sequence[Sequence[int]] = (), *,
               flat: Optional[tuple[np.ndarray, np.ndarray]] = None):
    """`tokens`: one list per text, or `flat` = (values, row lengths) when they are built flat."""
    self.texts = list(texts)
    self.values, self.lengths = flat if flat is not None else (
        np.array([i for t in tokens for i in t], np.int32), np.array([len(t) for t in tokens], np.int64))
    self._tensors: Optional[tuple[tf.RaggedTensor, tf.Tensor]] = None

  def tf(self) -> tuple[tf.RaggedTensor, tf.Tensor]:
    if self._tensors is None:
      with tf.init_scope():
        self._tensors = (tf.RaggedTensor.from_row_lengths(self.values, self.lengths), tf.constant(self.texts))
    return self._tensors


class ItemTables:
  """Every rendering of every item, tokenised once. Entry rows N and N+1 are the mask and `None;`.

  Each ID has one tokenisation -- its tokens alone -- spliced between the tokens of the text around
  it (`Item ID:` before, `, Title: ...;` after, encoded as a continuation), so prompts, targets and
  the decoding trie agree even under a vocabulary that does not split digits (T5's).
  """

  def __init__(self, data: PreparedData, vocab, *, with_titles: bool = True,
               ids: Optional[list[str]] = None, item_prefix: bool = True):
    ids = list(ids) if ids is not None else [item_id(k) for k in range(data.num_items)]
    enc, cont = vocab.encode, continuation_encoder(vocab)
    id_tok = [list(enc(i)) for i in ids]
    prefix = list(enc(tpl.ENTRY_PREFIX)) if item_prefix else []
    suffixes = [tpl.entry_suffix(m.title, with_titles) for m in data.items]
    bare = [tpl.entry(i, m.title, with_titles, item_prefix) for i, m in zip(ids, data.items)]
    self.num_items = data.num_items
    self.mask_row, self.none_row = data.num_items, data.num_items + 1
    self.entry = TokenTable([b + ";" for b in bare] + [tpl.MASK + ";", "None;"],
                            [prefix + t + cont(x + ";") for t, x in zip(id_tok, suffixes)]
                            + [enc(tpl.MASK + ";"), enc("None;")])
    self.bare = TokenTable(bare, [prefix + t + cont(x) for t, x in zip(id_tok, suffixes)])
    self.id = TokenTable(ids, id_tok)
    self.id_comma = TokenTable([i + "," for i in ids], [t + cont(",") for t in id_tok])
    self.ids, self.id_tokens = ids, id_tok
    self.vocab, self.continuation = vocab, cont

  def fixed(self, text: str) -> "Fixed":
    return Fixed(text, self.vocab.encode(text))


class Fixed:
  def __init__(self, text: str, tokens: list[int]):
    self.text, self.tokens = text, tokens

  def tf(self) -> tuple[tf.Tensor, tf.Tensor]:
    return tf.constant(self.tokens, tf.int32), tf.constant(self.text)


# ---------------------------------------------------------------------------------------------
# Randomness


def salt(name: str) -> int:
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


def example_key(task_salt: int, ex: dict) -> RNG:
  """The stateless key of one example: (sample seed, task, example id, epoch).

  The sample seed (set by the source) folds in the split and the run's seed for training or the
  fixed evaluation seed otherwise, so no evaluation draw repeats a training draw.
  """
  key = tf.stack([tf.cast(ex["sample_seed"], tf.int64), tf.constant(task_salt, tf.int64)])
  key = tf.random.experimental.stateless_fold_in(key, tf.cast(ex["example_id"], tf.int64))
  return tf.random.experimental.stateless_fold_in(key, tf.cast(ex["epoch"], tf.int64))


def split_key(key: RNG, n: int) -> list[RNG]:
  return tf.unstack(tf.random.experimental.stateless_split(key, n))


def random_order(key: RNG, n: tf.Tensor) -> tf.Tensor:
  """A uniformly random permutation of range(n)."""
  return tf.argsort(tf.random.stateless_uniform([n], key))


def sample_negatives(key: RNG, log_popularity: tf.Tensor, exclude: tf.Tensor, k: int) -> tf.Tensor:
  """k distinct items drawn by popularity without replacement (Gumbel top-k), none in `exclude`.

  `log_popularity` is log(training count); items never seen in training get a large negative
  logit, so they are drawn only once every seen item is used up.
  """
  n = tf.shape(log_popularity)[0]
  banned = tf.scatter_nd(tf.cast(exclude[:, None], tf.int32), tf.ones_like(exclude, tf.bool), [n])
  u = tf.random.stateless_uniform([n], key, minval=1e-12, maxval=1.0)
  scores = tf.where(banned, -np.inf, log_popularity - tf.math.log(-tf.math.log(u)))
  return tf.math.top_k(scores, k).indices


# ---------------------------------------------------------------------------------------------
# Assembly


class Renderer:
  """TF-side rendering helpers over one task's tables (created inside the tf.data map function)."""

  def __init__(self, tables: ItemTables):
    self.t = tables
    self.entry_tok, self.entry_txt = tables.entry.tf()
    self.bare_tok, self.bare_txt = tables.bare.tf()
    self.id_tok, self.id_txt = tables.id.tf()
    self.idc_tok, self.idc_txt = tables.id_comma.tf()

  def entry_lengths(self, rows: tf.Tensor) -> tf.Tensor:
    return tf.gather(self.entry_tok.row_lengths(), rows)

  def items(self, rows: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`a; b; c;` for entry rows (`None;` when empty)."""
    rows = tf.cond(tf.size(rows) > 0, lambda: rows, lambda: tf.constant([self.t.none_row], tf.int32))
    return (tf.gather(self.entry_tok, rows).flat_values,
            tf.strings.reduce_join(tf.gather(self.entry_txt, rows), separator=" "))

  def item(self, idx: tf.Tensor, table: str = "bare") -> tuple[tf.Tensor, tf.Tensor]:
    tok, txt = getattr(self, f"{table}_tok"), getattr(self, f"{table}_txt")
    return tok[idx], txt[idx]

  def ids(self, items: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`I1, I2, I3` for a non-empty list of items."""
    head, last = items[:-1], items[-1]
    tok = tf.concat([tf.gather(self.idc_tok, head).flat_values, self.id_tok[last]], 0)
    txt = tf.strings.reduce_join(tf.concat([tf.gather(self.idc_txt, head), [self.id_txt[last]]], 0),
                                 separator=" ")
    return tok, txt

  @staticmethod
  def join(*parts: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    return tf.concat([p[0] for p in parts], 0), tf.strings.join([p[1] for p in parts], separator=" ")


def keep_recent(lengths: tf.Tensor, budget: tf.Tensor) -> tf.Tensor:
  """How many of the most recent items fit in `budget` tokens."""
  cum = tf.cumsum(tf.cast(lengths, tf.int64), reverse=True)
  return tf.reduce_sum(tf.cast(cum <= tf.cast(budget, tf.int64), tf.int32))


def keep_first(lengths: tf.Tensor, budget) -> tf.Tensor:
  """How many of the first items fit in `budget` tokens."""
  cum = tf.cumsum(tf.cast(lengths, tf.int64))
  return tf.reduce_sum(tf.cast(cum <= tf.cast(budget, tf.int64), tf.int32))


def truncate_oldest(rows: tf.Tensor, lengths: tf.Tensor, budget) -> tf.Tensor:
  n = keep_recent(lengths, budget)
  return rows[tf.size(rows) - n:]


def fixed_len(*parts: Fixed | tuple) -> int:
  return sum(len(p.tokens) for p in parts)


def output(inputs: tuple[tf.Tensor, tf.Tensor], targets: tuple[tf.Tensor, tf.Tensor]) -> dict:
  return {"inputs": inputs[0], "targets": targets[0],
          "inputs_pretokenized": inputs[1], "targets_pretokenized": targets[1]}


# ---------------------------------------------------------------------------------------------
# T5 span corruption


def _random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor, key: RNG) -> tf.Tensor:
  """Splits num_items into num_segments random positive lengths (summing to num_items)."""
  first = tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32)
  first = tf.gather(first, random_order(key, num_items - 1))
  segment_id = tf.cumsum(tf.pad(first, [[1, 0]]))
  return tf.math.unsorted_segment_sum(tf.ones_like(segment_id), segment_id, num_segments)


def random_spans_noise_mask(length: tf.Tensor, key: RNG, noise_density: float = 0.2,
                            mean_noise_span_length: float = 3.0) -> tf.Tensor:
  """T5's noise mask: round(length * density) noise tokens in spans of mean length 3; the
  sequence starts with a non-noise span. Needs length >= 2."""
  lf = tf.cast(length, tf.float32)
  num_noise = tf.clip_by_value(tf.cast(tf.round(lf * noise_density), tf.int32), 1, length - 1)
  num_spans = tf.maximum(tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length),
                                 tf.int32), 1)
  num_spans = tf.minimum(num_spans, length - num_noise)  # every span needs a non-noise partner
  k1, k2 = split_key(key, 2)
  noise = _random_segmentation(num_noise, num_spans, k1)
  nonnoise = _random_segmentation(length - num_noise, num_spans, k2)
  interleaved = tf.reshape(tf.stack([nonnoise, noise], axis=1), [-1])
  starts = tf.cumsum(interleaved)[:-1]
  indicator = tf.math.unsorted_segment_sum(tf.ones_like(starts), starts, length)
  return tf.equal(tf.math.floormod(tf.cumsum(indicator), 2), 1)


def spans_to_sentinels(tokens: tf.Tensor, mask: tf.Tensor, vocab_size: int) -> tf.Tensor:
  """Replaces each masked span with one sentinel: <extra_id_0> = vocab_size - 1, then downwards."""
  prev = tf.pad(mask[:-1], [[1, 0]])
  first = tf.logical_and(mask, tf.logical_not(prev))
  sentinel = vocab_size - tf.cumsum(tf.cast(first, tf.int32))
  return tf.boolean_mask(tf.where(first, sentinel, tokens), tf.logical_not(tf.logical_and(mask, prev)))


def span_corruption(tokens: tf.Tensor, key: RNG, vocab_size: int, noise_density: float = 0.2,
                    mean_noise_span_length: float = 3.0) -> tuple[tf.Tensor, tf.Tensor]:
  mask = random_spans_noise_mask(tf.size(tokens), key, noise_density, mean_noise_span_length)
  return (spans_to_sentinels(tokens, mask, vocab_size),
          spans_to_sentinels(tokens, tf.logical_not(mask), vocab_size))


def span_corruption_targets_length(n: int, noise_density: float = 0.2,
                                   mean_noise_span_length: float = 3.0) -> int:
  """Target length (without EOS) that span corruption produces for n tokens."""
  noise = min(max(int(round(n * noise_density)), 1), max(n - 1, 1))
  spans = min(max(int(round(noise / mean_noise_span_length)), 1), max(n - noise, 1))
  return noise + spans  # one sentinel per noise span (the sequence ends with a noise span)


def max_source_tokens(targets_budget: int, noise_density: float = 0.2,
                      mean_noise_span_length: float = 3.0) -> int:
  """The longest source whose span-corruption targets fit in `targets_budget` tokens."""
  n = 2
  while span_corruption_targets_length(n + 1, noise_density, mean_noise_span_length) <= targets_budget:
    n += 1
  return n


# ---------------------------------------------------------------------------------------------
# Tasks: each builds (inputs, targets) for one example.

TaskFn = Callable[..., dict]


def retrieval(ex, key, r: Renderer, fx: dict, budget: tf.Tensor, *, targets_budget, window: int = 20,
              next_items: int = 1, words: bool = True) -> dict:
  """History -> the next item's ID. A continuation row (`following`, see `sources.build_examples`):
  the split point b is drawn in the row's chunk each epoch, the targets are the IDs of the next
  `next_items` items after b, in order (`id id id`: each ID starts with its word boundary), as many as
  fit the targets (the first always), the history the `window` - 1 items before b. `words=False`: the
  prompt is the history alone, without the template's words."""
  history = ex["history"]
  if "following" not in ex:
    items = ex["target"][None]
  else:
    full = tf.concat([history, [ex["target"]], ex["following"]], 0)
    span = tf.minimum(next_items, 1 + tf.size(ex["following"]))
    b = tf.size(history) + tf.random.stateless_uniform([], key, minval=0, maxval=span, dtype=tf.int32)
    history, items = full[tf.maximum(0, b - (window - 1)):b], full[b:b + next_items]
    items = items[:tf.maximum(1, keep_first(tf.gather(r.id_tok.row_lengths(), items), targets_budget))]
  frame = (fx["history"], fx["retrieval"]) if words else ()
  hist = truncate_oldest(history, r.entry_lengths(history), budget - fixed_len(*frame))
  inputs = r.join(fx["history"].tf(), r.items(hist), fx["retrieval"].tf()) if words else r.items(hist)
  return output(inputs,
                (tf.gather(r.id_tok, items).flat_values, tf.strings.reduce_join(tf.gather(r.id_txt, items),
                                                                                separator=" ")))


def owned_items(ex, user_items) -> tf.Tensor:
  """Every item of the example's user (what its negatives exclude): from the per-user table, or, with
  none (None: streamed examples), from the example itself (`stream_examples`' `with_user_items`)."""
  return ex["user_items"] if user_items is None else user_items[ex["user"]]


def ranking(ex, key, r: Renderer, fx: dict, budget: tf.Tensor, *, log_popularity, user_items,
            num_candidates: int) -> dict:
  k_neg, k_pos = split_key(key, 2)
  negatives = sample_negatives(k_neg, log_popularity, owned_items(ex, user_items), num_candidates - 1)
  cands = tf.concat([[ex["target"]], negatives], 0)
  cands = tf.gather(cands, random_order(k_pos, num_candidates))  # random position of the positive
  cand_tok, cand_txt = r.ids(cands)
  need = fixed_len(fx["history"], fx["ranking"]) + tf.size(cand_tok)
  check = tf.debugging.assert_less_equal(
      need, tf.cast(budget, tf.int32),
      message=f"ranking: the template and {num_candidates} candidate IDs do not fit in "
              "TASK_FEATURE_LENGTHS['inputs']; raise it (about 8 tokens per candidate)")
  with tf.control_dependencies([check]):
    hist = truncate_oldest(ex["history"], r.entry_lengths(ex["history"]), budget - need)
  out = output(r.join(fx["history"].tf(), r.items(hist), fx["ranking"].tf(), (cand_tok, cand_txt)),
               r.item(ex["target"], "id"))
  out["candidates"] = cands
  return out


def rating(ex, key, r: Renderer, fx: dict, budget: tf.Tensor) -> dict:
  cand = r.item(ex["target"], "bare")
  need = fixed_len(fx["liked"], fx["disliked"], fx["rating"]) + tf.size(cand[0]) + 4  # + 2x "None;"
  hist = ex["history"]
  n = keep_recent(r.entry_lengths(hist), tf.cast(budget, tf.int32) - need)
  hist, hr = hist[tf.size(hist) - n:], ex["history_rating"][tf.size(hist) - n:]
  liked, disliked = tf.boolean_mask(hist, hr > 3), tf.boolean_mask(hist, hr <= 3)
  label = ex["target_rating"] > 3
  inputs = r.join(fx["liked"].tf(), r.items(liked), fx["disliked"].tf(), r.items(disliked),
                  fx["rating"].tf(), cand)
  yes, no = fx["yes"].tf(), fx["no"].tf()
  targets = (tf.where(label, yes[0], no[0]), tf.where(label, yes[1], no[1]))
  out = output(inputs, targets)
  out["label"] = tf.cast(label, tf.int32)
  return out


def mim(ex, key, r: Renderer, fx: dict, budget: tf.Tensor, *, targets_budget, mask_rate: float) -> dict:
  """Masks ~`mask_rate` of the window's items; the targets are the masked items in order.

  Inputs and targets are budgeted together: the window keeps its newest items that fit the inputs
  (counted unmasked), items whose entry alone exceeds the targets are never masked, and masks that
  would overflow the targets stay visible -- a target is never cut. A window with nothing maskable
  yields no example (`_ok`).
  """
  window = tf.concat([ex["history"], [ex["target"]]], 0)
  cost = r.entry_lengths(window)           # tokens an item adds to the targets when masked
  shown = tf.maximum(cost, r.entry_lengths([r.t.mask_row])[0])   # ...and at most to the inputs
  window = truncate_oldest(window, shown, budget - fixed_len(fx["history"], fx["mim"]))
  cost = cost[tf.size(cost) - tf.size(window):]
  n = tf.size(window)
  num_mask = tf.maximum(1, tf.cast(tf.round(tf.cast(n, tf.float32) * mask_rate), tf.int32))
  order = random_order(key, n)
  fits = tf.gather(cost, order) <= tf.cast(targets_budget, cost.dtype)
  order = tf.concat([tf.boolean_mask(order, fits), tf.boolean_mask(order, ~fits)], 0)[:num_mask]
  order = order[:keep_first(tf.gather(cost, order), targets_budget)]
  masked_pos = tf.sort(order)
  is_masked = tf.scatter_nd(masked_pos[:, None], tf.ones_like(masked_pos, tf.bool), [n])
  rows = tf.where(is_masked, r.t.mask_row, window)
  out = output(r.join(fx["history"].tf(), r.items(rows), fx["mim"].tf()),
               r.items(tf.gather(window, masked_pos)))
  out["_ok"] = tf.size(masked_pos) > 0
  return out


def mlm(ex, key, r: Renderer, fx: dict, budget: tf.Tensor, *, targets_budget: tf.Tensor,
        window_size: int, vocab_size: int, noise_density: float, mean_noise_span_length: float,
        max_source: int) -> dict:
  window = tf.concat([ex["history"], [ex["target"]]], 0)
  n = tf.size(window)
  k_len, k_start, k_span = split_key(key, 3)
  hi = tf.minimum(n, window_size)
  lo = tf.minimum(2, hi)
  length = tf.random.stateless_uniform([], k_len, minval=lo, maxval=hi + 1, dtype=tf.int32)
  start = tf.random.stateless_uniform([], k_start, minval=0, maxval=n - length + 1, dtype=tf.int32)
  sub = window[start:start + length]
  sub = truncate_oldest(sub, r.entry_lengths(sub), tf.minimum(tf.cast(budget, tf.int32), max_source))
  tokens, text = r.items(sub)
  inputs, targets = span_corruption(tokens, k_span, vocab_size, noise_density, mean_noise_span_length)
  # The *_pretokenized fields hold the source text before corruption.
  return {"inputs": inputs, "targets": targets, "inputs_pretokenized": text, "targets_pretokenized": text}


def bpr(ex, key, r: Renderer, fx: dict, budget: tf.Tensor, *, targets_budget, log_popularity,
        user_items) -> dict:
  """History + two candidates (the true next item, one popularity-sampled negative, random order)
  -> the true next item's entry. An answer longer than the targets is skipped (`_ok`), never cut."""
  k_neg, k_pos = split_key(key, 2)
  negative = sample_negatives(k_neg, log_popularity, owned_items(ex, user_items), 1)
  pair = tf.gather(tf.concat([[ex["target"]], negative], 0), random_order(k_pos, 2))
  pair_tok, pair_txt = r.items(pair)
  need = fixed_len(fx["history"], fx["bpr"]) + tf.size(pair_tok)
  hist = truncate_oldest(ex["history"], r.entry_lengths(ex["history"]), tf.cast(budget, tf.int32) - need)
  answer = r.item(ex["target"], "bare")
  out = output(r.join(fx["history"].tf(), r.items(hist), fx["bpr"].tf(), (pair_tok, pair_txt)), answer)
  out["candidates"] = pair
  out["_ok"] = (tf.size(answer[0]) <= tf.cast(targets_budget, tf.int32)) & (need <= tf.cast(budget, tf.int32))
  return out


def item_qa(ex, key, r: Renderer, fx: dict, budget: tf.Tensor, *, targets_budget) -> dict:
  """Static question/answer pairs (already tokenised); pairs that do not fit are skipped, never cut."""
  out = {k: ex[k] for k in ("inputs", "targets", "inputs_pretokenized", "targets_pretokenized")}
  out["_ok"] = ((tf.size(ex["inputs"]) <= tf.cast(budget, tf.int32))
                & (tf.size(ex["targets"]) <= tf.cast(targets_budget, tf.int32)))
  return out


TASK_FNS: dict[str, TaskFn] = {"retrieval": retrieval, "ranking": ranking, "rating": rating,
                               "mim": mim, "mlm": mlm, "bpr": bpr, "item_qa": item_qa}


def fixed_texts(tables: ItemTables, templates: tpl.Templates) -> dict[str, Fixed]:
  t = templates
  return {name: tables.fixed(text) for name, text in {
      "history": t.history, "retrieval": t.retrieval, "ranking": t.ranking, "liked": t.liked,
      "disliked": t.disliked, "rating": t.rating, "mim": t.mim, "bpr": t.bpr,
      "yes": "yes", "no": "no"}.items()}


_REPORTED: set = set()


def report_skips(kind: str, task_name: str, tables: ItemTables, lengths: dict, qa_lengths=None) -> None:
  """Logs, once per task and lengths, what the length limits make a task skip (never cut)."""
  targets_budget = lengths.get("targets", 1 << 20) - 1
  inputs_budget = lengths.get("inputs", 1 << 20) - 1
  if kind == "mim":
    n = int((tables.entry.lengths[:tables.num_items] > targets_budget).sum())
    what = f"{n} of {tables.num_items} items have an entry longer than the targets and are never masked"
  elif kind == "bpr":
    n = int((tables.bare.lengths > targets_budget).sum())
    what = f"{n} of {tables.num_items} items have an entry longer than the targets: examples answering them are skipped"
  elif kind == "item_qa" and qa_lengths is not None:
    n = int(((qa_lengths[0] > inputs_budget) | (qa_lengths[1] > targets_budget)).sum())
    what = f"{n} of {len(qa_lengths[0])} question/answer pairs do not fit and are skipped"
  else:
    return
  key = (task_name, inputs_budget, targets_budget)
  if n and key not in _REPORTED:
    _REPORTED.add(key)
    logging.warning("%s at lengths %s: %s", task_name, dict(lengths), what)


# What the preprocessor computes from the sequence length / vocabulary and hands to the task functions
# that name it; everything else a task function takes is a task option (`make_preprocessor(**options)`).
CONTEXT = ("targets_budget", "max_source", "vocab_size")


def task_options(kind: str) -> tuple[str, ...]:
  """The options a task kind takes (its function's keyword-only parameters, minus CONTEXT)."""
  params = inspect.signature(TASK_FNS[kind]).parameters.values()
  return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in CONTEXT)


def preprocess(ds: tf.data.Dataset, sequence_length: Optional[Mapping[str, int]] = None, *, kind: str,
               tables: ItemTables, templates: tpl.Templates, task_name: str, options: Mapping[str, object],
               qa_lengths=None) -> tf.data.Dataset:
  """A seqio preprocessor (bound with functools.partial by `make_preprocessor`): examples of a source
  -> token `inputs` / `targets` (+ `*_pretokenized`, `user`, `example_id`, `epoch`, `target_item`).

  Inputs and targets always fit `sequence_length` whole: prompts drop their oldest history items,
  and an example whose target cannot fit is skipped (counted in the log), never cut.
  """
  fn = TASK_FNS[kind]
  fx = fixed_texts(tables, templates)
  task_salt = salt(task_name)
  lengths = sequence_length or {}
  budget = lengths.get("inputs", 1 << 20) - 1   # room for EOS
  targets_budget = lengths.get("targets", 1 << 20) - 1
  report_skips(kind, task_name, tables, lengths, qa_lengths)
  wanted = set(inspect.signature(fn).parameters)
  context = {"targets_budget": targets_budget,
             "max_source": max_source_tokens(min(targets_budget, 4096), options.get("noise_density", 0.2),
                                             options.get("mean_noise_span_length", 3.0)),
             "vocab_size": getattr(tables.vocab, "sentinel_top", tables.vocab.vocab_size)}
  context = {k: v for k, v in context.items() if k in wanted}

  tensors = table_tensors(options)   # captured by the map below, not copied into its graph

  def map_fn(ex):
    kwargs = dict(tensors)
    key = example_key(task_salt, ex) if "sample_seed" in ex else None
    out = fn(ex, key, Renderer(tables), fx, tf.constant(budget), **context, **kwargs)
    out.setdefault("_ok", tf.constant(True))
    for k in ("user", "example_id", "epoch"):
      if k in ex:
        out[k] = ex[k]
    if "target" in ex:
      out["target_item"] = ex["target"]
    return out

  ds = ds.map(map_fn, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.filter(lambda x: x["_ok"])
  return ds.map(lambda x: {k: v for k, v in x.items() if k != "_ok"}, num_parallel_calls=tf.data.AUTOTUNE)


def make_preprocessor(kind: str, tables: ItemTables, templates: tpl.Templates, *, task_name: str,
                      qa_lengths=None, **options) -> functools.partial:
  """`preprocess` bound to one task: its kind's function and options (checked here: an option the
  task function does not take, e.g. a misspelt one, is a TypeError naming the ones it takes)."""
  if kind not in TASK_FNS:
    raise ValueError(f"unknown task kind {kind!r}; kinds: {', '.join(TASK_FNS)}")
  unknown = set(options) - set(task_options(kind))
  if unknown:
    raise TypeError(f"{task_name}: the {kind} task takes no option {', '.join(sorted(unknown))} "
                    f"(it takes: {', '.join(task_options(kind)) or 'none'})")
  return functools.partial(preprocess, kind=kind, tables=tables, templates=templates, task_name=task_name,
                           options=Options(options), qa_lengths=qa_lengths)
