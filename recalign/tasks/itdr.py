"""ITDR's instruction sub-tasks as seqio tasks (Liu, Huang, Sang: "An Instruction Tuning Dataset for
Enhancing Large Language Models in Recommendations"; the wording is ../shared/specs/itdr.md's).

    rt.register_dataset("data/ml100k", config=rt.TaskConfig(itdr=True))
    # ml100k_itdr_rp, _itdr_tkr, _itdr_nir, _itdr_uap; mixtures ml100k_itdr, ml100k_ut_at_itdr
    rt.register_cross_domain("data/beauty", "data/fashion")       # beauty_to_fashion_itdr_cdr

Each example is the sub-task's instruction (task description) + its input -> its output, as text:
  RP   10 rated items, in time order -> the rating of the next one ("4"); ratings data only.
  TKR  5 history items + 10 candidates (the 5 next items + 5 sampled negatives, shuffled) -> the
       10 candidates ordered, positives first ("1. <title> 2. <title> ...").
  NIR  5 history items + 5 candidates (the next item + 4 negatives) -> the next item's title.
  UAP  the user's liked items (rating > 3) with their genres -> "age group:25-34,gender:M,occupation:...".
  CDR  5 items of a source domain + 5 of the target domain + 10 target candidates -> ordered as TKR.
  IR, TUI  need review text and references written by a large LLM, which none of our data has: their
       templates are here (`ir_input`, `tui_input`) for `register_text_task` with a user's references.
Negatives (popularity-sampled, or uniform) and candidate order are re-drawn every epoch from stateless
keys, as the paper's tasks do. Text is rendered in TensorFlow and tokenised by seqio; an example that
does not fit TASK_FEATURE_LENGTHS is dropped with a printed line (never cut).

Splits never put a held-out interaction into a training sample:
  RP, NIR follow the leave-one-out split: the validation / test item is the target, training windows
    slide over the training items.
  TKR, CDR need 5 held-out positives, UAP a held-out user: `eval_users` draws validation and test users
    (each `TaskConfig.itdr_eval_users`, among users with >= 11 interactions) whose last 5 items are the
    positives; those 5 items are removed from the training items of *every* task registered with
    `itdr=True` (`train_lengths`), so no task of the mixture trains on them. UAP trains on the other users.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import zlib
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from recalign.data.ingest import Domain
from recalign.data.prepare import PreparedData, Ragged, item_id
from recalign.tasks import preprocessors as pp
from recalign.tasks import sources

KINDS = ("rp", "tkr", "nir", "uap", "cdr")
DESCRIPTIONS = {
    "rp": "The objective of the rating prediction task is to thoroughly explore users' preferences toward "
          "items (e.g., movies, products, music, books, etc.) based on their historical rating records. By "
          "extracting insights from the rating data to identify the types of items users prefer or dislike, "
          "the task aims to accurately predict users' ratings for new items.",
    "tkr": "The primary goal of Top-K recommendation is to select the K items most likely to attract the user "
           "from a candidate set based on their historical behavior or preferences, and present them in a "
           "ranked list.",
    "cdr": "The goal of cross-domain recommendation is to predict a user's behavior in the target domain based "
           "on their historical behavior in the source domain, thereby achieving effective utilization of "
           "cross-domain information and improving recommendation performance.",
    "nir": "The primary goal of next-item recommendation is to predict the item that a user is most likely to "
           "interact with or be interested in next, based on their historical behavior sequence (such as "
           "clicks, purchases, or views).",
    "uap": "The objective of attribute prediction is to infer implicitly expressed static attributes (e.g., "
           "age, gender, income, education level) from user behavioral data (e.g., browsing, purchases, social "
           "interactions), thereby completing fundamental dimensions of user profiles to support "
           "differentiated recommendation strategies.",
    "ir": "The objective of interest recognition is to infer and categorize user interests based on behavioral "
          "data, thereby providing interpretable and actionable interest dimensions for personalized "
          "recommendation systems.",
    "tui": "The objective of target user identification is to accurately pinpoint the user groups most likely to "
           "exhibit positive feedback (e.g., clicks, purchases, high ratings) by analyzing the alignment between "
           "item characteristics and user profiles, thereby providing targeted distribution guidance for "
           "recommendation systems.",
}
HISTORY, POSITIVES, NIR_CANDIDATES, RP_CONTEXT, MIN_EVAL_INTERACTIONS = 5, 5, 5, 10, 11


@dataclasses.dataclass(frozen=True)
class Words:
  """The domain words of ITDR's templates (its examples say "short video", "anime", "products")."""
  items: str = "products"          # "rank the <items> in the candidate list"
  item: str = "product"            # "select the next <item>"
  records: str = "product purchase"   # "Given a user's <records> records"
  history: str = "purchase"        # "Based on the <history> history"
  gerund: str = "purchasing"       # "the likelihood of the user <gerund> them next"
  verb_past: str = "purchased"     # "A user has <verb_past> and rated"
  verb: str = "purchase"           # "most likely to <verb>"
  user: str = "shopping"           # "Given that a <user> user has ..."
  list_name: str = "Product"       # CDR's "Product list:"


MOVIE_WORDS = Words("movies", "movie", "movie watching", "watching", "watching", "watched", "watch", "movie", "Movie")


def words(domain: Domain) -> Words:
  return MOVIE_WORDS if domain.verb == "watch" else Words()


# ---------------------------------------------------------------------------------------------
# Templates (plain Python: what the tests read; the TF renderers below produce the same strings)


# Inputs with placeholders: {words} fields, then the parts each example fills in.
TEMPLATES = {
    "rp": ("A user has {verb_past} and rated the following {items} with ratings: {rated}. "
           "Predict his rating for {title}."),
    "tkr": "Given a user's {records} records in chronological order as follows: {history_list} Based on the {history} "
           "history, please rank the {items} in the candidate list by the likelihood of the user {gerund} them next "
           "from highest to lowest. Candidate list: {candidate_list}",
    "nir": "Given that a {user} user has {verb_past} the following {items} in chronological order: [{history_list}], "
           "please select the next {item} the user is most likely to {verb} from the candidate list: "
           "[{candidate_list}]",
    "uap": "The user's {item} preferences are as follows: He/She likes {gerund} {liked}. Based on the user's {item} "
           "preferences, predict his/her age group, gender, and occupation.",
    "cdr": "A user's {history} history in the {source_domain} domain is as follows: {source_list} and in the "
           "{target_domain} domain is as follows: {history_list} Based on this information, please rank the "
           "following list of {items} in the {target_domain} domain in order of the likelihood that the user will "
           "{verb} them next, from highest to lowest. {list_name} list: {candidate_list}",
}


def template(kind: str, w: Words, **fixed: str) -> str:
  """TEMPLATES[kind] with the domain words (and `fixed`) filled in; the example's parts stay {named}."""
  parts = set(re.findall(r"\{(\w+)\}", TEMPLATES[kind])) - set(dataclasses.asdict(w)) - set(fixed)
  return TEMPLATES[kind].format(**dataclasses.asdict(w), **fixed, **{p: "{" + p + "}" for p in parts})


def numbered(titles: Sequence[str]) -> str:
  return " ".join(f"{i}. {t}" for i, t in enumerate(titles, 1))


def rating_text(r: float) -> str:
  return f"{float(r):g}"


def rp_input(w: Words, titles: Sequence[str], ratings: Sequence[float], title: str) -> str:
  rated = ", ".join(f"{t} ({rating_text(r)})" for t, r in zip(titles, ratings))
  return template("rp", w).format(rated=rated, title=title)


def tkr_input(w: Words, history: Sequence[str], candidates: Sequence[str]) -> str:
  return template("tkr", w).format(history_list=numbered(history), candidate_list=numbered(candidates))


def nir_input(w: Words, history: Sequence[str], candidates: Sequence[str]) -> str:
  """`history` and `candidates` are "<title>:<category>" strings."""
  return template("nir", w).format(history_list=", ".join(f"'{i}.{h}'" for i, h in enumerate(history, 1)),
                                   candidate_list=", ".join(f"'{c}'" for c in candidates))


def uap_input(w: Words, liked: Sequence[str]) -> str:
  """`liked`: "<title>: <category>" strings."""
  return template("uap", w).format(liked=", ".join(liked))


def uap_target(age_group: str, gender: str, occupation: str) -> str:
  return f"age group:{age_group},gender:{gender},occupation:{occupation}."


def cdr_input(source_domain: str, target_domain: str, w: Words, source: Sequence[str], target: Sequence[str],
              candidates: Sequence[str]) -> str:
  return template("cdr", w, source_domain=source_domain, target_domain=target_domain).format(
      source_list=numbered(source), history_list=numbered(target), candidate_list=numbered(candidates))


def ir_input(noun: str, liked: Sequence[tuple[str, str]], disliked: Sequence[tuple[str, str]], focus: str) -> str:
  """IR (ITDR's book example: noun "book", focus "reading interests, focusing on the types of books,
  styles, and authors the user may prefer")."""
  lines = [f"A user has given the following {noun} reviews:", f"Liked {noun}s:",
           *(f"{t}: {r}" for t, r in liked), f"Disliked {noun}s:", *(f"{t}: {r}" for t, r in disliked),
           f"Based on these reviews, briefly summarize the user's {focus}."]
  return "\n".join(lines)


def tui_input(noun: str, name: str, attributes: Mapping[str, str], reviews: Sequence[str]) -> str:
  attrs = ", ".join(f"{k}: {v}" for k, v in attributes.items())
  return (f"The attributes of the {noun} {name} are as follows: {attrs}, Customers' comments on the {noun} are as "
          f"follows: {numbered(reviews)} Based on the attributes and the reviews, briefly describe which user "
          f"groups this {noun} is suitable for recommending.")


def instruction(kind: str, text: str) -> str:
  """The instruction (task description) prepended to the input."""
  return f"{DESCRIPTIONS[kind]} {text}"


# MovieLens 1M's age groups (ITDR's UAP output); ml-100k has exact ages, bucketed here.
AGE_GROUPS = (("Under 18", 0, 17), ("18-24", 18, 24), ("25-34", 25, 34), ("35-44", 35, 44), ("45-49", 45, 49),
              ("50-55", 50, 55), ("56+", 56, 200))
AGE_MIDPOINTS = {"Under 18": 15.0, "18-24": 21.0, "25-34": 29.5, "35-44": 39.5, "45-49": 47.0, "50-55": 52.5,
                 "56+": 60.0}


def age_group(age: str | int) -> str:
  a = int(float(age))
  return next(name for name, lo, hi in AGE_GROUPS if lo <= a <= hi)


# ---------------------------------------------------------------------------------------------
# Item texts


def category(categories: Sequence[str]) -> str:
  """One category string: the leaf of a category path ("Beauty > Skin Care > Face" -> "Face"); several
  flat genres joined by "/" ("Comedy/Musical")."""
  return "/".join(c.split(" > ")[-1].strip() for c in categories)


def item_titles(data: PreparedData, vocab, max_title_tokens: int) -> list[str]:
  """Every item's title, cut to its first `max_title_tokens` tokens (Amazon titles run to hundreds of
  tokens; ten of them must fit a prompt); items without a title are named by their ID."""
  out = []
  for k, m in enumerate(data.items):
    t = m.title or item_id(k)
    tok = vocab.encode(t)
    out.append(vocab.decode(tok[:max_title_tokens]).strip() if len(tok) > max_title_tokens else t)
  return out


# ---------------------------------------------------------------------------------------------
# Examples (numpy): which items each sample shows, by split


def sequence_lengths(data: PreparedData) -> np.ndarray:
  """Every user's number of interactions (what `eval_users` and `train_lengths` read; a streamed data set's
  `tfds_data.index` gives the same without loading the users)."""
  return Ragged.of(data.sequences, np.int32).lengths().astype(np.int64)


def eval_users(lengths: np.ndarray, per_split: int, seed: int) -> dict[str, np.ndarray]:
  """Validation and test users of the held-out-user tasks (TKR, CDR, UAP): users with >= 11
  interactions (ITDR's minimum; `lengths`: per user), a seeded draw, disjoint."""
  eligible = np.flatnonzero(np.asarray(lengths) >= MIN_EVAL_INTERACTIONS).astype(np.int64)
  order = np.random.default_rng([seed, zlib.crc32(b"itdr")]).permutation(eligible)
  n = min(per_split, len(order) // 3)   # leave most eligible users for training
  return {"test": np.sort(order[:n]), "validation": np.sort(order[n:2 * n])}


def train_lengths(lengths: np.ndarray, held: Mapping[str, np.ndarray]) -> np.ndarray:
  """Per user, how many leading items training may use: all but the last two (leave-one-out), and
  all but the last POSITIVES for the held-out users (their positives)."""
  lengths = np.asarray(lengths, np.int64)
  n = lengths - 2
  for users in held.values():
    n[users] = lengths[users] - POSITIVES
  return n


def _windows(seq: np.ndarray, size: int) -> list[np.ndarray]:
  return [seq[s:s + size] for s in range(len(seq) - size + 1)]


def list_records(data: PreparedData, split: str, held: Mapping[str, np.ndarray],
                 lengths: np.ndarray) -> sources.Records:
  """TKR: 5 history items and the 5 that follow (the positives). Training: every window of 10 training
  items; validation / test: the held-out users' last 10 items."""
  rows = []
  if split == "train":
    for u in range(data.num_users):
      rows += [(u, w) for w in _windows(data.sequences[u][:lengths[u]], HISTORY + POSITIVES)]
  else:
    rows = [(int(u), data.sequences[u][-(HISTORY + POSITIVES):]) for u in held[split]]
  return sources.Records({"user": np.array([r[0] for r in rows], np.int32),
                          "history": np.array([r[1][:HISTORY] for r in rows], np.int32).reshape(-1, HISTORY),
                          "positives": np.array([r[1][HISTORY:] for r in rows], np.int32).reshape(-1, POSITIVES)})


def next_item_records(data: PreparedData, split: str, lengths: np.ndarray, context: int) -> sources.Records:
  """NIR (context 5) and RP (context 10): `context` items, then the target. Training: windows over the
  training items; validation / test: the leave-one-out targets (validation: the validation users)."""
  rows = []
  if split == "train":
    for u in range(data.num_users):
      rows += [(u, s, s + context) for s in range(int(lengths[u]) - context)]
  else:
    users = data.validation_users if split == "validation" else range(data.num_users)
    cut = 2 if split == "validation" else 1
    rows = [(int(u), len(data.sequences[u]) - cut - context, len(data.sequences[u]) - cut) for u in users
            if len(data.sequences[u]) - cut >= context]
  cols = {"user": np.array([r[0] for r in rows], np.int32),
          "history": np.array([data.sequences[u][a:b] for u, a, b in rows], np.int32).reshape(-1, context),
          "target": np.array([data.sequences[u][b] for u, a, b in rows], np.int32)}
  if data.ratings is not None:
    cols["history_rating"] = np.array([data.ratings[u][a:b] for u, a, b in rows], np.float32).reshape(-1, context)
    cols["target_rating"] = np.array([data.ratings[u][b] for u, a, b in rows], np.float32)
  return sources.Records(cols)


UAP_FIELDS = ("age", "gender", "occupation")


def attributes_listed(manifest: Mapping) -> bool:
  """Whether a prepared data set's manifest lists the user attributes UAP answers (age, gender, occupation)."""
  return set(UAP_FIELDS) <= set(manifest.get("user_attributes", []))


def has_attributes(data: PreparedData) -> bool:
  return data.user_attributes is not None and attributes_listed(data.manifest)


def attribute_records(data: PreparedData, split: str, held: Mapping[str, np.ndarray], lengths: np.ndarray,
                      max_items: int) -> sources.Records:
  """UAP: the user's liked training items (rating > 3; every item without ratings), the most recent
  `max_items` in time order -> the attributes. Training: users not held out; validation / test: the
  held-out users. Users without the attributes (or without a liked item) yield no example."""
  heldout = set(np.concatenate(list(held.values())).tolist()) if held else set()
  users = held[split] if split != "train" else [u for u in range(data.num_users) if u not in heldout]
  rows = []
  for u in users:
    a = data.user_attributes[u]
    if not all(a.get(f) for f in UAP_FIELDS):
      continue
    seq = data.sequences[u][:lengths[u]]
    liked = seq if data.ratings is None else seq[data.ratings[u][:lengths[u]] > 3]
    if len(liked):
      rows.append((int(u), liked[-max_items:], uap_target(age_group(a["age"]), a["gender"], a["occupation"])))
  return sources.Records({"user": np.array([r[0] for r in rows], np.int32), "liked": [r[1] for r in rows],
                          "answer": np.array([r[2] for r in rows], dtype=object).astype(bytes)})


def _context(kind: str) -> int:
  """Items before the target of the next-item kinds (NIR, RP); TKR's windows: history and positives."""
  return {"rp": RP_CONTEXT, "nir": HISTORY, "tkr": HISTORY + POSITIVES}[kind]


def record_counts(kind: str, split: str, lengths: np.ndarray, validation: np.ndarray, train_lengths: np.ndarray,
                  held: Mapping[str, np.ndarray]) -> np.ndarray:
  """How many examples `list_records` (TKR) / `next_item_records` (NIR, RP) make of each user, from the
  sequence lengths alone: what numbers a streamed user's examples as the in-memory ones are numbered."""
  size, n = _context(kind), np.asarray(train_lengths, np.int64)
  if split == "train":
    return np.maximum(n - size + (kind == "tkr"), 0)
  if kind == "tkr":
    return np.isin(np.arange(len(lengths)), held[split]).astype(np.int64)
  fits = np.asarray(lengths) - (2 if split == "validation" else 1) >= size
  return (fits & validation if split == "validation" else fits).astype(np.int64)


def stream_records(users: tf.data.Dataset, kind: str, split: str, *, first_ids: np.ndarray, train_lengths: np.ndarray,
                   held_mask: Optional[np.ndarray], with_ratings: bool, with_user_items: bool) -> tf.data.Dataset:
  """`list_records` / `next_item_records` over a stream of user records (tfds_data's `users` split): the
  same rows, fields and `example_id`s, each user's made when its record is read. `held_mask`: TKR's
  held-out users of this split; `with_user_items`: each row also carries its user's items (`user_items`:
  what negative sampling excludes, as `sources.stream_examples` gives them)."""
  size = _context(kind)
  with tf.init_scope():   # eager tensors the map captures, not graph constants copied into it
    first, limit = tf.constant(first_ids, tf.int64), tf.constant(np.asarray(train_lengths, np.int64))
    held = None if held_mask is None else tf.constant(held_mask)

  def starts(r):   # where each row's items start
    n = tf.shape(r["items"], tf.int64)[0]
    if split == "train":
      return tf.range(tf.maximum(tf.gather(limit, r["user"]) - size + int(kind == "tkr"), 0))
    if kind == "tkr":
      return tf.range(n - size, n - size + tf.cast(tf.gather(held, r["user"]), tf.int64))
    start = n - (2 if split == "validation" else 1) - size
    ok = start >= 0 if split == "test" else (start >= 0) & r["validation"]
    return tf.range(start, start + tf.cast(ok, tf.int64))

  def rows(r):
    s = starts(r)
    count = tf.shape(s, tf.int64)[0]
    at = s[:, None] + tf.range(size, dtype=tf.int64)[None]
    out = {"example_id": tf.gather(first, r["user"]) + tf.range(count), "user": tf.fill([count], r["user"])}
    if kind == "tkr":
      window = tf.reshape(tf.gather(r["items"], at), [-1, size])
      out.update(history=window[:, :HISTORY], positives=window[:, HISTORY:])
    else:
      out.update(history=tf.reshape(tf.gather(r["items"], at), [-1, size]), target=tf.gather(r["items"], s + size))
      if with_ratings:
        out.update(history_rating=tf.reshape(tf.gather(r["ratings"], at), [-1, size]),
                   target_rating=tf.gather(r["ratings"], s + size))
    if with_user_items:
      out["user_items"] = sources.repeated_items(r["items"], count)
    return out

  if split == "validation" and kind != "tkr":
    users = users.filter(lambda r: r["validation"])
  return users.map(rows, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


@dataclasses.dataclass
class StreamedRecords(sources.StreamedExamples):
  """One split of an ITDR list / next-item task as `stream_records` makes it from user records: its count
  and every user's first example id (O(users)), nothing per example."""

  def make(self, users: tf.data.Dataset) -> tf.data.Dataset:
    return stream_records(users, split=self.split, first_ids=self.first_ids, **self.options)


def streamed_records(kind: str, split: str, lengths: np.ndarray, validation: np.ndarray, train_lengths: np.ndarray,
                     held: Mapping[str, np.ndarray], *, with_ratings: bool) -> StreamedRecords:
  """TKR / NIR / RP rows to be streamed (`list_records` / `next_item_records` without the users in memory)."""
  counts = record_counts(kind, split, lengths, validation, train_lengths, held)
  held_mask = np.isin(np.arange(len(lengths)), held[split]) if kind == "tkr" and split != "train" else None
  return StreamedRecords(split, sources.first_ids(counts), int(counts.sum()),
                         dict(kind=kind, train_lengths=train_lengths, held_mask=held_mask,
                              with_ratings=with_ratings and kind != "tkr", with_user_items=False))


# ---------------------------------------------------------------------------------------------
# Rendering in TensorFlow (stateless draws from the example's key, as the paper's tasks)


class ItemTexts:
  """Per-item strings the templates use: title and "<title>:<category>" (NIR), "<title>: <category>" (UAP)."""

  def __init__(self, titles: Sequence[str], categories: Sequence[str]):
    self.titles = list(titles)
    cats = [c or "unknown" for c in categories]
    self.title_cat = [f"{t}:{c}" for t, c in zip(titles, cats)]
    self.title_genre = [f"{t}: {c}" for t, c in zip(titles, cats)]
    self._tensors: dict[str, tf.Tensor] = {}

  def tensor(self, field: str) -> tf.Tensor:
    """One of the string lists as a tensor made once, eagerly (`pp.table_tensors` says why)."""
    if field not in self._tensors:
      with tf.init_scope():
        self._tensors[field] = tf.constant(getattr(self, field))
    return self._tensors[field]

  @classmethod
  def of(cls, data: PreparedData, vocab, max_title_tokens: int) -> "ItemTexts":
    return cls(item_titles(data, vocab, max_title_tokens), [category(m.categories) for m in data.items])


def _tf_numbered(texts: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
  nums = tf.strings.as_string(tf.range(1, tf.size(rows) + 1))
  return tf.strings.reduce_join(tf.strings.join([nums, tf.gather(texts, rows)], separator=". "), separator=" ")


def _tf_quoted(texts: tf.Tensor, rows: tf.Tensor, numbered_: bool) -> tf.Tensor:
  items = tf.gather(texts, rows)
  if numbered_:
    items = tf.strings.join([tf.strings.as_string(tf.range(1, tf.size(rows) + 1)), items], separator=".")
  return tf.strings.reduce_join(tf.strings.join(["'", items, "'"]), separator=", ")


def fill(template: str, **parts: tf.Tensor) -> tf.Tensor:
  """`template` with {name} placeholders filled by string tensors (literal text stays Python's)."""
  pieces = re.split(r"\{(\w+)\}", template)
  return tf.strings.join([parts[p] if i % 2 else p for i, p in enumerate(pieces)])


def _candidates(ex, key, positives: tf.Tensor, num_negatives: int, log_popularity, user_items) -> tuple:
  """(positives + sampled negatives in a random order, the negatives): negatives never in the user's items."""
  k_neg, k_order = pp.split_key(key, 2)
  negatives = pp.sample_negatives(k_neg, log_popularity, pp.owned_items(ex, user_items), num_negatives)
  cands = tf.concat([positives, negatives], 0)
  return tf.gather(cands, pp.random_order(k_order, tf.size(cands))), negatives


def _instruction(kind: str, text: tf.Tensor) -> tf.Tensor:
  return tf.strings.join([DESCRIPTIONS[kind], text], separator=" ")


def render_rp(ex, key, *, texts: ItemTexts, w: Words, **_) -> dict:
  titles = texts.tensor("titles")
  ratings = tf.strings.as_string(ex["history_rating"], shortest=True)
  rated = tf.strings.reduce_join(tf.strings.join([tf.gather(titles, ex["history"]), " (", ratings, ")"]),
                                 separator=", ")
  text = fill(template("rp", w), rated=rated, title=tf.gather(titles, ex["target"]))
  return {"inputs": _instruction("rp", text), "targets": tf.strings.as_string(ex["target_rating"], shortest=True),
          "target_item": ex["target"]}


def render_tkr(ex, key, *, texts: ItemTexts, w: Words, log_popularity, user_items, **_) -> dict:
  titles = texts.tensor("titles")
  cands, negatives = _candidates(ex, key, ex["positives"], POSITIVES, log_popularity, user_items)
  text = fill(template("tkr", w), history_list=_tf_numbered(titles, ex["history"]),
              candidate_list=_tf_numbered(titles, cands))
  return {"inputs": _instruction("tkr", text),
          "targets": _tf_numbered(titles, tf.concat([ex["positives"], negatives], 0)),
          "candidates": cands, "positives": ex["positives"]}


def render_nir(ex, key, *, texts: ItemTexts, w: Words, log_popularity, user_items, **_) -> dict:
  tc = texts.tensor("title_cat")
  cands, _ = _candidates(ex, key, ex["target"][None], NIR_CANDIDATES - 1, log_popularity, user_items)
  text = fill(template("nir", w), history_list=_tf_quoted(tc, ex["history"], True),
              candidate_list=_tf_quoted(tc, cands, False))
  return {"inputs": _instruction("nir", text), "targets": tf.gather(texts.tensor("titles"), ex["target"]),
          "candidates": cands, "target_item": ex["target"]}


def render_uap(ex, key, *, texts: ItemTexts, w: Words, **_) -> dict:
  liked = tf.strings.reduce_join(tf.gather(texts.tensor("title_genre"), ex["liked"]), separator=", ")
  return {"inputs": _instruction("uap", fill(template("uap", w), liked=liked)), "targets": ex["answer"]}


def render_cdr(ex, key, *, texts: ItemTexts, source_texts: ItemTexts, w: Words, domains: tuple[str, str],
               log_popularity, user_items, **_) -> dict:
  titles = texts.tensor("titles")
  cands, negatives = _candidates(ex, key, ex["positives"], POSITIVES, log_popularity, user_items)
  text = fill(template("cdr", w, source_domain=domains[0], target_domain=domains[1]),
              source_list=_tf_numbered(source_texts.tensor("titles"), ex["source_history"]),
              history_list=_tf_numbered(titles, ex["history"]), candidate_list=_tf_numbered(titles, cands))
  return {"inputs": _instruction("cdr", text),
          "targets": _tf_numbered(titles, tf.concat([ex["positives"], negatives], 0)),
          "candidates": cands, "positives": ex["positives"]}


# options of the renderers (RecLM's) that are per-user / per-item strings: tensors made outside the map
STRING_TABLES = ("titles", "profiles", "user_profiles", "item_profiles")
RENDER = {"rp": render_rp, "tkr": render_tkr, "nir": render_nir, "uap": render_uap, "cdr": render_cdr}


def render(ds: tf.data.Dataset, *, kind: str, task_name: str, options: Mapping[str, object],
           fn: Optional[Callable] = None) -> tf.data.Dataset:
  """A seqio preprocessor: examples -> `inputs` / `targets` text (+ `user`, `example_id`, `epoch`, and
  the candidates evaluation needs); tokenisation follows (`seqio.preprocessors.tokenize`). `fn(ex, key,
  **options)` renders one example (default: the ITDR task `kind`'s)."""
  fn, task_salt = fn or RENDER[kind], pp.salt(task_name)
  tensors = pp.table_tensors(options, strings=STRING_TABLES)   # captured by the map, not copied into its graph

  def map_fn(ex):
    kwargs = dict(tensors)
    out = fn(ex, pp.example_key(task_salt, ex), **kwargs)
    return {**out, **{k: ex[k] for k in ("user", "example_id", "epoch")}}

  return ds.map(map_fn, num_parallel_calls=tf.data.AUTOTUNE)


def drop_too_long(ds: tf.data.Dataset, sequence_length: Optional[Mapping[str, int]] = None, *,
                  task_name: str) -> tf.data.Dataset:
  """Drops (and prints) an example whose tokens exceed TASK_FEATURE_LENGTHS (EOS included), never cuts it."""
  if not sequence_length:
    return ds
  limits = {k: sequence_length[k] - 1 for k in ("inputs", "targets") if k in sequence_length}

  def ok(x):
    fits = tf.reduce_all([tf.size(x[k]) <= n for k, n in limits.items()])
    def report():
      tf.print(f"{task_name}: dropped an example longer than TASK_FEATURE_LENGTHS {dict(sequence_length)}: inputs",
               tf.size(x["inputs"]), "targets", tf.size(x["targets"]), "tokens")
      return fits
    return tf.cond(fits, lambda: fits, report)

  return ds.filter(ok)


def text_preprocessors(task_name: str) -> list:
  """Text `inputs` / `targets` -> tokens: seqio's tokenizer, overlong examples dropped (never cut), EOS."""
  return [seqio.preprocessors.tokenize, functools.partial(drop_too_long, task_name=task_name),
          seqio.preprocessors.append_eos_after_trim]


def preprocessors(kind: str, task_name: str, fn: Optional[Callable] = None, **options) -> list:
  return [functools.partial(render, kind=kind, task_name=task_name, options=pp.Options(options), fn=fn),
          *text_preprocessors(task_name)]


# ---------------------------------------------------------------------------------------------
# Parsing and metrics (also seqio metric_fns: they need only the target and the generated text)


def parse_numbered(text: str) -> list[str]:
  """"1. A 2. B 3. C" -> ["A", "B", "C"]: each entry starts at the next expected number."""
  out, pos, k = [], 0, 1
  starts = []
  while True:
    m = re.compile(rf"(?:^|\s){k}\.\s*").search(text, pos)
    if not m:
      break
    starts.append((m.start(), m.end()))
    pos, k = m.end(), k + 1
  for i, (_, end) in enumerate(starts):
    stop = starts[i + 1][0] if i + 1 < len(starts) else len(text)
    out.append(text[end:stop].strip())
  return out


def _norm(s: str) -> str:
  return " ".join(s.lower().split())


def match_titles(parsed: Sequence[str], candidates: Sequence[str], cutoff: float = 0.8) -> tuple[list[int], int]:
  """Candidate indices named by `parsed`, in order: exact (case- and space-insensitive) match, else the
  most similar unused candidate with similarity >= `cutoff`; repeats are ignored. Returns (indices,
  number of parsed entries matching no candidate)."""
  norm = [_norm(c) for c in candidates]
  used, out, unknown = set(), [], 0
  for p in parsed:
    q = _norm(p)
    free = [i for i in range(len(candidates)) if i not in used]
    exact = [i for i in free if norm[i] == q]
    if exact:
      i = exact[0]
    else:
      scores = [(difflib.SequenceMatcher(None, q, norm[i]).ratio(), i) for i in free]
      best = max(scores, default=(0.0, -1))
      if best[0] < cutoff:
        if not any(norm[i] == q for i in used):
          unknown += 1
        continue
      i = best[1]
    used.add(i)
    out.append(i)
  return out, unknown


def complete_ranking(named: Sequence[int], n: int, fallback: Sequence[int]) -> list[int]:
  """The named candidates first, then the others in `fallback` order (the order they were shown)."""
  seen = set(named)
  return list(named) + [i for i in fallback if i not in seen]


def list_metrics(rankings: Sequence[Sequence[int]], relevant: Sequence[set]) -> dict[str, float]:
  """NDCG@10, HR@1 and P@5 of ranked candidate lists with several relevant candidates each (binary gain)."""
  ndcg, hr1, p5 = [], [], []
  for ranked, rel in zip(rankings, relevant):
    gains = np.array([1.0 if c in rel else 0.0 for c in list(ranked)[:10]])
    disc = 1.0 / np.log2(np.arange(2, len(gains) + 2))
    ideal = (1.0 / np.log2(np.arange(2, min(len(rel), 10) + 2))).sum()
    ndcg.append(float((gains * disc).sum() / ideal) if ideal else 0.0)
    hr1.append(float(gains[:1].sum()))
    p5.append(float(gains[:5].sum() / 5))
  return {"ndcg@10": float(np.mean(ndcg)), "hr@1": float(np.mean(hr1)), "p@5": float(np.mean(p5))}


def random_list_baseline(n: int = 10, relevant: int = 5) -> dict[str, float]:
  """Expected list metrics of a uniformly random order of n candidates, `relevant` of them relevant."""
  q = relevant / n
  disc = 1.0 / np.log2(np.arange(2, min(n, 10) + 2))
  ideal = (1.0 / np.log2(np.arange(2, min(relevant, 10) + 2))).sum()
  return {"ndcg@10": float(q * disc.sum() / ideal), "hr@1": q, "p@5": q}


def as_text(x) -> str:
  return (x.decode() if isinstance(x, bytes) else str(x)).strip()


def seqio_list_metrics(targets: Sequence[str], predictions: Sequence[str], *, num_positives: int = POSITIVES
                       ) -> dict[str, float]:
  """TKR / CDR predict metric: the target lists the candidates, positives first; the generated list is
  parsed and matched; candidates it does not name follow in a fixed pseudo-random order."""
  rankings, relevant, unparsable = [], [], 0
  for t, p in zip(targets, predictions):
    cands = parse_numbered(as_text(t))
    named, _ = match_titles(parse_numbered(as_text(p)), cands)
    unparsable += not named
    order = np.random.default_rng(zlib.crc32(as_text(t).encode())).permutation(len(cands))
    rankings.append(complete_ranking(named, len(cands), order))
    relevant.append(set(range(num_positives)))
  return {**list_metrics(rankings, relevant), "unparsable": unparsable / max(len(targets), 1)}


def seqio_choice_metrics(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """NIR predict metric: HR@1 = the generated title is the target's (case- and space-insensitive)."""
  return {"hr@1": float(np.mean([_norm(as_text(t)) == _norm(as_text(p)) for t, p in zip(targets, predictions)]))}


def parse_rating(text: str) -> Optional[float]:
  """The answer as a number ("4", "4.5"); None unless the whole answer is one."""
  m = re.fullmatch(r"-?\d+(?:\.\d+)?", as_text(text).rstrip("."))
  return float(m.group()) if m else None


def rating_errors(truth: Sequence[float], predicted: Sequence[float]) -> dict[str, float]:
  err = np.asarray(predicted, np.float64) - np.asarray(truth, np.float64)
  return {"rmse": float(np.sqrt(np.mean(err ** 2))), "mae": float(np.mean(np.abs(err)))}


def seqio_rating_prediction_metrics(targets: Sequence[str], predictions: Sequence[str],
                                    scale: Optional[tuple[float, float]] = None) -> dict[str, float]:
  """RP predict metric: RMSE / MAE of the generated number. An answer that is not a number on the rating
  `scale` (default: the targets' range), e.g. "222222", counts as the scale's middle (and in `unparsable`)."""
  truth = [float(as_text(t)) for t in targets]
  lo, hi = scale or ((min(truth), max(truth)) if truth else (0.0, 0.0))
  parsed = [parse_rating(p) for p in predictions]
  parsed = [p if p is not None and lo <= p <= hi else None for p in parsed]
  out = rating_errors(truth, [(lo + hi) / 2 if p is None else p for p in parsed])
  return {**out, "unparsable": float(np.mean([p is None for p in parsed]))}


def parse_attributes(text: str) -> dict[str, str]:
  """"age group:25-34,gender:M,occupation:doctor." -> {"age group": "25-34", ...} (missing fields absent)."""
  out = {}
  for part in as_text(text).rstrip(".").split(","):
    k, sep, v = part.partition(":")
    if sep:
      out[k.strip().lower()] = v.strip()
  return out


def attribute_metrics(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """UAP: accuracy per field; age RMSE in years between the groups' midpoints (an unknown predicted
  group counts as the target's distance to the mean midpoint)."""
  t = [parse_attributes(x) for x in targets]
  p = [parse_attributes(x) for x in predictions]
  out = {f"{f.replace(' ', '_')}_accuracy": float(np.mean([a.get(f) == b.get(f) for a, b in zip(t, p)]))
         for f in ("age group", "gender", "occupation")}
  mean_mid = float(np.mean(list(AGE_MIDPOINTS.values())))
  truth = [AGE_MIDPOINTS[a["age group"]] for a in t]
  guess = [AGE_MIDPOINTS.get(b.get("age group", ""), mean_mid) for b in p]
  out["age_rmse"] = rating_errors(truth, guess)["rmse"]
  out["unparsable"] = float(np.mean([not b for b in p]))
  return out


def _ngrams(tokens: list[str], n: int) -> dict[tuple, int]:
  out: dict[tuple, int] = {}
  for i in range(len(tokens) - n + 1):
    out[tuple(tokens[i:i + n])] = out.get(tuple(tokens[i:i + n]), 0) + 1
  return out


def _lcs(a: list[str], b: list[str]) -> int:
  row = [0] * (len(b) + 1)
  for x in a:
    prev = 0
    for j, y in enumerate(b, 1):
      prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
  return row[-1]


def text_metrics(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """IR / TUI (free text against a reference): corpus BLEU-1 and BLEU-2 (cumulative, brevity penalty) and
  mean ROUGE-1 / ROUGE-2 / ROUGE-L F1, on lower-cased white-space tokens."""
  refs = [as_text(t).lower().split() for t in targets]
  hyps = [as_text(p).lower().split() for p in predictions]
  out = {}
  precisions = []
  for n in (1, 2):
    match = sum(sum(min(c, _ngrams(r, n).get(g, 0)) for g, c in _ngrams(h, n).items()) for r, h in zip(refs, hyps))
    total = sum(max(len(h) - n + 1, 0) for h in hyps)
    precisions.append(match / total if total else 0.0)
    hyp_len, ref_len = sum(map(len, hyps)), sum(map(len, refs))
    bp = 1.0 if hyp_len > ref_len else (np.exp(1 - ref_len / hyp_len) if hyp_len else 0.0)
    out[f"bleu{n}"] = float(bp * np.exp(np.mean(np.log(np.maximum(precisions, 1e-12))))) if all(precisions) else 0.0

  def f1(overlap, r, h):
    return 2 * overlap / (r + h) if r + h else 0.0

  for n in (1, 2):
    out[f"rouge{n}"] = float(np.mean([f1(sum(min(c, _ngrams(r, n).get(g, 0)) for g, c in _ngrams(h, n).items()),
                                         max(len(r) - n + 1, 0), max(len(h) - n + 1, 0)) for r, h in zip(refs, hyps)]))
  out["rougeL"] = float(np.mean([f1(_lcs(r, h), len(r), len(h)) for r, h in zip(refs, hyps)]))
  return out


METRIC_FNS = {"rp": [seqio_rating_prediction_metrics], "tkr": [seqio_list_metrics], "cdr": [seqio_list_metrics],
              "nir": [seqio_choice_metrics], "uap": [attribute_metrics], "ir": [text_metrics], "tui": [text_metrics]}
TEXT_KINDS = ("ir", "tui")


def reference_example(kind: str, row: Mapping, *, noun: str, focus: str = "") -> tuple[str, str]:
  """(instruction + input, reference) of one IR / TUI record a user supplies:
  IR  {"liked": [[title, review], ...], "disliked": [[title, review], ...], "reference": "..."}
  TUI {"name": ..., "attributes": {"genres": "[...]", ...}, "reviews": ["...", ...], "reference": "..."}"""
  if kind == "ir":
    text = ir_input(noun, [tuple(x) for x in row["liked"]], [tuple(x) for x in row["disliked"]], focus)
  elif kind == "tui":
    text = tui_input(noun, row["name"], row["attributes"], row["reviews"])
  else:
    raise ValueError(f"reference tasks are ir or tui, not {kind!r}")
  return instruction(kind, text), row["reference"]
