"""Item identifiers: how an item is written in prompts, targets and the decoding trie.

Five schemes, one place:
  * `random` (the paper's): `I4821`, a seeded random number per item (`prepare` assigns them);
  * `atomic` (P5's independent indexing, IID): one vocabulary piece per item, `<item_4821>`;
  * `collaborative` (P5's collaborative indexing): hierarchical spectral clustering of the item
    co-occurrence graph of the *training* sequences -- each level a code, down to clusters of at most
    `codebook` items, then the item's index in its leaf cluster, so every ID is unique;
  * `semantic` (RQ-KMeans, as OneRec / GRID): residual k-means over item feature vectors, `levels`
    codes of `codebook` entries plus a last code that tells apart the items sharing all of them.
    Features: TF-IDF of title + categories reduced by SVD (offline), or a `.npy` the user supplies
    (e.g. sentence-encoder embeddings); items without text fall back to collaborative vectors;
  * `hybrid` (P5's CID+IID, their best): the collaborative (or, `base='semantic'`, the semantic) codes
    followed by the item's own piece, `<a_3><b_17><c_2><item_4821>`: items bought together share a
    prefix, and every item still has a row of its own. The codes alone already tell items apart, so the
    piece is decided once they are (a one-child step of the decoding trie). `leaf='item'` drops the last
    code instead (the index in the leaf cluster, or the semantic de-duplication code), `<a_3><b_17><item_4821>`:
    the item's own piece then chooses among the items that share the codes before it.

A code is one vocabulary piece: position p uses letter p (`<a_12><b_201><c_7><d_0>`), an item's own
piece is `<item_k>` (k = the item's row in items.jsonl). The first code of an ID carries the word
boundary (`▁<a_12>`, `▁<item_7>` for atomic IDs), so inside `Item ID: <a_12><b_201>...` an ID is
exactly its codes, and IDs written one after another (`▁<a_1><b_2> ▁<a_4>...`) split without a separator.
`recalign vocab` adds the pieces to the project vocabulary; a pretrained
vocabulary gets them as new rows after its own (`vocab.ExtendedVocabulary`).

Every scheme is deterministic for a seed and built from training data only (never a validation or
test item's position). `recalign ids DATA --scheme ...` writes `DATA/ids/<scheme>.json`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
from pathlib import Path
from typing import Optional

import numpy as np
import scipy.sparse as sp

from recalign.data.prepare import PreparedData, item_id

SCHEMES = ("random", "collaborative", "semantic", "atomic", "hybrid")
IDS_DIR = "ids"


def code(position: int, value: int) -> str:
  return f"<{string.ascii_lowercase[position]}_{value}>"


def item_piece(k: int) -> str:
  return f"<item_{k}>"


def render(codes: tuple[int, ...]) -> str:
  return "".join(code(p, v) for p, v in enumerate(codes))


CODE = re.compile(r"<([a-z]|item)_(\d+)>")


def id_pieces(ids: list[str]) -> list[str]:
  """Vocabulary pieces of code IDs, sorted by (code name, value); an ID's first code carries the word
  boundary '▁' (none for `I123` IDs). Pieces of schemes built earlier keep their order."""
  found = set()
  for i in ids:
    for j, m in enumerate(CODE.finditer(i)):
      found.add((m.group(1), int(m.group(2)), j == 0))
  return [("▁" if first else "") + f"<{name}_{v}>" for name, v, first in sorted(found)]


@dataclasses.dataclass
class ItemIds:
  """The IDs of a data set's items under one scheme (`ids[k]` is item k's) and how they were made."""
  scheme: str
  ids: list[str]
  stats: dict
  params: dict

  def pieces(self) -> list[str]:
    """The vocabulary pieces the IDs use (the first position's carry the word boundary '▁')."""
    return id_pieces(self.ids)

  def save(self, data_dir: Path | str) -> Path:
    path = Path(data_dir) / IDS_DIR / f"{self.scheme}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"scheme": self.scheme, "params": self.params, "stats": self.stats,
                                "ids": self.ids}, ensure_ascii=False) + "\n")
    manifest_path = Path(data_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.setdefault("id_schemes", {})[self.scheme] = {"params": self.params, "stats": self.stats}
    manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return path


def load_ids(data_dir: Path | str, scheme: str, num_items: Optional[int] = None) -> list[str]:
  """The rendered IDs of a scheme (`random`: the data set's own `I1..IN`)."""
  if scheme not in SCHEMES:
    raise ValueError(f"unknown item ID scheme {scheme!r}; known: {', '.join(SCHEMES)}")
  if scheme == "random":
    if num_items is None:
      num_items = json.loads((Path(data_dir) / "manifest.json").read_text())["counts"]["items"]
    return [item_id(k) for k in range(num_items)]
  path = Path(data_dir) / IDS_DIR / f"{scheme}.json"
  if not path.exists():
    raise FileNotFoundError(f"{path}: no {scheme} IDs (run `recalign ids {data_dir} --scheme {scheme}`, "
                            "then `recalign vocab` so the vocabulary has their pieces)")
  ids = json.loads(path.read_text())["ids"]
  if num_items is not None and len(ids) != num_items:
    raise ValueError(f"{path}: {len(ids)} IDs for {num_items} items (rebuilt data? run `recalign ids` again)")
  return ids


def scheme_pieces(data_dir: Path | str) -> list[str]:
  """Vocabulary pieces of every ID scheme built for a data set (for `recalign vocab`)."""
  ids: list[str] = []
  for path in sorted((Path(data_dir) / IDS_DIR).glob("*.json")):
    ids += json.loads(path.read_text())["ids"]
  return id_pieces(ids)


# ---------------------------------------------------------------------------------------------
# Collaborative: hierarchical spectral clustering of the co-occurrence graph


def cooccurrence(data: PreparedData, window: int = 5) -> sp.csr_matrix:
  """Symmetric item co-occurrence counts within `window` positions of each *training* sequence."""
  rows, cols = [], []
  for u in range(data.num_users):
    s = data.train_sequence(u)
    for d in range(1, window):
      if len(s) > d:
        rows.append(s[:-d])
        cols.append(s[d:])
  r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
  c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
  a = sp.coo_matrix((np.ones(2 * len(r)), (np.concatenate([r, c]), np.concatenate([c, r]))),
                    shape=(data.num_items, data.num_items)).tocsr()
  a.sum_duplicates()
  a.setdiag(0)
  a.eliminate_zeros()
  return a


def spectral_embedding(a: sp.spmatrix, k: int, seed: int) -> np.ndarray:
  """Row-normalised top-k eigenvectors of the regularised normalised adjacency D_t^-1/2 (A + t/n 11') D_t^-1/2
  (t = mean degree; Amini et al.'s regularisation keeps rarely co-occurring items from forming
  tiny components of their own)."""
  from scipy.sparse.linalg import LinearOperator, eigsh
  n = a.shape[0]
  deg = np.asarray(a.sum(1)).ravel()
  tau = max(float(deg.mean()), 1e-6)
  dinv = 1.0 / np.sqrt(deg + tau)
  k = min(k, n - 1)
  if n <= 2000:
    m = (a.toarray() + tau / n) * dinv[:, None] * dinv[None, :]
    vec = np.linalg.eigh(m)[1][:, -k:]
  else:
    op = LinearOperator((n, n), dtype=np.float64,
                        matvec=lambda x: dinv * (a @ (dinv * x) + tau / n * np.sum(dinv * x)))
    vec = eigsh(op, k=k, which="LA", tol=1e-4, v0=np.random.default_rng(seed).normal(size=n))[1]
  return vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)


MINIBATCH_ABOVE = 100_000   # rows above which k-means runs in mini-batches (memory and time stay bounded)


def kmeans(k: int, x: np.ndarray, *, seed: int, n_init: int):
  """A fitted k-means of `x`: sklearn's KMeans (Lloyd) up to MINIBATCH_ABOVE rows -- what Beauty-size
  catalogues (and every committed ID file) use -- and MiniBatchKMeans on batches of 4,096 rows above it, for
  catalogues of millions of items."""
  from sklearn.cluster import KMeans, MiniBatchKMeans
  if len(x) <= MINIBATCH_ABOVE:
    return KMeans(k, n_init=n_init, random_state=seed).fit(x)
  return MiniBatchKMeans(k, n_init=n_init, random_state=seed, batch_size=4096).fit(x)


def collaborative_codes(data: PreparedData, *, codebook: int = 32, max_depth: int = 6, seed: int = 0,
                        window: int = 5) -> list[tuple[int, ...]]:
  """P5-style collaborative indexing: spectral clustering into `codebook` clusters, recursively, until a
  cluster holds at most `codebook` items; the last code is the item's index in its leaf cluster."""
  a = cooccurrence(data, window)
  codes: list[Optional[tuple[int, ...]]] = [None] * data.num_items

  def split(items: np.ndarray, path: tuple[int, ...]):
    if len(items) <= codebook or len(path) >= max_depth:
      for j, i in enumerate(items):
        codes[i] = path + (j,)
      return
    emb = spectral_embedding(a[items][:, items], codebook, seed)
    labels = kmeans(codebook, emb, seed=seed, n_init=3).labels_
    if len(set(labels.tolist())) == 1:   # nothing to split on: index the items directly
      labels = np.arange(len(items)) % codebook
    for c in range(codebook):
      if (labels == c).any():
        split(items[labels == c], path + (c,))

  split(np.arange(data.num_items), ())
  return codes  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Semantic: residual k-means over item features


def tfidf_svd(texts: list[str], dims: int, seed: int = 0) -> np.ndarray:
  """TF-IDF (words and bigrams seen at least twice) reduced by SVD to `dims`, L2-normalised; empty texts
  (and texts of words seen once) give zero rows."""
  from sklearn.decomposition import TruncatedSVD
  from sklearn.feature_extraction.text import TfidfVectorizer
  has_text = np.array([bool(t.strip()) for t in texts])
  x = np.zeros((len(texts), dims))
  if has_text.sum() > 2:
    tfidf = TfidfVectorizer(min_df=2, sublinear_tf=True, ngram_range=(1, 2), max_features=50000)
    m = tfidf.fit_transform([t for t, h in zip(texts, has_text) if h])
    k = min(dims, m.shape[1] - 1, m.shape[0] - 1)
    if k >= 1:
      x[has_text, :k] = TruncatedSVD(k, random_state=seed).fit_transform(m)
  return _normalise(x)


def text_features(data: PreparedData, dims: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """TF-IDF of title + categories reduced by SVD, L2-normalised; and which items have any text."""
  x = tfidf_svd([" ".join([m.title, *m.categories, m.brand]).strip() for m in data.items], dims, seed)
  return x, np.linalg.norm(x, axis=1) > 0    # (texts of words seen once only say nothing)


def _normalise(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def residual_kmeans(x: np.ndarray, *, levels: int = 3, codebook: int = 256, seed: int = 0) -> np.ndarray:
  """RQ-KMeans: level l clusters the residual left by levels < l. Returns codes [items, levels]."""
  residual = np.array(x, np.float64, copy=True)
  codes = np.zeros((len(x), levels), np.int64)
  for level in range(levels):
    k = min(codebook, len(np.unique(residual.round(8), axis=0)))
    km = kmeans(k, residual, seed=seed + level, n_init=1)
    codes[:, level] = km.labels_
    residual -= km.cluster_centers_[km.labels_]
  return codes


def semantic_codes(data: PreparedData, *, levels: int = 3, codebook: int = 256, seed: int = 0,
                   features: Optional[np.ndarray] = None) -> tuple[list[tuple[int, ...]], dict]:
  if features is None:
    x, has_text = text_features(data, seed=seed)
    source = "tfidf+svd(title, categories)"
  else:
    if features.shape[0] != data.num_items:
      raise ValueError(f"features have {features.shape[0]} rows, the data set {data.num_items} items "
                       "(row k = item k of items.jsonl)")
    x, has_text = _normalise(np.asarray(features, np.float64)), np.ones(data.num_items, bool)
    source = "user features"
  if (~has_text).any():   # items without text: their place in the co-occurrence graph instead
    collab = spectral_embedding(cooccurrence(data), min(x.shape[1], data.num_items - 1), seed)
    x[~has_text] = 0.0
    x[~has_text, :collab.shape[1]] = collab[~has_text]
  base = residual_kmeans(x, levels=levels, codebook=codebook, seed=seed)
  return [tuple(int(c) for c in row) for row in base], {"features": source,
                                                         "items_without_text": int((~has_text).sum())}


def deduplicate(codes: list[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], int]:
  """Appends a code telling apart items with the same codes (0, 1, ... in item order); returns the
  new codes and how many items shared their codes with another."""
  seen: dict[tuple[int, ...], int] = {}
  out = []
  for c in codes:
    out.append(c + (seen.get(c, 0),))
    seen[c] = seen.get(c, 0) + 1
  collisions = sum(n for n in seen.values() if n > 1)
  return out, collisions


# ---------------------------------------------------------------------------------------------


def build_ids(data: PreparedData, scheme: str, *, seed: int = 0, levels: int = 3, codebook: Optional[int] = None,
              features: Optional[np.ndarray] = None, base: str = "collaborative", leaf: str = "codes") -> ItemIds:
  """IDs of every item under `scheme`, with statistics (collisions, code usage, mean length).
  `base`: the codes a hybrid ID starts with (collaborative or semantic); `leaf`: what tells a hybrid ID's
  items apart -- "codes" (all of them, then the item's piece: P5's CID+IID) or "item" (the piece, in place of
  the last code)."""
  if scheme == "random":
    ids = [item_id(k) for k in range(data.num_items)]
    return ItemIds(scheme, ids, {"mean_codes": None}, {})
  if scheme == "atomic":
    ids = [item_piece(k) for k in range(data.num_items)]
    return ItemIds(scheme, ids, id_stats(ids, 0), {"pieces": "one per item"})
  if scheme == "hybrid":
    if base not in ("collaborative", "semantic"):
      raise ValueError(f"a hybrid ID starts with collaborative or semantic codes, not {base!r}")
    if leaf not in ("codes", "item"):
      raise ValueError(f"a hybrid ID's leaf is 'codes' or 'item', not {leaf!r}")
    inner = build_ids(data, base, seed=seed, levels=levels, codebook=codebook, features=features)
    # leaf="item": without the last code (an ID is its code pieces, so the text up to the last "<")
    ids = [(i[:i.rindex("<")] if leaf == "item" else i) + item_piece(k) for k, i in enumerate(inner.ids)]
    return ItemIds(scheme, ids, id_stats(ids, inner.stats["collisions_before_dedup"]),
                   {"base": base, "leaf": leaf, **inner.params})
  extra: dict = {}
  if scheme == "collaborative":
    codebook = codebook or 32
    codes = collaborative_codes(data, codebook=codebook, seed=seed)
    collisions = 0    # the leaf index already makes them unique
    params = {"codebook": codebook, "seed": seed, "graph": "co-occurrence within 5 training positions"}
  elif scheme == "semantic":
    codebook = codebook or 256
    base, extra = semantic_codes(data, levels=levels, codebook=codebook, seed=seed, features=features)
    codes, collisions = deduplicate(base)
    params = {"levels": levels, "codebook": codebook, "seed": seed, **extra}
  else:
    raise ValueError(f"unknown item ID scheme {scheme!r}; known: {', '.join(SCHEMES)}")
  ids = [render(c) for c in codes]
  return ItemIds(scheme, ids, id_stats(ids, collisions), params)


def id_stats(ids: list[str], collisions: int) -> dict:
  """Items, uniqueness, codes per ID (mean, max) and, per code name (`a`, `b`, ..., `item`), how many
  distinct codes are used and the largest + 1."""
  parsed = [[(m.group(1), int(m.group(2))) for m in CODE.finditer(i)] for i in ids]
  lengths = np.array([len(c) for c in parsed])
  used: dict[str, set] = {}
  for c in parsed:
    for name, v in c:
      used.setdefault(name, set()).add(v)
  usage = {name: {"codes_used": len(v), "largest": max(v) + 1} for name, v in sorted(used.items())}
  return {"items": len(ids), "unique": len(set(ids)) == len(ids), "mean_codes": round(float(lengths.mean()), 3),
          "max_codes": int(lengths.max()), "collisions_before_dedup": collisions, "code_usage": usage}


def format_id_stats(manifest: dict) -> list[str]:
  lines = []
  for scheme, info in manifest.get("id_schemes", {}).items():
    s = info["stats"]
    if scheme == "random":
      continue
    usage = ", ".join(f"{k}: {v['codes_used']}" for k, v in s["code_usage"].items())
    lines.append(f"ids {scheme:<13} {s['items']} items, {s['mean_codes']} codes on average (max {s['max_codes']}), "
                 f"{s['collisions_before_dedup']} items shared their codes before de-duplication; codes used per "
                 f"level {usage}")
  return lines
