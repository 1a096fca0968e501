"""RecLM-style profiles (Jiang et al., "RecLM: Recommendation Instruction Tuning"): the profile format,
"silver" teacher profiles built from the data, the texts of RecLM's three tasks (distillation: history ->
profile; collaborative: history + similar users' histories + candidate -> profile ; answer: yes/no; item:
item text + its users' profiles -> item profile; registered by `registry.register_profile_task`),
generation, embedding and scoring of profiles.

RecLM distils profiles a large LLM wrote; none can be made offline, so the teacher profiles here are
built from the data, in RecLM's format, and are called silver throughout:
  users  "User identity: <3 slots>; User interests: <3 slots>". Identity: the real attributes where the
         data has them (ml-100k: age group, gender, occupation), else the user's top brands; interests:
         the genres / leaf categories of the items the user liked (rating >= 4; every item without
         ratings) ranked by lift -- how much more often they occur in the user's items than in all
         training interactions -- among those that occur at least twice (once for short histories).
  items  "Item identity: <5 slots>; Item audience: <5 slots>": its categories (then brand), and the most
         common identity values of the users who interacted with it in training.
Users can supply their own teacher profiles instead (`load_profiles`: JSONL {"user": id, "profile": text}).
Only training interactions (each user's items before the validation item) are ever read.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from recalign.data.prepare import PreparedData
from recalign.tasks import itdr, sources
from recalign.tasks import preprocessors as pp

USER_SLOTS, ITEM_SLOTS = 3, 5
GENDERS = {"M": "male", "F": "female"}


def user_profile(identity: Sequence[str], interests: Sequence[str]) -> str:
  return f"User identity: {', '.join(identity)}; User interests: {', '.join(interests)}"


def item_profile(identity: Sequence[str], audience: Sequence[str]) -> str:
  return f"Item identity: {', '.join(identity)}; Item audience: {', '.join(audience)}"


def leaf_categories(categories: Sequence[str]) -> list[str]:
  return [c.split(" > ")[-1].strip() for c in categories if c.strip()]


def _train(data: PreparedData, u: int, exclude: frozenset = frozenset()) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """The user's training items (and ratings), without the `exclude` items (a zero-shot split's new items)."""
  seq = data.sequences[u][:-2]
  r = None if data.ratings is None else data.ratings[u][:-2]
  if exclude:
    keep = ~np.isin(seq, list(exclude))
    seq, r = seq[keep], None if r is None else r[keep]
  return seq, r


def user_identity(data: PreparedData, u: int, exclude: frozenset = frozenset()) -> list[str]:
  truth = true_identity(data, u)
  if truth is not None:
    return [truth["age"], truth["gender"], truth["occupation"]]
  brands = collections.Counter(data.items[i].brand for i in _train(data, u, exclude)[0] if data.items[i].brand)
  return [b for b, _ in brands.most_common(USER_SLOTS)] or ["unknown"]


def genre_counts(data: PreparedData, exclude: frozenset = frozenset()) -> collections.Counter:
  """Genre / leaf-category counts over every training interaction (the lift's denominator)."""
  c: collections.Counter = collections.Counter()
  for u in range(data.num_users):
    for i in _train(data, u, exclude)[0]:
      c.update(leaf_categories(data.items[i].categories))
  return c


def user_interests(data: PreparedData, u: int, totals: collections.Counter,
                   exclude: frozenset = frozenset()) -> list[str]:
  seq, ratings = _train(data, u, exclude)
  liked = seq if ratings is None else seq[ratings >= 4]
  mine = collections.Counter(g for i in liked for g in leaf_categories(data.items[i].categories))
  if not mine:
    return ["unknown"]
  n_user, n_all = sum(mine.values()), sum(totals.values())
  floor = 2 if max(mine.values()) >= 2 else 1
  lift = {g: (c / n_user) / (totals[g] / n_all) for g, c in mine.items() if c >= floor}
  return sorted(lift, key=lambda g: (-lift[g], -mine[g], g))[:USER_SLOTS]


def silver_user_profiles(data: PreparedData, exclude_items: Sequence[int] = ()) -> list[str]:
  """Every user's silver profile; `exclude_items` (a zero-shot split's new items) are never read."""
  ex = frozenset(int(i) for i in exclude_items)
  totals = genre_counts(data, ex)
  return [user_profile(user_identity(data, u, ex), user_interests(data, u, totals, ex)) for u in range(data.num_users)]


def silver_item_profiles(data: PreparedData, exclude_items: Sequence[int] = ()) -> list[str]:
  """Every item's silver profile; the audience of an `exclude_items` item is unknown (no interaction read)."""
  ex = frozenset(int(i) for i in exclude_items)
  audience: list[collections.Counter] = [collections.Counter() for _ in range(data.num_items)]
  for u in range(data.num_users):
    ident = user_identity(data, u, ex)
    for i in _train(data, u, ex)[0]:
      audience[i].update(ident)
  out = []
  for i, m in enumerate(data.items):
    identity = (leaf_categories(m.categories) + ([m.brand] if m.brand else []))[:ITEM_SLOTS] or ["unknown"]
    fans = [v for v, _ in sorted(audience[i].items(), key=lambda x: (-x[1], x[0]))[:ITEM_SLOTS]] or ["unknown"]
    out.append(item_profile(identity, fans))
  return out


def load_profiles(path: str | Path, data: PreparedData, key: str = "user") -> list[Optional[str]]:
  """Profiles from a JSONL ({"user": <source user id>, "profile": text}, or "item" with key="item"), by
  user (item) index; those without a line get None (e.g. no distillation example)."""
  from recalign.data.report import DataError
  index = {u: k for k, u in enumerate(data.users if key == "user" else data.source_item_ids)}
  out: list[Optional[str]] = [None] * len(index)
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      row = json.loads(line)
      if row.get(key) not in index:
        raise DataError(str(path), n, key, f"unknown {key} {row.get(key)!r}")
      if not row.get("profile"):
        raise DataError(str(path), n, "profile", "empty")
      out[index[row[key]]] = row["profile"]
  return out


PROFILE_PROMPT = ("A user has {verb_past} the following {noun} (arranged in chronological order, from earliest to most "
                  "recent): {history} Summarize the user's identity and interests as a profile.")


def profile_input(data: PreparedData, titles: Sequence[str], u: int, max_items: int = 20,
                  exclude: frozenset = frozenset()) -> str:
  """The distillation prompt: the user's most recent `max_items` training items (without `exclude`, a
  zero-shot split's new items), titles in time order."""
  seq = _train(data, u, exclude)[0][-max_items:]
  d = data.domain
  return PROFILE_PROMPT.format(verb_past=d.verb_past, noun=d.noun, history="; ".join(titles[i] for i in seq) + ";")


def profile_pairs(data: PreparedData, titles: Sequence[str], profiles: Sequence[Optional[str]], users: Sequence[int],
                  max_items: int = 20) -> list[tuple[str, str]]:
  return [(profile_input(data, titles, int(u), max_items), profiles[int(u)]) for u in users if profiles[int(u)]]


def user_split(num_users: int, seed: int, fraction: float = 0.1) -> dict[str, np.ndarray]:
  """A seeded split of the users for the profile task: `fraction` validation, `fraction` test, the rest train."""
  order = np.random.default_rng([seed, 7]).permutation(num_users)
  n = max(1, int(round(num_users * fraction)))
  return {"test": np.sort(order[:n]), "validation": np.sort(order[n:2 * n]), "train": np.sort(order[2 * n:])}


# ---------------------------------------------------------------------------------------------
# Embedding profiles (for the CF model's fusion)


def embed_tfidf(texts: Sequence[str], dims: int = 64, seed: int = 0) -> np.ndarray:
  """The CPU fallback: TF-IDF + SVD, L2-normalised rows."""
  from recalign.data.ids import tfidf_svd
  return tfidf_svd(list(texts), dims, seed)


def embed_encoder(model, params, vocab, texts: Sequence[str], *, batch_size: int = 64,
                  max_len: int = 256) -> np.ndarray:
  """The language model's own encoder: mean of the encoder states over each text's tokens (EOS included,
  padding excluded), L2-normalised. Texts longer than `max_len` tokens keep their first `max_len`."""
  import jax.numpy as jnp
  from recalign.decoding import EOS
  out = []
  for s in range(0, len(texts), batch_size):
    toks = [vocab.encode(t)[:max_len - 1] + [EOS] for t in texts[s:s + batch_size]]
    width = -(-max(map(len, toks)) // 32) * 32
    x = np.zeros((len(toks), width), np.int32)
    for r, t in enumerate(toks):
      x[r, :len(t)] = t
    h = np.asarray(model.encode(params, jnp.asarray(x)), np.float32)
    mask = (x > 0)[..., None]
    out.append((h * mask).sum(1) / mask.sum(1))
  e = np.concatenate(out)
  return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def history_mean_embedding(data: PreparedData, item_vectors: np.ndarray) -> np.ndarray:
  """The "no generation" control: each user's mean item-text vector over the training items."""
  return np.stack([item_vectors[data.sequences[u][:-2]].mean(0) for u in range(data.num_users)])


# ---------------------------------------------------------------------------------------------
# Generating every user's profile with a trained profiler


def generate_profiles(model, params, vocab, prompts: dict[str, str], out: str | Path, *, batch_size: int = 32,
                      max_length: int = 64, progress: bool = True, key: str = "user") -> dict[str, str]:
  """Greedy decodes of `prompts` ({user or item ID: prompt}) appended to the JSONL `out` ({key, "profile"})
  a batch at a time; IDs already in `out` are skipped, so an interrupted run resumes where it stopped.
  Returns every profile in `out`."""
  from tqdm.auto import tqdm
  from recalign.decoding import EOS, decode_texts, generate
  out = Path(out)
  done = {}
  if out.exists():
    for line in out.read_text(encoding="utf-8").splitlines():
      if line.strip():
        row = json.loads(line)
        done[row[key]] = row["profile"]
  todo = [u for u in prompts if u not in done]
  out.parent.mkdir(parents=True, exist_ok=True)
  bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=f"{key} profiles", unit=key,
             disable=not progress)
  for s in range(0, len(todo), batch_size):
    users = todo[s:s + batch_size]
    toks = [vocab.encode(prompts[u]) + [EOS] for u in users]
    width = -(-max(map(len, toks)) // 64) * 64
    x = np.zeros((batch_size, width), np.int32)          # one compiled shape: the last batch is padded
    for r, t in enumerate(toks):
      x[r, :len(t)] = t
    texts = decode_texts(vocab, generate(model, params, x, max_length=max_length))[:len(users)]
    with open(out, "a", encoding="utf-8") as f:
      f.writelines(json.dumps({key: u, "profile": t}) + "\n" for u, t in zip(users, texts))
    done.update(zip(users, texts))
    bar.update(len(users))
  bar.close()
  return done


def profile_prompts(data: PreparedData, vocab, max_title_tokens: int = 24, max_items: int = 20,
                    exclude_items: Sequence[int] = ()) -> dict[str, str]:
  """Every user's distillation prompt (as `<name>_profile` writes it), by source user ID; `exclude_items`
  (a zero-shot split's new items) are left out of the histories."""
  titles = itdr.item_titles(data, vocab, max_title_tokens)
  ex = frozenset(int(i) for i in exclude_items)
  return {data.users[u]: profile_input(data, titles, u, max_items, ex) for u in range(data.num_users)}


# ---------------------------------------------------------------------------------------------
# RecLM's collaborative instruction tuning: the user's history + k similar users' -> profile + yes/no


def user_embeddings(data: PreparedData, *, epochs: int = 30, seed: int = 0,
                    exclude_items: Sequence[int] = ()) -> np.ndarray:
  """User representations of a LightGCN trained on the training interactions only (no early stopping:
  selection would read validation items), the CF model whose neighbours the collaborative task shows."""
  from recalign.baselines import cf
  held = np.asarray(sorted(int(i) for i in exclude_items), np.int64) if len(exclude_items) else None
  cfg = cf.CFConfig(model="lightgcn", epochs=epochs, eval_every=0, seed=seed)
  params, graph, _ = cf.train_cf(data, cfg, holdout_items=held)
  return np.asarray(cf.representations(params, cfg, graph))[:data.num_users]


def similar_users(embeddings: np.ndarray, k: int = 3) -> np.ndarray:
  """[users, k]: each user's k nearest other users by cosine similarity (ties: lower index first)."""
  e = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
  sim = e @ e.T
  np.fill_diagonal(sim, -np.inf)
  return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def collab_records(data: PreparedData, users: Sequence[int], neighbours: np.ndarray, *, max_items: int = 10,
                   exclude_items: Sequence[int] = ()) -> tuple[sources.Records, dict[str, int]]:
  """Two examples per user (RecLM's positive and negative), as candidate pools drawn from every epoch:
    positive  an item of the user's training items that a shown neighbour history also has; it is
              removed from the user's history in the input (left in the neighbour's, so that a
              candidate's presence in the input tells nothing: negatives are there too);
    negative  an item of a shown neighbour history the user never had (validation / test included).
  Histories are the last `max_items` training items (each user's items before the validation item);
  `exclude_items` (a zero-shot split's new items) are never shown nor drawn. Returns the records and
  the number of users without a positive / negative (skipped)."""
  ex = frozenset(int(i) for i in exclude_items)
  train = [_train(data, u, ex)[0] for u in range(data.num_users)]
  shown = [t[-max_items:] for t in train]
  cols: dict[str, list] = {"user": [], "label": [], "history": [], "pool": [],
                           **{f"neighbour_{j}": [] for j in range(neighbours.shape[1])}}
  skipped = {"no_positive": 0, "no_negative": 0}
  for u in users:
    u = int(u)
    near = np.unique(np.concatenate([shown[int(v)] for v in neighbours[u]]))
    pools = {1: np.intersect1d(train[u], near), 0: np.setdiff1d(near, data.sequences[u])}
    for label, pool in pools.items():
      if not len(pool):
        skipped["no_positive" if label else "no_negative"] += 1
        continue
      cols["user"].append(u)
      cols["label"].append(label)
      cols["history"].append(shown[u].astype(np.int32))
      cols["pool"].append(pool.astype(np.int32))
      for j, v in enumerate(neighbours[u]):
        cols[f"neighbour_{j}"].append(shown[int(v)].astype(np.int32))
  cols["user"] = np.asarray(cols["user"], np.int32)
  cols["label"] = np.asarray(cols["label"], np.int32)
  return sources.Records(cols), skipped


COLLAB_PROMPT = ("A user has {verb_past} the following {noun} (arranged in chronological order, from earliest to most "
                 "recent): {history} Users with similar tastes have {verb_past}: {neighbours} Summarize the user's "
                 "identity and interests as a profile, then answer: would the user {verb} \"{candidate}\"? (yes or no)")
ANSWER_SEP = " ; answer: "


def collab_text(domain, history: Sequence[str], neighbours: Sequence[Sequence[str]], candidate: str) -> str:
  """The collaborative prompt in Python (the TF renderer writes the same string; tests compare them)."""
  def joined(titles):
    return "; ".join(titles) + ";" if len(titles) else "nothing yet;"
  near = " ".join(f"similar user {j + 1}: {joined(h)}" for j, h in enumerate(neighbours))
  return COLLAB_PROMPT.format(verb_past=domain.verb_past, noun=domain.noun, history=joined(history), neighbours=near,
                              verb=domain.verb, candidate=candidate)


def _tf_joined(titles: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
  text = tf.strings.reduce_join(tf.strings.join([tf.gather(titles, rows), ";"]), separator=" ")
  return tf.where(tf.size(rows) > 0, text, "nothing yet;")


def render_collab(ex, key, *, titles: Sequence[str], profiles: Sequence[str], domain, k: int, **_) -> dict:
  """One collaborative example: the candidate drawn from the example's pool with this epoch's key; a
  positive candidate is taken out of the user's history."""
  t = tf.convert_to_tensor(titles, tf.string)
  pool = ex["pool"]
  cand = tf.gather(pool, tf.random.stateless_uniform([], key, 0, tf.size(pool), dtype=tf.int32))
  history = ex["history"]
  history = tf.boolean_mask(history, tf.logical_or(tf.equal(ex["label"], 0), history != cand))
  near = tf.strings.join([tf.strings.join([f"similar user {j + 1}: ", _tf_joined(t, ex[f"neighbour_{j}"])])
                          for j in range(k)], separator=" ")
  inputs = itdr.fill(COLLAB_PROMPT, verb_past=tf.constant(domain.verb_past), noun=tf.constant(domain.noun),
                     history=_tf_joined(t, history), neighbours=near, verb=tf.constant(domain.verb),
                     candidate=tf.gather(t, cand))
  answer = tf.where(tf.equal(ex["label"], 1), "yes", "no")
  profile = tf.gather(tf.convert_to_tensor(profiles, tf.string), ex["user"])
  targets = tf.strings.join([profile, ANSWER_SEP, answer])
  return {"inputs": inputs, "targets": targets, "candidate": cand, "label": ex["label"]}


# ---------------------------------------------------------------------------------------------
# Item profiles: the item's text + the profiles of users who had it -> the item's profile

ITEM_PROMPT = ("An item: {title} (categories: {categories}; brand: {brand}). Users who {verb_past} it: {users} "
               "Summarize the item's identity and audience as a profile.")
ITEM_USERS = 5


def item_descriptions(data: PreparedData, titles: Sequence[str]) -> list[tuple[str, str, str]]:
  """(title, leaf categories, brand) of every item, "unknown" where the data has none."""
  return [(titles[i], ", ".join(leaf_categories(m.categories)) or "unknown", m.brand or "unknown")
          for i, m in enumerate(data.items)]


def item_users(data: PreparedData, exclude_items: Sequence[int] = ()) -> list[np.ndarray]:
  """Every item's users in the training interactions (none for an `exclude_items` item)."""
  ex = frozenset(int(i) for i in exclude_items)
  out: list[list[int]] = [[] for _ in range(data.num_items)]
  for u in range(data.num_users):
    for i in _train(data, u, ex)[0]:
      out[int(i)].append(u)
  return [np.unique(np.asarray(x, np.int32)) for x in out]


def item_text(domain, description: tuple[str, str, str], user_profiles: Sequence[str]) -> str:
  """The item-profile prompt in Python (the TF renderer writes the same string)."""
  title, categories, brand = description
  return ITEM_PROMPT.format(title=title, categories=categories, brand=brand, verb_past=domain.verb_past,
                            users=" | ".join(user_profiles) + "." if len(user_profiles) else "no one yet.")


def render_item_profile(ex, key, *, descriptions, user_profiles: Sequence[str], item_profiles: Sequence[str],
                        domain, m: int = ITEM_USERS, **_) -> dict:
  """Up to `m` of the item's users, a fresh random choice every epoch, with their profiles."""
  title, cats, brand = (tf.gather(tf.constant([d[j] for d in descriptions]), ex["item"]) for j in range(3))
  pool = ex["users"]
  chosen = tf.gather(pool, pp.random_order(key, tf.size(pool))[:m])
  profs = tf.strings.reduce_join(tf.gather(tf.convert_to_tensor(user_profiles, tf.string), chosen), separator=" | ")
  users = tf.where(tf.size(chosen) > 0, tf.strings.join([profs, "."]), "no one yet.")
  inputs = itdr.fill(ITEM_PROMPT, title=title, categories=cats, brand=brand, verb_past=tf.constant(domain.verb_past),
                     users=users)
  return {"inputs": inputs, "targets": tf.gather(tf.convert_to_tensor(item_profiles, tf.string), ex["item"]),
          "item": ex["item"]}


def item_records(data: PreparedData, items: Sequence[int], users_of: Sequence[np.ndarray]) -> sources.Records:
  items = np.asarray(items, np.int32)
  return sources.Records({"user": np.zeros(len(items), np.int32), "item": items,   # "user": the sources' key column
                          "users": [users_of[int(i)] for i in items]})


def item_prompts(data: PreparedData, vocab, user_profiles: Sequence[str], *, seed: int = 0,
                 max_title_tokens: int = 24, exclude_items: Sequence[int] = ()) -> dict[str, str]:
  """Every item's prompt for generation (by source item ID), with up to ITEM_USERS of its training users
  (a seeded choice) and `user_profiles` (e.g. the generated ones)."""
  descs = item_descriptions(data, itdr.item_titles(data, vocab, max_title_tokens))
  users_of = item_users(data, exclude_items)
  rng = np.random.default_rng([seed, 5])
  out = {}
  for i, item in enumerate(data.source_item_ids):
    us = users_of[i]
    pick = rng.permutation(us)[:ITEM_USERS] if len(us) else us
    out[item] = item_text(data.domain, descs[i], [user_profiles[int(u)] for u in pick])
  return out


# ---------------------------------------------------------------------------------------------
# Scoring generated profiles


def split_answer(text: str) -> tuple[str, Optional[str]]:
  """"<profile> ; answer: yes" -> (profile, "yes"); the answer is None when it is missing or not yes / no."""
  profile, sep, answer = text.rpartition(ANSWER_SEP.strip())
  if not sep:
    return text.strip(), None
  answer = answer.strip().lower()
  return profile.strip().rstrip(";").strip(), answer if answer in ("yes", "no") else None


def collab_metrics(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """seqio metric_fn of `<name>_collab_profile`: yes/no accuracy (an unparsable answer counts as wrong),
  the share of "yes" among the targets (the majority baseline is max(share, 1 - share)), and the
  profile part's BLEU / ROUGE against the teacher's."""
  truth = [split_answer(itdr.as_text(t)) for t in targets]
  pred = [split_answer(itdr.as_text(p)) for p in predictions]
  yes = float(np.mean([a == "yes" for _, a in truth]))
  out = {"answer_accuracy": float(np.mean([p[1] == t[1] for p, t in zip(pred, truth)])),
         "answer_unparsable": float(np.mean([p[1] is None for p in pred])),
         "majority_accuracy": max(yes, 1 - yes)}
  out.update({f"profile_{k}": v for k, v in itdr.text_metrics([t[0] for t in truth], [p[0] for p in pred]).items()})
  return out


def parse_profile(text: str) -> tuple[list[str], list[str]]:
  """"User identity: a, b, c; User interests: x, y" -> (["a", "b", "c"], ["x", "y"]) (empty lists where a
  part is missing)."""
  parts = {}
  for chunk in text.split(";"):
    head, sep, body = chunk.partition(":")
    if sep:
      parts[head.strip().lower()] = [v.strip() for v in body.split(",") if v.strip()]
  return parts.get("user identity", []), parts.get("user interests", [])


def true_identity(data: PreparedData, u: int) -> Optional[dict[str, str]]:
  """The user's attributes as a profile writes them (age group, gender, occupation); None without attributes."""
  a = (data.user_attributes or [{}] * data.num_users)[u]
  if not all(a.get(k) for k in ("age", "gender", "occupation")):
    return None
  return {"age": f"age {itdr.age_group(a['age'])}", "gender": GENDERS.get(a["gender"], a["gender"]),
          "occupation": a["occupation"]}


def identity_scores(data: PreparedData, profiles: dict[str, str], users: Sequence[int],
                    reference_users: Sequence[int]) -> dict[str, float]:
  """Per field, the share of `users` whose generated profile (`profiles` by source user ID) names the true
  value among its identity slots, beside the majority baseline: the share whose true value is the most
  common value among `reference_users` (e.g. the profiler's training users)."""
  truth = {int(u): true_identity(data, int(u)) for u in users}
  scored = [u for u, t in truth.items() if t is not None and data.users[u] in profiles]
  if not scored:
    raise ValueError("no user with both attributes and a generated profile to score")
  ref = [t for t in (true_identity(data, int(u)) for u in reference_users) if t is not None]
  out: dict[str, float] = {"users": float(len(scored))}
  for field in ("age", "gender", "occupation"):
    named = [truth[u][field].lower() in {v.lower() for v in parse_profile(profiles[data.users[u]])[0]} for u in scored]
    majority = collections.Counter(t[field] for t in ref).most_common(1)[0][0]
    out[f"{field}_accuracy"] = float(np.mean(named))
    out[f"{field}_majority"] = float(np.mean([truth[u][field] == majority for u in scored]))
  return out
