"""From `RawData` to a prepared data set: dedup, chronological order, k-core, leave-one-out, random IDs.

A prepared data set is a folder:
  manifest.json          counts, seed, k-core, domain words, source hashes, skip/repair report
  items.jsonl            one item per line, line k has ID "I{k+1}": {"id", "source_id", "title", ...}
  users.jsonl            one user per line: {"user", "items": ["I12", ...], "timestamps", ["ratings"],
                         ["attributes": {"age": "24", ...}]}
                         in chronological order; the last item is the test target, the second last
                         the validation target, the rest is training data (leave-one-out).
  validation_users.json  indices of the seeded validation subset (all users are used for test)
"""

from __future__ import annotations

import array
import collections.abc
import dataclasses
import datetime
import json
import logging
import operator
import re
import weakref
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from recalign.data.ingest import Domain, ItemMeta, RawData, sha256_file
from recalign.data.report import DataError
from recalign.paths import is_remote, local_or_remote


def name_from_path(path: Path | str) -> str:
  """A data set's name from its folder (task names are `<name>_retrieval`): `amazon-beauty` -> `beauty`,
  `Toys_and_Games` -> `toys_and_games`, `ml-100k` -> `ml_100k`."""
  path = local_or_remote(path)
  name = (path if is_remote(path) else path.resolve()).name.lower().removeprefix("amazon-").removeprefix("amazon_")
  return re.sub(r"[^a-z0-9_]+", "_", name).strip("_") or "data"

FORMAT_VERSION = 1
MIN_INTERACTIONS = 3  # leave-one-out needs >= 1 training item besides validation and test
TFDS_NAME, TFDS_VERSION, TFDS_SPLIT = "recalign_prepared", "1.1.0", "users"   # the TFDS copy (data/tfds_data.py)


def tfds_directory(prepared_dir: Path | str) -> Path:
  """Where a prepared folder's TFDS copy is (what `tfds.builder_from_directory` is given)."""
  return local_or_remote(prepared_dir) / "tfds" / TFDS_NAME / TFDS_VERSION


def item_id(index: int) -> str:
  """Item index k (0-based row of items.jsonl) <-> short ID "I{k+1}"."""
  return f"I{index + 1}"


def item_index(iid: str) -> int:
  if not (iid.startswith("I") and iid[1:].isdigit()):
    raise ValueError(f"not an item ID: {iid!r}")
  return int(iid[1:]) - 1


class Ragged(collections.abc.Sequence):
  """Rows of different lengths kept in one flat array: row k is `values[offsets[k]:offsets[k + 1]]` (a
  read-only view). What a list of per-user arrays holds, without an array object per user (~100 bytes each:
  loading 9.9M interactions of short sequences took 373 MiB that way, 201 MiB this way; docs/benchmarks.md)."""

  def __init__(self, values: np.ndarray, lengths):
    self.values = values
    self.values.flags.writeable = False
    self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    if self.offsets[-1] != len(values):
      raise ValueError(f"row lengths add up to {self.offsets[-1]}, not the {len(values)} values")

  @classmethod
  def from_rows(cls, rows, dtype) -> "Ragged":
    rows = [np.asarray(r, dtype) for r in rows]
    return cls(np.concatenate(rows) if rows else np.zeros([0], dtype), [len(r) for r in rows])

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, k):
    if isinstance(k, slice):
      return [self[i] for i in range(*k.indices(len(self)))]
    k = operator.index(k)
    if not -len(self) <= k < len(self):
      raise IndexError(f"row {k} of {len(self)}")
    k %= len(self)
    return self.values[self.offsets[k]:self.offsets[k + 1]]

  def __iter__(self):
    for a, b in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist()):
      yield self.values[a:b]

  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  @classmethod
  def of(cls, rows, dtype) -> "Ragged":
    """`rows` as a Ragged of `dtype`: itself when it is one already."""
    return rows if isinstance(rows, Ragged) and rows.values.dtype == dtype else cls.from_rows(rows, dtype)


def _file_stamps(path) -> tuple:
  """(name, size, mtime) of a local prepared folder's files: a folder written again is loaded again."""
  if is_remote(path):
    return ()
  stamps = []
  for name in ("users.jsonl", "items.jsonl", "validation_users.json"):
    try:
      st = (path / name).stat()
      stamps.append((name, st.st_size, st.st_mtime_ns))
    except FileNotFoundError:
      pass
  return tuple(stamps)


@dataclasses.dataclass
class PreparedData:
  name: str
  domain: Domain
  items: list[ItemMeta]               # index k <-> ID item_id(k)
  source_item_ids: list[str]
  users: list[str]
  sequences: Sequence[np.ndarray]     # per user: int32 item indices, chronological (a Ragged, or a list)
  timestamps: Optional[Sequence[np.ndarray]]
  ratings: Optional[Sequence[np.ndarray]]
  validation_users: np.ndarray        # int32 user indices
  manifest: dict
  user_attributes: Optional[list[dict[str, str]]] = None   # per user (e.g. ml-100k's age, gender, occupation)
  omitted: tuple[str, ...] = ()       # fields `load` left out on request (such an object is not saved)

  @property
  def num_items(self) -> int:
    return len(self.items)

  @property
  def num_users(self) -> int:
    return len(self.users)

  @property
  def has_ratings(self) -> bool:
    return self.ratings is not None or ("users" in self.omitted and bool(self.manifest.get("has_ratings")))

  @property
  def has_titles(self) -> bool:
    return any(m.title for m in self.items)

  def train_sequence(self, user: int) -> np.ndarray:
    return self.sequences[user][:-2]

  def validation_target(self, user: int) -> int:
    return int(self.sequences[user][-2])

  def test_target(self, user: int) -> int:
    return int(self.sequences[user][-1])

  def held_out(self, user: int, split: str) -> tuple[np.ndarray, int]:
    """(everything before the held-out item, the held-out item) for 'validation' or 'test'."""
    cut = {"validation": 2, "test": 1}[split]
    seq = self.sequences[user]
    return seq[:-cut], int(seq[-cut])

  def train_popularity(self) -> np.ndarray:
    """Interaction counts per item in the training split only (no validation/test leakage)."""
    return np.bincount(np.concatenate([self.train_sequence(u) for u in range(self.num_users)]),
                       minlength=self.num_items).astype(np.int64)

  # ------------------------------------------------------------------------------------------
  def check_whole(self) -> None:
    """Refuses to write a data set `load` left fields out of: what is written must be all of it."""
    if self.omitted:
      raise ValueError(f"{self.name} was loaded without its {', '.join(self.omitted)}: load it whole "
                       "(PreparedData.load(path)) to save it")

  def save(self, out: Path | str) -> Path:
    self.check_whole()
    out = local_or_remote(out)
    save_items(out, self.items, self.source_item_ids)
    with (out / "users.jsonl").open("w", encoding="utf-8") as f:
      for u, user in enumerate(self.users):
        row = {"user": user, "items": [item_id(int(i)) for i in self.sequences[u]]}
        if self.timestamps is not None:
          row["timestamps"] = [float(t) for t in self.timestamps[u]]
        if self.ratings is not None:
          row["ratings"] = [float(r) for r in self.ratings[u]]
        if self.user_attributes is not None:
          row["attributes"] = self.user_attributes[u]
        f.write(json.dumps(row) + "\n")
    (out / "validation_users.json").write_text(json.dumps([int(u) for u in self.validation_users]))
    (out / "manifest.json").write_text(json.dumps(self.manifest, indent=2, ensure_ascii=False) + "\n")
    return out

  @classmethod
  def load(cls, path: Path | str, *, timestamps: bool = True, users: bool = True) -> "PreparedData":
    """The prepared data set in folder `path`. Loaded again while an earlier load of the same, unchanged
    files is still in use, it is that same (read-only) object: a training process's tasks and its
    validation hold one copy, not two. `timestamps=False` leaves the timestamps out (8 bytes an
    interaction; training and evaluation do not read them); `users=False` leaves every user out (the
    catalogue and the manifest only: what streamed tasks need besides the TFDS copy they read)."""
    path = local_or_remote(path)
    mpath = path / "manifest.json"
    if not mpath.exists():
      raise DataError(str(mpath), None, None, "not a prepared data set (run `recalign prepare` first)")
    text = mpath.read_text()
    key = (str(path if is_remote(path) else path.resolve()), text, _file_stamps(path), timestamps, users)
    loaded = _LOADED.get(key)
    if loaded is None:
      loaded = _LOADED[key] = cls._load(path, json.loads(text), timestamps, users)
    return loaded

  @classmethod
  def _load(cls, path, manifest: dict, with_timestamps: bool = True, with_users: bool = True) -> "PreparedData":
    if manifest.get("format_version") != FORMAT_VERSION:
      raise DataError(str(path / "manifest.json"), None, "format_version",
                      f"expected {FORMAT_VERSION}, got {manifest.get('format_version')}")
    items, src = load_items(path)
    if not with_users:
      return cls(name=manifest["name"], domain=Domain(**manifest["domain"]), items=items, source_item_ids=src,
                 users=[], sequences=[], timestamps=None, ratings=None, validation_users=np.zeros(0, np.int32),
                 manifest=manifest, omitted=("users", "timestamps"))
    if not (path / "users.jsonl").exists() and (tfds_directory(path) / "dataset_info.json").exists():
      return cls._with_tfds_users(path, manifest, items, src, with_timestamps)
    users, lengths, attrs = [], [], []
    seqs, times, rates = array.array("i"), array.array("d"), array.array("f")   # flat: 4 / 8 / 4 bytes a value
    timed, rated = with_timestamps, True
    with (path / "users.jsonl").open(encoding="utf-8") as f:
      for line in f:
        row = json.loads(line)
        users.append(row["user"])
        lengths.append(len(row["items"]))
        seqs.extend(item_index(i) for i in row["items"])
        timed, rated = timed and "timestamps" in row, rated and "ratings" in row
        times.extend(row.get("timestamps", ()) if timed else ())
        rates.extend(row.get("ratings", ()) if rated else ())
        if "attributes" in row:
          attrs.append(row["attributes"])
    val = np.array(json.loads((path / "validation_users.json").read_text()), np.int32)
    flat = lambda buf, dtype: Ragged(np.frombuffer(buf, dtype).copy(), lengths)   # noqa: E731
    return cls(name=manifest["name"], domain=Domain(**manifest["domain"]), items=items,
               source_item_ids=src, users=users, sequences=flat(seqs, np.int32),
               timestamps=flat(times, np.float64) if timed and users else None,
               ratings=flat(rates, np.float32) if rated and users else None,
               validation_users=val, manifest=manifest,
               user_attributes=attrs if len(attrs) == len(users) else None,
               omitted=() if with_timestamps else ("timestamps",))

  @classmethod
  def _with_tfds_users(cls, path: Path, manifest: dict, items, src, with_timestamps: bool = True) -> "PreparedData":
    """The users from the TFDS copy (a folder whose users are only there, e.g. one Beam prepared)."""
    import tensorflow_datasets as tfds
    r = read_tfds_users(tfds.builder_from_directory(str(tfds_directory(path))), timestamps=with_timestamps)
    users, seqs, times, rates, attrs, val = (r[k] for k in ("user_id", "items", "timestamps", "ratings",
                                                             "attributes", "validation"))
    return cls(name=manifest["name"], domain=Domain(**manifest["domain"]), items=items, source_item_ids=src,
               users=users, sequences=seqs,
               timestamps=times if manifest["has_timestamps"] and with_timestamps else None,
               ratings=rates if manifest["has_ratings"] else None,
               validation_users=np.flatnonzero(val).astype(np.int32), manifest=manifest,
               user_attributes=[a or {} for a in attrs] if manifest.get("user_attributes") else None,
               omitted=() if with_timestamps else ("timestamps",))


def tfds_record_batches(builder, spec: dict, batch: int = 8_192):
  """Batches of the TFDS copy's records parsed with `spec` (`tf.io` features of tfds_data's serialized
  fields), in file order, each ragged feature as (values, row lengths): one pass that parses only the
  fields asked for, much faster than decoding every record through TFDS."""
  import tensorflow as tf
  def parse(serialized):
    r = tf.io.parse_example(serialized, spec)
    return {k: (v.values, v.row_lengths()) if isinstance(v, tf.RaggedTensor) else v for k, v in r.items()}

  return tfds_records(builder).batch(batch).map(parse, num_parallel_calls=tf.data.AUTOTUNE).as_numpy_iterator()


def tfds_records(builder, part=TFDS_SPLIT):
  """The serialized records of `part` of the TFDS copy (the users split, or a slice of it such as one host's
  `tfds.even_splits` share), in file order: a tf.data Dataset of strings."""
  import tensorflow as tf
  shards = builder.info.splits[part].file_instructions
  files = tf.data.Dataset.from_tensor_slices(([str(f.filename) for f in shards], np.array([f.skip for f in shards],
                                              np.int64), np.array([f.take for f in shards], np.int64)))
  return files.flat_map(lambda f, skip, take: tf.data.TFRecordDataset(f).skip(skip).take(take))


def read_tfds_users(builder, batch: int = 8_192, *, timestamps: bool = True) -> dict[str, list]:
  """Every user's fields (tfds_data's features), in user order, parsed in batches: what `PreparedData.load`
  reads from a folder without users.jsonl. ~20x faster than decoding each record through TFDS; items,
  timestamps (unless `timestamps=False`: an empty row each) and ratings come as `Ragged` rows of flat
  arrays. (Here, not in tfds_data, which imports this module.)"""
  import tensorflow as tf
  spec = {"user": tf.io.FixedLenFeature([], tf.int64), "user_id": tf.io.FixedLenFeature([], tf.string),
          "items": tf.io.RaggedFeature(tf.int64), "ratings": tf.io.RaggedFeature(tf.float32),
          **({"timestamps": tf.io.FixedLenFeature([], tf.string, default_value=b"")} if timestamps else {}),  # float64
          "attributes": tf.io.FixedLenFeature([], tf.string), "validation": tf.io.FixedLenFeature([], tf.int64)}
  parts: dict[str, list] = {k: [] for k in ("user", "user_id", "items", "item_lengths", "timestamps", "ratings",
                                             "rating_lengths", "attributes", "validation")}
  for r in tfds_record_batches(builder, spec, batch):
    parts["user"].append(r["user"])
    parts["user_id"] += [x.decode() for x in r["user_id"]]
    parts["items"].append(r["items"][0].astype(np.int32))
    parts["item_lengths"].append(r["items"][1])
    parts["ratings"].append(r["ratings"][0])
    parts["rating_lengths"].append(r["ratings"][1])
    parts["timestamps"] += list(r["timestamps"]) if timestamps else [b""] * len(r["user"])   # raw float64 bytes
    parts["attributes"] += [json.loads(x) if x != b"{}" else None for x in r["attributes"]]   # None: none
    parts["validation"].append(r["validation"].astype(bool))
  cat = lambda k, dtype: np.concatenate(parts[k]).astype(dtype) if parts[k] else np.zeros([0], dtype)   # noqa: E731
  order = np.argsort(cat("user", np.int64), kind="stable")   # the files' order -> user order
  stamps = np.frombuffer(b"".join(parts["timestamps"]), np.float64)
  rows = {"items": _in_order(cat("items", np.int32), cat("item_lengths", np.int64), order),
          "ratings": _in_order(cat("ratings", np.float32), cat("rating_lengths", np.int64), order),
          "timestamps": _in_order(stamps, np.array([len(b) // 8 for b in parts["timestamps"]], np.int64), order)}
  return {**rows, "user_id": [parts["user_id"][u] for u in order],
          "attributes": [parts["attributes"][u] for u in order], "validation": cat("validation", bool)[order]}


def _in_order(values: np.ndarray, lengths: np.ndarray, order: np.ndarray) -> Ragged:
  """Rows (`values` cut by `lengths`) as a Ragged in `order` (rows are copied only when out of order)."""
  if (order == np.arange(len(order))).all():
    return Ragged(values, lengths)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  new = lengths[order]
  shift = starts[order] - np.concatenate([[0], np.cumsum(new)[:-1]]).astype(np.int64)
  return Ragged(values[np.arange(new.sum()) + np.repeat(shift, new)], new)


def save_items(out: Path, items: list[ItemMeta], source_ids: list[str]) -> None:
  """items.jsonl: row k is item k, ID item_id(k)."""
  out.mkdir(parents=True, exist_ok=True)
  with (out / "items.jsonl").open("w", encoding="utf-8") as f:
    for k, (meta, src) in enumerate(zip(items, source_ids)):
      row = {"id": item_id(k), "source_id": src, "title": meta.title, "brand": meta.brand,
             "price": meta.price, "categories": list(meta.categories)}
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


_LOADED: "weakref.WeakValueDictionary[tuple, PreparedData]" = weakref.WeakValueDictionary()


def load_items(path: Path | str) -> tuple[list[ItemMeta], list[str]]:
  """items.jsonl of a prepared folder: (metadata, source ID) per item, row k being item k."""
  items, src = [], []
  path = local_or_remote(path) / "items.jsonl"
  with path.open(encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      row = json.loads(line)
      if row["id"] != item_id(n - 1):
        raise DataError(str(path), n, "id", f"expected {item_id(n - 1)}, got {row['id']}")
      items.append(ItemMeta(row["title"], row["brand"], row["price"], tuple(row["categories"])))
      src.append(row["source_id"])
  return items, src


# ---------------------------------------------------------------------------------------------


def kcore_filter(sequences: dict[str, list], k: int) -> dict[str, list]:
  """Iteratively drops users and items with fewer than k interactions until none is left."""
  if k <= 1:
    return sequences
  seqs = sequences
  while True:
    counts: dict[str, int] = {}
    for s in seqs.values():
      for x in s:
        counts[x.item] = counts.get(x.item, 0) + 1
    new = {}
    for u, s in seqs.items():
      kept = [x for x in s if counts[x.item] >= k]
      if len(kept) >= k:
        new[u] = kept
    if sum(map(len, new.values())) == sum(map(len, seqs.values())):
      return new
    seqs = new


def prepare(raw: RawData, *, name: str, kcore: int = 5, seed: int = 0,
            num_validation_users: int = 3000, min_interactions: int = MIN_INTERACTIONS) -> PreparedData:
  """Dedups, orders chronologically (stable), k-cores, assigns random IDs and draws the validation subset."""
  report = raw.report
  if min_interactions < MIN_INTERACTIONS:
    raise ValueError(f"min_interactions must be >= {MIN_INTERACTIONS} for leave-one-out")
  where = str(raw.source_files[0]) if raw.source_files else name
  warnings, row_skips = skip_warnings(report, where), sum(report.skipped.values())
  seqs = _filtered(_chronological(raw, report), kcore, min_interactions, report)
  if not seqs:
    raise nobody_left(report, row_skips, kcore, min_interactions, where)

  source_ids = sorted({x.item for s in seqs.values() for x in s})
  index_of = item_numbers(source_ids, seed)   # random IDs
  by_index = [""] * len(source_ids)
  for sid, k in index_of.items():
    by_index[k] = sid
  items = item_table(raw.items, by_index, report)

  users = list(seqs)  # file order of first appearance
  sequences = Ragged.from_rows(([index_of[x.item] for x in seqs[u]] for u in users), np.int32)
  timestamps = None
  if all(x.timestamp is not None for u in users for x in seqs[u]):
    timestamps = Ragged.from_rows(([x.timestamp for x in seqs[u]] for u in users), np.float64)
  ratings = None
  if raw.has_ratings:
    ratings = Ragged.from_rows(([x.rating for x in seqs[u]] for u in users), np.float32)
  attributes = None
  if raw.user_attributes:
    missing = [u for u in users if u not in raw.user_attributes]
    report.skipped["users_without_attributes"] += len(missing)   # they get {} (no attribute task sample)
    attributes = [raw.user_attributes.get(u, {}) for u in users]
  validation_users = draw_validation_users(len(users), num_validation_users, seed)
  n_val = len(validation_users)

  manifest = make_manifest(raw, name=name, seed=seed, kcore=kcore, min_interactions=min_interactions, items=items,
                           lengths=[len(s) for s in sequences], has_timestamps=timestamps is not None,
                           has_ratings=ratings is not None,
                           attribute_keys=sorted({k for a in attributes or [] for k in a}), n_val=n_val,
                           warnings=warnings)
  return PreparedData(name, raw.domain, items, by_index, users, sequences, timestamps, ratings,
                      validation_users, manifest, attributes)


def subset_users(data: PreparedData, fraction: float, seed: int = 0,
                 num_validation_users: int = 3000) -> PreparedData:
  """A seeded `fraction` of the users, whole sequences kept (the data-limited regime): the same items, item
  IDs and order of users; validation users drawn again among them as `prepare` draws them."""
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction must be in (0, 1], not {fraction}")
  n = max(1, round(fraction * data.num_users))
  keep = np.sort(np.random.default_rng([seed, 2]).choice(data.num_users, n, replace=False))
  pick = lambda xs: None if xs is None else [xs[u] for u in keep]   # noqa: E731
  validation = draw_validation_users(n, num_validation_users, seed)
  manifest = {**data.manifest, "name": data.name, "subset": {"of": data.name, "fraction": fraction, "seed": seed,
                                                               "users": int(n)},
              "counts": _counts([len(data.sequences[u]) for u in keep], data.num_items, len(validation))}
  return dataclasses.replace(data, users=pick(data.users), sequences=pick(data.sequences),
                             timestamps=pick(data.timestamps), ratings=pick(data.ratings), validation_users=validation,
                             manifest=manifest, user_attributes=pick(data.user_attributes))


def item_numbers(source_ids: list[str], seed: int) -> dict[str, int]:
  """Random item indices: the sorted source IDs (the input's row order does not matter) through a seeded
  permutation -- source_ids[j] gets index number[j], ID I{number[j]+1}. (Numbering by first appearance
  would leak sequence information into the IDs, as P5's did.)"""
  number = np.random.default_rng(seed).permutation(len(source_ids))
  return {sid: int(number[j]) for j, sid in enumerate(sorted(source_ids))}


def draw_validation_users(num_users: int, num_validation_users: int, seed: int) -> np.ndarray:
  """The seeded validation subset (sorted user indices), from its own stream: changing one draw leaves the other."""
  n_val = min(num_validation_users, num_users)
  return np.sort(np.random.default_rng([seed, 1]).choice(num_users, n_val, replace=False)).astype(np.int32)


def chronological(interactions: list, *, item, timestamp) -> tuple[list, int]:
  """One user's interactions (in file order) in time order -- stable: equal timestamps keep their file
  order; no timestamp sorts as 0 -- a repeated item kept at its earliest only: (kept, how many dropped)."""
  seen, kept = set(), []
  for x in sorted(interactions, key=lambda x: timestamp(x) if timestamp(x) is not None else 0.0):
    if item(x) not in seen:
      seen.add(item(x))
      kept.append(x)
  return kept, len(interactions) - len(kept)


def skip_warnings(report, where: str) -> list[str]:
  """The manifest's warning when most rows of the source were skipped (call before the filtering counts)."""
  row_skips = sum(report.skipped.values())
  if not (report.rows and row_skips > report.rows / 2):
    return []
  warning = f"most rows were skipped: {row_skips} of {report.rows}; {report.dominant_skip()}"
  logging.warning("%s: %s", where, warning)
  return [warning]


def nobody_left(report, row_skips: int, kcore: int, min_interactions: int, where: str) -> DataError:
  why = (f"{row_skips} of {report.rows} rows were skipped ({report.dominant_skip()})" if row_skips else
         f"k-core {kcore} and at least {min_interactions} interactions per user removed everyone")
  return DataError(where, None, None, f"no users left after filtering: {why}")


def item_table(metadata: dict[str, ItemMeta], by_index: list[str], report) -> list[ItemMeta]:
  """Row k: the metadata of source item by_index[k] (empty when it has none); the mismatches counted."""
  report.skipped["items_without_metadata"] += sum(1 for sid in by_index if sid not in metadata)
  report.skipped["metadata_items_not_in_interactions"] += len(set(metadata) - set(by_index))
  items = [metadata.get(sid, ItemMeta()) for sid in by_index]
  report.skipped["items_with_empty_title_rendered_by_id"] += sum(1 for m in items if not m.title)
  return items


def _counts(lengths, num_items: int, n_val: int) -> dict:
  """The manifest's counts of the users' sequence lengths (each the whole leave-one-out sequence)."""
  lengths = np.asarray(lengths, np.int64)
  return {"users": len(lengths), "items": num_items, "interactions": int(lengths.sum()),
          "train_interactions": int((lengths - 2).sum()), "validation_users": n_val, "test_users": len(lengths),
          "sequence_length": {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 3),
                              "max": int(lengths.max())},
          "density": float(lengths.sum()) / (len(lengths) * num_items)}


def _chronological(raw: RawData, report) -> dict[str, list]:
  """Each user's interactions in time order, repeated items kept at their earliest (`chronological`; counted)."""
  seqs: dict[str, list] = {}
  for user, inter in raw.sequences.items():
    seqs[user], dropped = chronological(inter, item=lambda x: x.item, timestamp=lambda x: x.timestamp)
    if dropped:
      report.repair("duplicate_user_item_dropped", dropped)
  return seqs


def _filtered(seqs: dict[str, list], kcore: int, min_interactions: int, report) -> dict[str, list]:
  """k-core, then users with at least `min_interactions` (leave-one-out needs 3); removals counted."""
  before_users, before_inter = len(seqs), sum(map(len, seqs.values()))
  seqs = kcore_filter(seqs, kcore)
  report.skipped["users_removed_by_kcore"] += before_users - len(seqs)
  report.skipped["interactions_removed_by_kcore"] += before_inter - sum(map(len, seqs.values()))
  short = [u for u, s in seqs.items() if len(s) < min_interactions]
  for u in short:
    del seqs[u]
  report.skipped[f"users_with_fewer_than_{min_interactions}_interactions"] += len(short)
  return seqs


def make_manifest(raw: RawData, *, name: str, seed: int, kcore: int, min_interactions: int, items, lengths,
                  has_timestamps: bool, has_ratings: bool, attribute_keys: list[str], n_val: int,
                  warnings: list[str]) -> dict:
  """manifest.json: how the data set was made (source files and hashes, settings), its counts and fields,
  and every skip and repair."""
  report = raw.report
  return {
      "format_version": FORMAT_VERSION,
      "name": name,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "source": {"format": raw.source_format,
                 "files": {str(p): sha256_file(p) for p in raw.source_files}},
      "seed": seed, "kcore": kcore, "min_interactions": min_interactions,
      "domain": dataclasses.asdict(raw.domain),
      "has_ratings": has_ratings, "has_timestamps": has_timestamps, "user_attributes": attribute_keys,
      "order": "timestamps" if has_timestamps else "file order (the source has no timestamps)",
      "warnings": warnings,
      "counts": _counts(lengths, len(items), n_val),
      "fields": {"title": sum(1 for m in items if m.title), "brand": sum(1 for m in items if m.brand),
                 "price": sum(1 for m in items if m.price),
                 "categories": sum(1 for m in items if m.categories)},
      "report": report.to_json(),
  }


def format_stats(manifest: dict) -> str:
  c = manifest["counts"]
  lines = [f"data set      {manifest['name']}  (source: {manifest['source']['format']}, "
           f"{manifest['kcore']}-core, seed {manifest['seed']})",
           f"users         {c['users']}", f"items         {c['items']}",
           f"interactions  {c['interactions']}  (train {c['train_interactions']}, density {c['density']:.5f})",
           f"seq length    min {c['sequence_length']['min']}  mean {c['sequence_length']['mean']}  "
           f"max {c['sequence_length']['max']}",
           f"eval users    validation {c['validation_users']} (seeded subset), test {c['test_users']}",
           f"ratings       {'yes' if manifest['has_ratings'] else 'no'}",
           f"order         {manifest.get('order', 'timestamps')}",
           "fields        " + ", ".join(f"{k} {v}" for k, v in manifest["fields"].items())]
  rep = manifest["report"]
  for k, v in rep["skipped"].items():
    lines.append(f"skipped       {v:>7d}  {k}")
  for k, v in rep["repaired"].items():
    lines.append(f"repaired      {v:>7d}  {k}")
  for path, digest in manifest["source"]["files"].items():
    lines.append(f"source        {path}  sha256 {digest[:16]}…")
  for w in manifest.get("warnings", []):
    lines.append(f"warning       {w}")
  return "\n".join(lines)

