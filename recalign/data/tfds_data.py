"""A prepared data set as a TFDS dataset: the users' sequences as sharded TFRecord files that tasks stream.

`recalign prepare` writes it beside the JSON lines (`<prepared>/tfds/recalign_prepared/<version>/`): one
split, `users`, one record per user with the whole chronological sequence (the last item is the test
target, the second last the validation target, as in users.jsonl), its ratings and timestamps (empty
when the source has none), attributes (JSON) and whether it is in the seeded validation subset. The
manifest (counts, skips, source hashes) is the dataset's metadata. The item table stays in items.jsonl:
it grows with the catalogue, not with the interactions, and prompts need all of it anyway.

Streamed tasks (`TaskConfig.streamed`) read it through `tfds.builder_from_directory`, which needs
nothing of this module: the files, `dataset_info.json` and `features.json` are the format. A folder
without users.jsonl (one Beam prepared) is loaded from it: `PreparedData.load` reads the users there.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from recalign.data.prepare import (TFDS_NAME, TFDS_SPLIT, TFDS_VERSION, PreparedData, read_tfds_users, tfds_records,
                                   tfds_directory, tfds_record_batches)
from recalign.data.report import DataError
from recalign.paths import local_or_remote

NAME, VERSION, SPLIT = TFDS_NAME, TFDS_VERSION, TFDS_SPLIT
directory = tfds_directory   # where a prepared folder's TFDS files are
read_users = read_tfds_users   # every user's fields, parsed in batches (prepare.py: PreparedData.load uses it)


def features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "user": tf.int32,                              # index: row of users.jsonl
      "user_id": tfds.features.Text(),               # the source's user ID
      # (Tensors of unknown length, not Sequences: those encode element by element, 20x slower)
      "items": tfds.features.Tensor(shape=(None,), dtype=np.int32),   # item indices (items.jsonl rows), oldest first
      # (as raw bytes: TFDS stores a float64 Tensor as a float32 list, which rounds Unix seconds to 128 s)
      "timestamps": tfds.features.Tensor(shape=(None,), dtype=np.float64, encoding=tfds.features.Encoding.BYTES),
      "ratings": tfds.features.Tensor(shape=(None,), dtype=np.float32),
      "attributes": tfds.features.Text(),            # JSON object ({} when the data set has none)
      "validation": tf.bool,                         # in the seeded validation subset
  })


class RecalignPrepared(tfds.core.GeneratorBasedBuilder):
  """Writes one prepared data set (a `PreparedData`) as TFDS files; reading does not need this class."""

  RELEASE_NOTES = {"1.0.0": "users split: sequences, timestamps, ratings, attributes, validation flag",
                   "1.1.0": "timestamps stored exactly (1.0.0 kept them as float32)"}
  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, data: PreparedData, **kwargs):
    self._data = data
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=f"recalign prepared data set {self._data.name!r} (leave-one-out)",
        features=features(), metadata=tfds.core.MetadataDict(manifest=self._data.manifest))

  def _split_generators(self, dl_manager):
    del dl_manager   # nothing to download: the data are prepared in this process
    return {SPLIT: self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[int, dict]]:
    d = self._data
    val = np.zeros(d.num_users, bool)
    val[d.validation_users] = True
    empty64, empty32 = np.zeros([0], np.float64), np.zeros([0], np.float32)
    for u in range(d.num_users):
      yield u, {"user": u, "user_id": d.users[u], "items": d.sequences[u],
                "timestamps": d.timestamps[u] if d.timestamps is not None else empty64,
                "ratings": d.ratings[u] if d.ratings is not None else empty32,
                "attributes": json.dumps(d.user_attributes[u] if d.user_attributes is not None else {}),
                "validation": bool(val[u])}


def write(data: PreparedData, prepared_dir: str | Path) -> Path:
  """Writes `data` as `<prepared_dir>/tfds/...` (replacing an older copy); returns its directory."""
  data.check_whole()
  out = directory(prepared_dir)
  if out.exists():
    tf.io.gfile.rmtree(str(out))
  tfds.disable_progress_bar()
  builder = RecalignPrepared(data=data, data_dir=str(local_or_remote(prepared_dir) / "tfds"))
  with contextlib.redirect_stdout(io.StringIO()):   # TFDS prints "Downloading and preparing dataset ..."
    builder.download_and_prepare()
  logging.info("wrote %s (%d users)", out, data.num_users)
  return out


def save(data: PreparedData, prepared_dir: str | Path) -> Path:
  """A prepared data set's folder: the JSON lines (`PreparedData.save`) and their TFDS copy."""
  data.save(prepared_dir)
  write(data, prepared_dir)
  return local_or_remote(prepared_dir)


def reader(prepared_dir: str | Path) -> tfds.core.DatasetBuilder:
  """The TFDS copy of a prepared folder; a clear error when there is none, or when it is not the copy of
  the folder's users.jsonl (another preparation's: their manifests' `created` differ)."""
  path = directory(prepared_dir)
  if not (path / "dataset_info.json").exists():
    raise DataError(str(path), None, None, "no TFDS copy of this prepared data set (streamed tasks read it): "
                    "prepare it again with this version of recalign, which writes it")
  builder = tfds.builder_from_directory(str(path))
  mine = json.loads((local_or_remote(prepared_dir) / "manifest.json").read_text()).get("created")
  theirs = (manifest(builder) or {}).get("created")
  if theirs != mine:
    raise DataError(str(path), None, "created", f"the TFDS copy is of another preparation ({theirs}) than "
                    f"manifest.json ({mine}): prepare the data set again")
  return builder


def user_records(builder: tfds.core.DatasetBuilder, part=SPLIT, batch: int = 1_024) -> tf.data.Dataset:
  """The user records of `part` (the users split, or a slice of it such as `tfds.even_splits`' share of
  one host) in file order: `user`, `items`, `ratings` and `validation` as TFDS decodes them, parsed in
  batches -- faster than TFDS's record-by-record decoding, and never cached in memory (TFDS caches a split
  under 250 MiB on its own: +0.84 GiB for the 666,830 users of 10M interactions)."""
  if builder.info.file_format != tfds.core.FileFormat.TFRECORD:   # (another format: TFDS reads it)
    return builder.as_dataset(split=part, shuffle_files=False, read_config=tfds.ReadConfig(try_autocache=False))
  spec = {"user": tf.io.FixedLenFeature([], tf.int64), "items": tf.io.RaggedFeature(tf.int64),
          "ratings": tf.io.RaggedFeature(tf.float32), "validation": tf.io.FixedLenFeature([], tf.int64)}

  def parse(serialized):
    r = tf.io.parse_example(serialized, spec)
    return {"user": tf.cast(r["user"], tf.int32), "items": tf.cast(r["items"], tf.int32), "ratings": r["ratings"],
            "validation": tf.cast(r["validation"], tf.bool)}

  return tfds_records(builder, part).batch(batch).map(parse, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


_INDEX_SPEC = {"user": tf.io.FixedLenFeature([], tf.int64), "validation": tf.io.FixedLenFeature([], tf.int64),
               "items": tf.io.RaggedFeature(tf.int64)}


def index(builder: tfds.core.DatasetBuilder, batch: int = 8_192, *, num_items: Optional[int] = None) -> tuple:
  """(sequence length, validation flag) per user, in user order: one pass, O(users) memory -- what a
  streamed source needs to number its examples as the in-memory one does. Parses only these fields of
  the records in batches (`tfds_record_batches`), ~30x faster than decoding every record through TFDS.
  With `num_items`, also the training popularity of the same pass (interactions per item in every user's
  items but the last two, the leave-one-out training split: `PreparedData.train_popularity`)."""
  n = builder.info.splits[SPLIT].num_examples
  lengths, val = np.zeros(n, np.int64), np.zeros(n, bool)
  pop = np.zeros(num_items or 0, np.int64)
  for r in tfds_record_batches(builder, _INDEX_SPEC, batch):
    lengths[r["user"]], val[r["user"]] = r["items"][1], r["validation"]
    if num_items is not None:   # the last two of each row are held out
      pop += _leading_counts(*r["items"], r["items"][1] - 2, num_items)
  return (lengths, val) if num_items is None else (lengths, val, pop)


def popularity(builder: tfds.core.DatasetBuilder, num_items: int, train_lengths: np.ndarray,
               batch: int = 8_192) -> np.ndarray:
  """Interactions per item in each user's first `train_lengths[user]` items (a training split that holds
  out more than the last two, as ITDR's evaluation users'): one more pass, O(items) memory."""
  pop = np.zeros(num_items, np.int64)
  for r in tfds_record_batches(builder, _INDEX_SPEC, batch):
    pop += _leading_counts(*r["items"], np.asarray(train_lengths)[r["user"]], num_items)
  return pop


def user_names(builder: tfds.core.DatasetBuilder, users, batch: int = 8_192) -> dict[int, str]:
  """The data set IDs of `users` (indices), in one pass that parses only the users' two fields: what names
  an evaluation's predictions without loading every user."""
  wanted = np.unique(np.asarray(list(users), np.int64))
  spec = {"user": tf.io.FixedLenFeature([], tf.int64), "user_id": tf.io.FixedLenFeature([], tf.string)}
  out: dict[int, str] = {}
  for r in tfds_record_batches(builder, spec, batch):
    keep = np.isin(r["user"], wanted)
    out.update((int(u), n.decode()) for u, n in zip(r["user"][keep], r["user_id"][keep]))
  return out


def _leading_counts(values: np.ndarray, rows: np.ndarray, keep: np.ndarray, num_items: int) -> np.ndarray:
  """Item counts over the first `keep[j]` values of every row j of a flat ragged batch (values, rows)."""
  pos = np.arange(len(values)) - np.repeat(np.cumsum(rows) - rows, rows)
  return np.bincount(values[pos < np.repeat(keep, rows)], minlength=num_items)


def manifest(builder: tfds.core.DatasetBuilder) -> Optional[dict]:
  return dict(builder.info.metadata or {}).get("manifest")
