"""RecLM-style profiles (Jiang et al., "RecLM: Recommendation Instruction Tuning"): the profile format,
"silver" teacher profiles built from the data, and the distillation task (history -> profile).

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

from recalign.data.prepare import PreparedData
from recalign.tasks import itdr

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
  a = (data.user_attributes or [{}] * data.num_users)[u]
  if all(a.get(k) for k in ("age", "gender", "occupation")):
    return [f"age {itdr.age_group(a['age'])}", GENDERS.get(a["gender"], a["gender"]), a["occupation"]]
  brands = collections.Counter(data.items[i].brand for i in _train(data, u, exclude)[0] if data.items[i].brand)
  return [b for b, _ in brands.most_common(USER_SLOTS)] or ["unknown"]


def genre_counts(data: PreparedData, exclude: frozenset = frozenset()) -> collections.Counter:
  """Genre / leaf-category counts over every training interaction (the lift's denominator)."""
  c: collections.Counter = collections.Counter()
  for u in range(data.num_users):
    for i in _train(data, u, exclude)[0]:
      c.update(leaf_categories(data.items[i].categories))
  return c


def user_interests(data: PreparedData, u: int, totals: collections.Counter, exclude: frozenset = frozenset()) -> list[str]:
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


def load_profiles(path: str | Path, data: PreparedData) -> list[Optional[str]]:
  """Teacher profiles a user supplies (JSONL {"user": <source user id>, "profile": text}), by user index;
  users without a line get None (no distillation example)."""
  from recalign.data.report import DataError
  index = {u: k for k, u in enumerate(data.users)}
  out: list[Optional[str]] = [None] * data.num_users
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      row = json.loads(line)
      if row.get("user") not in index:
        raise DataError(str(path), n, "user", f"unknown user {row.get('user')!r}")
      if not row.get("profile"):
        raise DataError(str(path), n, "profile", "empty")
      out[index[row["user"]]] = row["profile"]
  return out


PROFILE_PROMPT = ("A user has {verb_past} the following {noun} (arranged in chronological order, from earliest to most "
                  "recent): {history} Summarize the user's identity and interests as a profile.")


def profile_input(data: PreparedData, titles: Sequence[str], u: int, max_items: int = 20) -> str:
  """The distillation prompt: the user's most recent `max_items` training items, titles in time order."""
  seq = data.sequences[u][:-2][-max_items:]
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


def embed_encoder(model, params, vocab, texts: Sequence[str], *, batch_size: int = 64, max_len: int = 256) -> np.ndarray:
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
                      max_length: int = 64, progress: bool = True) -> dict[str, str]:
  """Greedy decodes of `prompts` ({user: prompt}) appended to the JSONL `out` ({"user", "profile"}) a batch at
  a time; users already in `out` are skipped, so an interrupted run resumes where it stopped. Returns
  every profile in `out`."""
  from tqdm.auto import tqdm
  from recalign.decoding import EOS, decode_texts, generate
  out = Path(out)
  done = {}
  if out.exists():
    for line in out.read_text(encoding="utf-8").splitlines():
      if line.strip():
        row = json.loads(line)
        done[row["user"]] = row["profile"]
  todo = [u for u in prompts if u not in done]
  out.parent.mkdir(parents=True, exist_ok=True)
  bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="profiles", unit="user", disable=not progress)
  for s in range(0, len(todo), batch_size):
    users = todo[s:s + batch_size]
    toks = [vocab.encode(prompts[u]) + [EOS] for u in users]
    width = -(-max(map(len, toks)) // 64) * 64
    x = np.zeros((batch_size, width), np.int32)          # one compiled shape: the last batch is padded
    for r, t in enumerate(toks):
      x[r, :len(t)] = t
    texts = decode_texts(vocab, generate(model, params, x, max_length=max_length))[:len(users)]
    with open(out, "a", encoding="utf-8") as f:
      f.writelines(json.dumps({"user": u, "profile": t}) + "\n" for u, t in zip(users, texts))
    done.update(zip(users, texts))
    bar.update(len(users))
  bar.close()
  return done


def profile_prompts(data: PreparedData, vocab, max_title_tokens: int = 24, max_items: int = 20) -> dict[str, str]:
  """Every user's distillation prompt (as `<name>_profile` writes it), by source user ID."""
  titles = itdr.item_titles(data, vocab, max_title_tokens)
  return {data.users[u]: profile_input(data, titles, u, max_items) for u in range(data.num_users)}
