"""`prepare` as Apache Beam transforms, for sources too large for one process: the same data.

`prepare_users(rows, ...)` takes a PCollection of parsed interactions -- (line, user, item, timestamp,
rating), as the readers in `ingest` parse them -- and gives every kept user's record, exactly as
`prepare.prepare` makes them in one process: duplicates dropped (earliest kept), each user's items in
time order (stable: ties keep file order), the iterative k-core, users with fewer than
`min_interactions` dropped, random item indices from the same seeded permutation of the sorted item
IDs, users numbered by their first line in the source, the same seeded validation subset.

How each step scales: per-user work runs in parallel after a GroupByKey on the user; the k-core is
unrolled into `kcore_rounds` rounds (Beam graphs have no data-dependent loops), each an item count
(a side input of O(items)) and a filter, and the pipeline fails if the last round still removed
something; the item permutation and the user numbering need every item ID / every user's first line
in one place (O(items) and O(users), not O(interactions)). Counts of what was removed are Beam
metrics (`COUNTERS`) as well as the in-process report's keys.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

try:
  import apache_beam as beam
except ImportError as e:   # an extra: pip install -e ".[beam]"
  raise ImportError("recalign's Beam pipeline needs apache-beam: pip install 'recalign[beam]'") from e

from recalign.data.ingest import _interaction, _table_rows
from recalign.data.prepare import chronological, draw_validation_users, item_numbers
from recalign.data.report import DataError, IngestReport

NAMESPACE = "recalign.prepare"
KCORE_ROUNDS = 30


def read_amazon_tsv_rows(path: str | Path) -> Iterator[tuple]:
  """(line, user, item, timestamp, rating) of an amazon-tsv interactions.tsv, parsed and skipped exactly as
  `ingest.read_amazon_tsv` does (its skips are counted as Beam metrics under their report keys)."""
  report = IngestReport()
  for n, row in _table_rows(Path(path), report, ("user_id", "item_id")):
    got = _interaction(row, Path(path), n, report)
    if got:
      user, x = got
      yield n, user, x.item, x.timestamp, x.rating
  for kind, count in report.skipped.items():
    beam.metrics.Metrics.counter(NAMESPACE, kind).inc(count)


def _count(name: str, n: int = 1) -> None:
  beam.metrics.Metrics.counter(NAMESPACE, name).inc(n)


def _chronological(user_rows, timed: bool):
  """(user, [(line, item, ts, rating)]) -> (user, first line, [(item, ts, rating)] oldest first, deduplicated)."""
  user, rows = user_rows
  if timed:   # a row without a timestamp in a file that has them is a counted skip (ingest._by_user)
    kept = [r for r in rows if r[2] is not None]
    _count("missing_timestamp", len(rows) - len(kept))
    rows = kept
  if not rows:
    return
  kept, dropped = chronological(sorted(rows), item=lambda r: r[1], timestamp=lambda r: r[2])   # (file order first)
  _count("duplicate_user_item_dropped", dropped)
  yield user, min(r[0] for r in rows), [(item, ts, rating) for _, item, ts, rating in kept]


def _kcore_round(user, counts: dict, k: int):
  name, first, seq = user
  kept = [x for x in seq if counts[x[0]] >= k]
  if len(kept) >= k:
    yield name, first, kept


@beam.ptransform_fn
def _KCore(users, k: int, rounds: int):   # noqa: N802 (a PTransform)
  """Iterative k-core, unrolled: each round counts items over the users left and drops items and users
  with fewer than k; a further round that still changes anything fails the pipeline."""
  if k <= 1:
    return users
  for r in range(rounds + 1):
    counts = (users | f"Items{r}" >> beam.FlatMap(lambda u: [x[0] for x in u[2]])
              | f"Count{r}" >> beam.combiners.Count.PerElement())
    kept = users | f"Round{r}" >> beam.FlatMap(_kcore_round, counts=beam.pvalue.AsDict(counts), k=k)
    if r == rounds:   # the check round: nothing may change
      before = users | "SizeBefore" >> beam.Map(lambda u: len(u[2])) | "SumBefore" >> beam.CombineGlobally(sum)
      (kept | "SizeAfter" >> beam.Map(lambda u: len(u[2])) | "SumAfter" >> beam.CombineGlobally(sum)
       | "Converged" >> beam.Map(_converged, before=beam.pvalue.AsSingleton(before), rounds=rounds))
      return users
    users = kept
  return users


def _converged(after: int, before: int, rounds: int) -> None:
  if after != before:
    raise DataError("k-core", None, None, f"still removing interactions after {rounds} rounds: raise kcore_rounds")


def _numbering(first_lines: list, items: list, seed: int, num_validation_users: int) -> dict:
  """User and item numbers and the validation subset, as `prepare.prepare` draws them."""
  users = [u for _, u in sorted(first_lines)]
  return {"user_index": {u: i for i, u in enumerate(users)}, "item_index": item_numbers(items, seed),
          "validation": set(draw_validation_users(len(users), num_validation_users, seed).tolist())}


def _record(user, numbers: dict) -> tuple[int, dict]:
  name, _, seq = user
  u = numbers["user_index"][name]
  timestamps = [x[1] for x in seq]
  ratings = [x[2] for x in seq]
  return u, {"user": u, "user_id": name,
             "items": np.array([numbers["item_index"][x[0]] for x in seq], np.int32),
             "timestamps": np.array(timestamps if None not in timestamps else [], np.float64),
             "ratings": np.array(ratings if None not in ratings else [], np.float32),
             "validation": u in numbers["validation"]}


def prepare_users(rows, *, kcore: int = 5, seed: int = 0, num_validation_users: int = 3000,
                  min_interactions: int = 3, kcore_rounds: int = KCORE_ROUNDS, label: str = "Prepare"):
  """PCollection of (line, user, item, timestamp, rating) -> PCollection of (user index, record): the
  records `tfds_data` writes (attributes aside), equal to `prepare.prepare`'s users."""
  timed = (rows | f"{label}/HasTime" >> beam.Map(lambda r: r[3] is not None)
           | f"{label}/AnyTime" >> beam.CombineGlobally(any))
  users = (rows | f"{label}/ByUser" >> beam.Map(lambda r: (r[1], (r[0], r[2], r[3], r[4])))
           | f"{label}/Group" >> beam.GroupByKey()
           | f"{label}/Chronological" >> beam.FlatMap(lambda ur, t: _chronological((ur[0], list(ur[1])), t),
                                                      t=beam.pvalue.AsSingleton(timed))
           | f"{label}/KCore" >> _KCore(kcore, kcore_rounds)
           | f"{label}/MinInteractions" >> beam.Filter(lambda u: len(u[2]) >= min_interactions))
  first_lines = (users | f"{label}/FirstLine" >> beam.Map(lambda u: (u[1], u[0]))
                 | f"{label}/AllUsers" >> beam.combiners.ToList())
  items = (users | f"{label}/ItemIds" >> beam.FlatMap(lambda u: [x[0] for x in u[2]])
           | f"{label}/Distinct" >> beam.Distinct() | f"{label}/AllItems" >> beam.combiners.ToList())
  numbers = (first_lines | f"{label}/Numbering" >> beam.Map(
      lambda fl, it: _numbering(fl, it, seed, num_validation_users), it=beam.pvalue.AsSingleton(items)))
  return users | f"{label}/Records" >> beam.Map(_record, numbers=beam.pvalue.AsSingleton(numbers))


def _json(record: tuple[int, dict]) -> str:
  _, r = record
  return json.dumps({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in r.items()})


def run_local(interactions: str | Path, out: str | Path, *, runner: str = "DirectRunner",
              options: Optional[list[str]] = None, **settings) -> list[dict]:
  """Runs `prepare_users` over an amazon-tsv interactions.tsv, writes the records as JSON lines under `out`
  (shards, in no order) and returns them in user order (tests and small data)."""
  from apache_beam.options.pipeline_options import PipelineOptions
  with beam.Pipeline(runner=runner, options=PipelineOptions(options or [])) as p:
    rows = p | beam.Create([str(interactions)]) | beam.FlatMap(read_amazon_tsv_rows)
    _ = prepare_users(rows, **settings) | beam.Map(_json) | beam.io.WriteToText(str(Path(out) / "users"),
                                                                                 file_name_suffix=".jsonl")
  records = [json.loads(line) for f in sorted(Path(out).glob("users*.jsonl")) for line in f.open()]
  return sorted(records, key=lambda r: r["user"])


def write_tfds(interactions: str | Path, prepared_dir: str | Path, *, runner: str = "DirectRunner",
               options: Optional[list[str]] = None, **settings) -> Path:
  """The TFDS copy (`tfds_data`'s format and directory) built by one Beam pipeline straight from an amazon-tsv
  interactions.tsv: the same records the in-process `tfds_data.write` writes after `prepare`. (Its metadata
  holds no manifest yet: the folder's other files are still the in-process path's.)"""
  import tensorflow_datasets as tfds
  from apache_beam.options.pipeline_options import PipelineOptions
  from recalign.data import tfds_data

  with tfds.core.registered.skip_registration():
    class Builder(tfds.core.GeneratorBasedBuilder):   # tfds_data's builder, its split generated by Beam
      name = tfds_data.NAME
      VERSION = tfds.core.Version(tfds_data.VERSION)

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds_data.features(),
                                     description="recalign prepared data set (Beam)")

      def _split_generators(self, dl_manager, pipeline):   # (a `pipeline` argument: TFDS runs it on Beam)
        del dl_manager
        rows = pipeline | beam.Create([str(interactions)]) | beam.FlatMap(read_amazon_tsv_rows)
        return {tfds_data.SPLIT: prepare_users(rows, **settings)
                | beam.Map(lambda r: (r[0], {**r[1], "attributes": "{}"}))}

      def _generate_examples(self):   # (the split is the PCollection above)
        raise NotImplementedError

  out = tfds_data.directory(prepared_dir)
  if out.exists():
    import tensorflow as tf
    tf.io.gfile.rmtree(str(out))
  config = tfds.download.DownloadConfig(beam_runner=runner, beam_options=PipelineOptions(options or []))
  tfds.disable_progress_bar()
  with contextlib.redirect_stdout(io.StringIO()):   # TFDS prints "Downloading and preparing dataset ..."
    Builder(data_dir=str(Path(prepared_dir) / "tfds")).download_and_prepare(download_config=config)
  return out
