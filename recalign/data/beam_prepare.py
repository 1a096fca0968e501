"""`recalign prepare --beam_runner ...`: the prepared folder made by one Apache Beam pipeline, the same data.

For sources too large for one process. `prepare_folder` runs a pipeline that reads the source's rows (the
formats `ingest.ROW_READERS` reads row by row: amazon-tsv, Amazon 2014/2018 and 2023 reviews, MovieLens
ratings.csv), makes every kept user's record exactly as `prepare.prepare` makes them in one process, and writes
them as the folder's TFDS copy (TFDS's Beam builder: sharded TFRecords). Then, in this process, it writes
items.jsonl, validation_users.json and manifest.json -- O(items) and O(users), never O(interactions). The folder
has no users.jsonl: `PreparedData.load` and the streamed tasks read the users from the TFDS copy.

`prepare_users(rows, ...)` is the per-user part as transforms: duplicates dropped (earliest kept), each user's
items in time order (stable: ties keep file order), the iterative k-core, users with fewer than
`min_interactions` dropped, random item indices from the same seeded permutation of the sorted item IDs, users
numbered by their first line in the source, the same seeded validation subset.

How each step scales: the source file is cut into byte ranges (`split_bytes`, 64 MiB) read by as many
workers; a first pass counts each range's lines so that every row keeps its line number in the file (line
numbers order the users, break timestamp ties and name bad rows), and the rows equal those one reader gives.
A gzipped file cannot be read from the middle: one worker reads it. Everything after the GroupByKey on the
user runs in parallel.
The k-core is unrolled into `kcore_rounds` rounds (Beam graphs have no data-dependent loops), each an item
count (a side input of O(items)) and a filter; the pipeline fails if the last round still removed something.
The item permutation and the user numbering need every item ID / every user's first line in one place
(O(items) and O(users)). Skips, repairs and removals travel as data (merged into the manifest's report with
file:line examples, as the in-process path records them) and are also Beam counters.

Nothing lost silently: the stages keep a ledger (rows the readers handed on, what each k-core round received,
counted and passed on), checked by `ledger_errors` once the pipeline is done, and the TFDS copy's record count
is compared with the users kept. The DirectRunner's multi_processing mode lost elements at 30M interactions
(upstream reports: apache/beam#22321, #23944); with the ledger such a run fails, naming the stage.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
from pathlib import Path
from typing import Optional

import numpy as np

try:
  import apache_beam as beam
except ImportError as e:   # an extra: pip install -e ".[beam]"
  raise ImportError("recalign's Beam pipeline needs apache-beam: pip install 'recalign[beam]'") from e

from recalign.data.prepare import (MIN_INTERACTIONS, chronological, draw_validation_users, item_numbers, item_table,
                                   make_manifest, name_from_path, nobody_left, save_items, skip_warnings)
from recalign.data.ingest import Domain, RawData, RowSource, Span, count_lines, file_spans, row_source
from recalign.data.report import DataError, IngestReport
from recalign.paths import local_or_remote

NAMESPACE = "recalign.prepare"
KCORE_ROUNDS = 30
SUMMARY = ".beam_summary.json"   # the pipeline's small outputs, read back by this process, then removed
SPLIT_BYTES = 64 << 20   # a source file's piece per reader
GROUP_ROWS = 100_000     # a reader groups each run of this many rows by user (bounds its memory)


def _count(name: str, n: int = 1) -> None:
  beam.metrics.Metrics.counter(NAMESPACE, name).inc(n)


def _read_rows(span: Span, source: RowSource, strict: bool = False, line_counts=()):
  """(user, [(line, item, timestamp, rating)]) of the kept rows of one piece of the source, a user's rows grouped
  within each run of GROUP_ROWS rows (one element per user and run, not per row: Beam's cost is per element);
  the piece's report (skips with their first file:line examples, rows read) as the tagged output "report",
  keyed by where the piece starts. `line_counts`: (start, lines) of every piece, which number this piece's
  first line."""
  # strict: pieces run in any order, so none raises; each reports its first bad row, and the earliest
  # piece's is raised once the pipeline is done (`_strict_error`)
  report = IngestReport()
  span = span._replace(first_line=1 + sum(n for start, n in line_counts if start < span.start))
  by_user: dict = {}
  k = 0
  for k, (n, user, x) in enumerate(source.rows(report, span), 1):
    by_user.setdefault(user, []).append((n, x.item, x.timestamp, x.rating))
    if k % GROUP_ROWS == 0:
      yield from by_user.items()
      by_user = {}
  yield from by_user.items()
  for kind, count in report.skipped.items():
    _count(kind, count)
  e = report.first if strict else None
  error = [e.file, e.line, e.field, e.message] if e else None
  yield beam.pvalue.TaggedOutput("report", (span.start, {**report.to_json(), "error": error, "handed_on": k}))


def _raise_first_bad_row(source: RowSource) -> None:
  """Reads the source in this process up to its first bad row and raises its DataError (none: returns)."""
  for _ in source.rows(IngestReport(strict=True)):
    pass


def _strict_error(summary: dict) -> Optional[DataError]:
  """The first bad row of the source in file order (strict): the error of the earliest piece that has one."""
  errors = [r["error"] for _, r in sorted(summary["reports"], key=lambda r: r[0]) if r.get("error")]
  return DataError(*errors[0]) if errors else None


def _chronological(user_rows, timed: bool):
  """(user, [[(line, item, ts, rating)], ...]) -> (user, first line, [(item, ts, rating)] oldest first, deduplicated).
  Side outputs: "missing" (line of a row without a timestamp in a timed source: a skip), "duplicates" (count),
  "rated" ((rated rows, rows): ratings must be all or none)."""
  user, rows = user_rows[0], [r for part in user_rows[1] for r in part]
  if timed:   # a row without a timestamp in a file that has them is a counted skip (ingest._by_user)
    for r in rows:
      if r[2] is None:
        yield beam.pvalue.TaggedOutput("missing", r[0])
    rows = [r for r in rows if r[2] is not None]
  if not rows:
    return
  yield beam.pvalue.TaggedOutput("rated", (sum(r[3] is not None for r in rows), len(rows)))
  kept, dropped = chronological(sorted(rows), item=lambda r: r[1], timestamp=lambda r: r[2])   # (file order first)
  if dropped:
    yield beam.pvalue.TaggedOutput("duplicates", dropped)
  yield user, min(r[0] for r in rows), [(item, ts, rating) for _, item, ts, rating in kept]


KCORE_BATCH = 2_048   # users per element through the k-core's rounds


def _item_arrays(users: list, index: dict):
  """A batch of users' item IDs ([[item, ...], ...]) -> (every user's item numbers, one after the other
  (int32), each user's count): what the k-core's rounds pass between stages (two arrays an element).
  Ledger (tagged output): (("batched", -1), (users, interactions))."""
  items = np.array([index[x] for u in users for x in u], np.int32)
  yield beam.pvalue.TaggedOutput("ledger", (("batched", -1), (len(users), len(items))))
  yield items, np.array([len(u) for u in users], np.int64)


def _kcore_round(batch: tuple, counts: np.ndarray, k: int, r: int = 0):
  """One peeling step of a batch of users: their items of fewer than k interactions dropped, then the users
  left with fewer than k items (nothing if none is left). Ledger (tagged output): (("in" / "out", r), (users,
  interactions)) received and passed on."""
  items, lengths = batch
  keep = counts[items] >= k
  starts = np.cumsum(lengths) - lengths
  left = np.add.reduceat(keep.astype(np.int64), starts) if len(items) else lengths
  user_kept = left >= k
  yield beam.pvalue.TaggedOutput("ledger", (("in", r), (len(lengths), len(items))))
  yield beam.pvalue.TaggedOutput("ledger", (("out", r), (int(user_kept.sum()), int(left[user_kept].sum()))))
  if user_kept.any():
    yield items[keep & np.repeat(user_kept, lengths)], left[user_kept]


def _in_core(user, core: frozenset, k: int):
  """A user (name, first line, [(item, ts, rating)]) restricted to the k-core's items; nothing if fewer
  than k of its items are in it."""
  name, first, seq = user
  kept = [x for x in seq if x[0] in core]
  if len(kept) >= k:
    yield name, first, kept


def _core_items(counts: np.ndarray, items: list, k: int) -> frozenset:
  return frozenset(x for x, c in zip(items, counts) if c >= k)


@beam.ptransform_fn
def _KCore(users, k: int, rounds: int):   # noqa: N802 (a PTransform)
  """Iterative k-core, unrolled: each round counts items over the users left and drops items and users
  with fewer than k; a further round that still changes anything fails the pipeline.

  Each round passes every user left between stages, so the rounds carry batches of users as two arrays
  (`_item_arrays`: item numbers and counts, no names, timestamps or ratings) and count items with
  `np.bincount` per batch (combined per worker, then merged). The converged counts then cut the full
  records once: peeling only removes, so an item is in the k-core iff its converged count is at least k,
  a user is in it iff k of its items are, and its items there are exactly those.

  Returns (users in the k-core, ledger): ledger holds ((stage, round), (users, interactions)) of what each
  round received ("in"), passed on ("out") and counted ("counted"), which `ledger_errors` checks."""
  if k <= 1:
    return users, users.pipeline | "NoLedger" >> beam.Create([[]])
  items = (users | "ItemSet" >> beam.CombineGlobally(_ItemSet())
           | "SortedItems" >> beam.Map(sorted))
  index = items | "ItemIndex" >> beam.Map(lambda xs: {x: i for i, x in enumerate(xs)})
  # (the batches are item IDs only: they are kept between stages until the item index is known)
  batched = (users | "ItemIds" >> beam.Map(lambda u: [x[0] for x in u[2]])
             | "Batch" >> beam.BatchElements(min_batch_size=KCORE_BATCH, max_batch_size=KCORE_BATCH)
             | "Arrays" >> beam.FlatMap(_item_arrays, index=beam.pvalue.AsSingleton(index)
                                        ).with_outputs("ledger", main="slim"))
  slim, ledgers = batched.slim, [batched.ledger]
  for r in range(rounds + 1):
    counts = slim | f"Count{r}" >> beam.CombineGlobally(_ItemCounts())
    step = slim | f"Round{r}" >> beam.FlatMap(_kcore_round, counts=beam.pvalue.AsSingleton(counts), k=k, r=r
                                              ).with_outputs("ledger", main="kept")
    ledgers += [step.ledger, counts | f"Counted{r}" >> beam.Map(lambda c, r=r: (("counted", r), (0, int(c.sum()))))]
    if r == rounds:   # the check round: nothing may change
      break
    slim = step.kept
  core = counts | "Core" >> beam.Map(_core_items, items=beam.pvalue.AsSingleton(items), k=k)
  ledger = (ledgers | "Ledger" >> beam.Flatten() | "LedgerSums" >> beam.CombinePerKey(_pair_sums)
            | "LedgerList" >> beam.combiners.ToList())
  _ = ledger | "Converged" >> beam.Map(_converged, rounds=rounds)
  return users | "InCore" >> beam.FlatMap(_in_core, core=beam.pvalue.AsSingleton(core), k=k), ledger


class _ItemSet(beam.CombineFn):
  """Users (name, first line, [(item, ...)]) -> the set of their items."""

  def create_accumulator(self) -> set:
    return set()

  def add_input(self, acc: set, user) -> set:
    acc.update(x[0] for x in user[2])
    return acc

  def merge_accumulators(self, accs) -> set:
    return set().union(*accs)

  def extract_output(self, acc: set) -> set:
    return acc


class _ItemCounts(beam.CombineFn):
  """Batches (item numbers, counts per user) -> interactions per item number (int64; an item past the end: 0)."""

  def create_accumulator(self) -> np.ndarray:
    return np.zeros(0, np.int64)

  def add_input(self, acc: np.ndarray, batch) -> np.ndarray:   # in place: no catalogue-sized copy per batch
    counts = np.bincount(batch[0])
    if len(counts) > len(acc):
      acc = np.concatenate([acc, np.zeros(len(counts) - len(acc), np.int64)])
    acc[:len(counts)] += counts
    return acc

  def merge_accumulators(self, accs) -> np.ndarray:
    accs = list(accs)
    out = np.zeros(max((len(a) for a in accs), default=0), np.int64)
    for a in accs:
      out[:len(a)] += a
    return out

  def extract_output(self, acc: np.ndarray) -> np.ndarray:
    return acc


def _converged(ledger: list, rounds: int) -> None:
  """Fails the pipeline if the check round (the last) still removed interactions: its ledger's in != out."""
  sums = dict(ledger)
  if sums.get(("in", rounds), (0, 0))[1] != sums.get(("out", rounds), (0, 0))[1]:
    raise DataError("k-core", None, None, f"still removing interactions after {rounds} rounds: raise kcore_rounds")


LOST = ("the runner lost data between stages (seen with the DirectRunner's multi_processing mode at 30M "
        "interactions; upstream: apache/beam#22321, #23944): prepare it again, on one DirectRunner process "
        "(--direct_running_mode=in_memory) or a cluster runner")


def ledger_errors(summary: dict) -> list[str]:
  """Where the pipeline's stages disagree on how much data passed between them: rows the readers handed on
  vs. rows the grouping received, and each k-core round's input vs. the previous round's output and vs. what
  its count saw. Every stage is a pure function of its input, so any difference is data the runner lost."""
  handed_on = sum(r["handed_on"] for _, r in summary["reports"])
  (g_users, g_inter), kcored = summary["grouped"], tuple(summary["kcored"])
  received = g_inter + summary["duplicates"] + summary["missing_count"]
  errors = [f"the readers handed on {handed_on} rows, the grouping by user received {received}"
            ] if handed_on != received else []
  ledger = {(stage, r): tuple(n) for (stage, r), n in summary["kcore_ledger"]}
  last = max((r for _, r in ledger), default=None)
  if last is not None and ledger.get(("batched", -1)) != (g_users, g_inter):
    errors.append(f"the k-core's batches hold (users, interactions) {ledger.get(('batched', -1))}, the grouping "
                  f"made {(g_users, g_inter)}")
  for r in range(last + 1 if last is not None else 0):   # (a round nothing reached has no "in" / "out": 0, 0)
    came = ledger.get(("out", r - 1), (0, 0)) if r else ledger.get(("batched", -1))
    got, counted = ledger.get(("in", r), (0, 0)), ledger.get(("counted", r), (0, 0))[1]
    if got != came:
      before = f"round {r - 1} passed on" if r else "its batches held"
      errors.append(f"k-core round {r} received (users, interactions) {got}, {before} {came}")
    if counted != got[1]:
      errors.append(f"k-core round {r} counted {counted} interactions of the {got[1]} it received")
  if last is not None and kcored != ledger.get(("out", last), (0, 0)):
    errors.append(f"the k-core's last round passed on {ledger.get(('out', last), (0, 0))}, its users hold {kcored}")
  return errors


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
             "validation": u in numbers["validation"], "attributes": "{}"}


def _pair_sums(pairs) -> tuple[int, int]:
  """Element-wise sum of (a, b) pairs ((0, 0) for none): a CombineGlobally function (also given its own sums)."""
  return tuple(map(sum, zip((0, 0), *pairs)))


def _sizes(users, label: str):
  """(users, interactions) of a PCollection of users, as a singleton."""
  return (users | f"{label}/Sizes" >> beam.Map(lambda u: (1, len(u[2])))
          | f"{label}/Sum" >> beam.CombineGlobally(_pair_sums))


def _prepare(parts, *, kcore: int = 5, seed: int = 0, num_validation_users: int = 3000,
             min_interactions: int = MIN_INTERACTIONS, kcore_rounds: int = KCORE_ROUNDS, label: str = "Prepare"):
  """(user, [(line, item, timestamp, rating)]) parts of users' rows -> (PCollection of (user index, record),
  {name: singleton PCollection} of what the manifest needs)."""
  timed = (parts | f"{label}/HasTime" >> beam.Map(lambda p: any(r[2] is not None for r in p[1]))
           | f"{label}/AnyTime" >> beam.CombineGlobally(any))
  by_user = (parts | f"{label}/Group" >> beam.GroupByKey()
             | f"{label}/Chronological" >> beam.FlatMap(_chronological, beam.pvalue.AsSingleton(timed))
             .with_outputs("missing", "duplicates", "rated", main="users"))
  users = by_user.users
  kcored, kcore_ledger = users | f"{label}/KCore" >> _KCore(kcore, kcore_rounds)
  kept = kcored | f"{label}/MinInteractions" >> beam.Filter(lambda u: len(u[2]) >= min_interactions)
  first_lines = (kept | f"{label}/FirstLine" >> beam.Map(lambda u: (u[1], u[0]))
                 | f"{label}/AllUsers" >> beam.combiners.ToList())
  items = (kept | f"{label}/ItemIds" >> beam.FlatMap(lambda u: [x[0] for x in u[2]])
           | f"{label}/Distinct" >> beam.Distinct() | f"{label}/AllItems" >> beam.combiners.ToList())
  numbers = (first_lines | f"{label}/Numbering" >> beam.Map(
      lambda fl, it: _numbering(fl, it, seed, num_validation_users), it=beam.pvalue.AsSingleton(items)))
  records = kept | f"{label}/Records" >> beam.Map(_record, numbers=beam.pvalue.AsSingleton(numbers))
  stats = {
      "timed": timed,
      "missing_count": by_user.missing | f"{label}/MissingCount" >> beam.combiners.Count.Globally(),
      "missing_lines": by_user.missing | f"{label}/MissingLines" >> beam.combiners.Top.Smallest(5),
      "duplicates": by_user.duplicates | f"{label}/Duplicates" >> beam.CombineGlobally(sum),
      "rated": by_user.rated | f"{label}/Rated" >> beam.CombineGlobally(_pair_sums),
      "grouped": _sizes(users, f"{label}/Grouped"), "kcored": _sizes(kcored, f"{label}/KCored"),
      "kept": _sizes(kept, f"{label}/Kept"), "kcore_ledger": kcore_ledger,
      "items": numbers | f"{label}/ItemsByIndex" >> beam.Map(
          lambda n: sorted(n["item_index"], key=n["item_index"].get)),
  }
  return records, stats


def prepare_users(rows, **settings):
  """PCollection of (line, user, item, timestamp, rating) -> PCollection of (user index, record): the
  records `tfds_data` writes, equal to `prepare.prepare`'s users."""
  parts = rows | "UserParts" >> beam.Map(lambda r: (r[1], [(r[0], r[2], r[3], r[4])]))
  return _prepare(parts, **settings)[0]


def _summary(_, reports: list, **stats) -> str:
  return json.dumps({"reports": reports, **stats})


def _tfds_builder(source: RowSource, prepared_dir: Path, settings: dict, strict: bool, split_bytes: int):
  """TFDS's Beam builder for tfds_data's dataset: its split is the pipeline's records, read from pieces of
  about `split_bytes` of the source file; the pipeline also writes the summary the manifest is made from."""
  import tensorflow_datasets as tfds
  from recalign.data import tfds_data

  with tfds.core.registered.skip_registration():   # (tfds_data's name: registered already)
    class Builder(tfds.core.GeneratorBasedBuilder):
      name = tfds_data.NAME
      VERSION = tfds.core.Version(tfds_data.VERSION)

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds_data.features(), metadata=tfds.core.MetadataDict(),
                                     description="recalign prepared data set (leave-one-out), made with Beam")

      def _split_generators(self, dl_manager, pipeline):   # (a `pipeline` argument: TFDS runs it on Beam)
        del dl_manager
        pieces = file_spans(source.interactions, split_bytes)
        spans = pipeline | "Pieces" >> beam.Create(pieces)
        counts = ()   # one piece (a small or gzipped file) starts at line 1: no counting pass
        if len(pieces) > 1:
          counts = beam.pvalue.AsList(spans | "CountLines" >> beam.Map(
              lambda sp: (sp.start, count_lines(source.interactions, sp))))
        read = (spans | "Read" >> beam.FlatMap(_read_rows, source=source, strict=strict, line_counts=counts
                                               ).with_outputs("report", main="rows"))
        records, stats = _prepare(read.rows, **settings)
        side = {k: beam.pvalue.AsSingleton(v) for k, v in stats.items()}
        _ = (pipeline | "One" >> beam.Create([None])
             | "Summary" >> beam.Map(_summary, reports=beam.pvalue.AsList(read.report), **side)
             | "WriteSummary" >> beam.io.WriteToText(str(prepared_dir / SUMMARY), num_shards=1, shard_name_template=""))
        return {tfds_data.SPLIT: records}

      def _generate_examples(self):   # (the split is the PCollection above)
        raise NotImplementedError

  return Builder(data_dir=str(prepared_dir / "tfds"))


def _merged_report(summary: dict, path: Path, strict: bool) -> IngestReport:
  """The source's report as the in-process reader leaves it: the rows' skips, then the rows without a
  timestamp in a timed source, then the duplicates dropped (file:line examples as `IngestReport` keeps them)."""
  error = _strict_error(summary) if strict else None
  if error:
    raise error
  report = IngestReport(strict=strict)
  for _, r in sorted(summary["reports"], key=lambda r: r[0]):   # the pieces in file order: the first examples
    report.rows += r["rows"]
    report.skipped.update(r["skipped"])
    report.repaired.update(r["repaired"])
    for kind, examples in r["examples"].items():
      kept = report.examples.setdefault(kind, [])
      kept += examples[:report.max_examples - len(kept)]
  if summary["missing_count"]:
    examples = [DataError(str(path), line, "timestamp", "empty while other rows have one")
                for line in sorted(summary["missing_lines"])]
    if strict:
      raise examples[0]
    report.skipped["missing_timestamp"] += summary["missing_count"]
    report.examples["missing_timestamp"] = [str(e) for e in examples][:report.max_examples]
  if summary["duplicates"]:
    report.repair("duplicate_user_item_dropped", summary["duplicates"])
  return report


def prepare_folder(source: str | Path, out: str | Path, *, fmt: Optional[str] = None, meta: Optional[str] = None,
                   name: Optional[str] = None, domain: Optional[Domain] = None, kcore: int = 5, seed: int = 0,
                   num_validation_users: int = 3000, min_interactions: int = MIN_INTERACTIONS,
                   kcore_rounds: int = KCORE_ROUNDS, strict: bool = False, runner: str = "DirectRunner",
                   options: Optional[list[str]] = None, split_bytes: int = SPLIT_BYTES) -> dict:
  """`recalign prepare` through Beam: the folder `prepare.prepare` + `tfds_data.save` make, without users.jsonl
  (the users are the TFDS copy). The source file is read in pieces of about `split_bytes` by as many workers
  (a gzipped file by one). Returns the manifest."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  from apache_beam.options.pipeline_options import PipelineOptions
  from recalign.data import tfds_data

  if min_interactions < MIN_INTERACTIONS:
    raise ValueError(f"min_interactions must be >= {MIN_INTERACTIONS} for leave-one-out")
  if split_bytes < 1:
    raise ValueError(f"the source's pieces must hold at least a byte (--beam_split_mb), not {split_bytes} bytes")
  src, out = row_source(source, fmt, meta), local_or_remote(out)   # local, or gs://
  name = name or name_from_path(out)
  out.mkdir(parents=True, exist_ok=True)
  for stale in ("users.jsonl", "manifest.json", SUMMARY):   # a folder prepared before: nothing of it may survive
    (out / stale).unlink(missing_ok=True)
  if tfds_data.directory(out).exists():
    tf.io.gfile.rmtree(str(tfds_data.directory(out)))
  settings = dict(kcore=kcore, seed=seed, num_validation_users=num_validation_users,
                  min_interactions=min_interactions, kcore_rounds=kcore_rounds)
  config = tfds.download.DownloadConfig(beam_runner=runner, beam_options=PipelineOptions(options or []))
  tfds.disable_progress_bar()
  try:
    with contextlib.redirect_stdout(io.StringIO()):   # TFDS prints "Downloading and preparing dataset ..."
      _tfds_builder(src, out, settings, strict, split_bytes).download_and_prepare(download_config=config)
  except ValueError as e:   # TFDS refuses an empty split before this process sees the pipeline's counts
    if "number of generated examples is 0" not in str(e):
      raise
    if strict:   # (the pieces' reports died with the pipeline: the file's first bad row, read here)
      _raise_first_bad_row(src)
    raise DataError(str(src.interactions), None, None, f"no users left after filtering: every row was skipped, or "
                    f"k-core {kcore} and at least {min_interactions} interactions per user removed everyone "
                    "(`recalign prepare` without --beam_runner reports which)") from None
  summary = json.loads((out / SUMMARY).read_text())

  report = _merged_report(summary, src.interactions, strict)
  lost = ledger_errors(summary)
  if lost:
    raise DataError(runner, None, None, "; ".join(lost) + f": {LOST}")
  metadata = src.items(report)   # (read after the rows, as the in-process reader does)
  rated, rows = summary["rated"]
  if 0 < rated < rows:
    raise DataError(str(src.interactions), None, src.rating_field, "some reviews have a rating and others not")
  warnings, row_skips = skip_warnings(report, str(src.interactions)), sum(report.skipped.values())
  (g_users, g_inter), (k_users, k_inter), (users, _) = summary["grouped"], summary["kcored"], summary["kept"]
  report.skipped["users_removed_by_kcore"] += g_users - k_users
  report.skipped["interactions_removed_by_kcore"] += g_inter - k_inter
  report.skipped[f"users_with_fewer_than_{min_interactions}_interactions"] += k_users - users
  if not users:
    raise nobody_left(report, row_skips, kcore, min_interactions, str(src.interactions))
  items = item_table(metadata, summary["items"], report)

  builder = tfds.builder_from_directory(str(tfds_data.directory(out)))
  written = builder.info.splits[tfds_data.SPLIT].num_examples
  if written != users:   # (seen at 30M interactions on the DirectRunner's multi_processing mode: 1.5% fewer)
    raise DataError(str(tfds_data.directory(out)), None, None, f"the pipeline kept {users} users but its TFDS copy "
                    f"holds {written} records: {LOST}")
  lengths, validation = tfds_data.index(builder)   # O(users): one pass over the records' lengths
  raw = RawData({}, metadata, domain or src.domain, src.format, src.files, report, rated > 0)
  manifest = make_manifest(raw, name=name, seed=seed, kcore=kcore, min_interactions=min_interactions,
                           items=items, lengths=lengths, has_timestamps=bool(summary["timed"]),
                           has_ratings=rated > 0, attribute_keys=[], n_val=int(validation.sum()),
                           warnings=warnings)
  manifest["beam"] = {"runner": runner, "options": list(options or []),
                      "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  save_items(out, items, summary["items"])
  (out / "validation_users.json").write_text(json.dumps(np.flatnonzero(validation).tolist()))
  # The TFDS copy's metadata: the manifest (tfds_data.reader checks its `created` against manifest.json's).
  (tfds_data.directory(out) / "metadata.json").write_text(json.dumps({"manifest": manifest}))
  (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")   # last: done
  (out / SUMMARY).unlink()
  return manifest
