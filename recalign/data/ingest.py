"""Readers that normalise every supported source into one `RawData`.

Supported sources:
  * `amazon-tsv`: `interactions.tsv` (user_id, item_id, timestamp[, rating]) + `items.tsv`
    (item_id, title, brand, price, categories) as in `shared/data/amazon-beauty/`.
  * `amazon-raw`: the files users download themselves, Amazon 2014 (`reviews_<Category>_5.json[.gz]`, one
    JSON object per line, and `meta_<Category>.json[.gz]`, one Python-literal dict per line, parsed with
    `ast.literal_eval`, never `eval`) or Amazon 2018 (`<Category>_5.json[.gz]` with the same review fields
    -- reviewerID, asin, overall, unixReviewTime -- and a JSON `meta_<Category>.json[.gz]` whose `category`
    is a list of strings).
  * `amazon-2023`: Amazon Reviews 2023 (McAuley lab), `<Category>.jsonl[.gz]` (user_id, parent_asin,
    timestamp in milliseconds, rating) and `meta_<Category>.jsonl[.gz]` (parent_asin, title, store,
    price, categories); items are parent ASINs, as the 2023 benchmarks use them.
  * `movielens-csv`: MovieLens `ratings.csv` (userId, movieId, rating, timestamp: the 20M / 25M / 32M
    layout) and optional `movies.csv` (movieId, title, genres separated by |).
  * `recbole`: RecBole atomic files `<name>.inter` / `<name>.item` (e.g. `shared/data/ml-100k/`).
  * `sequences`: one line per user, `user item item item ...` in chronological order, as P5 / S3-Rec
    style releases ship (`sequential_data.txt`, `user_sequence.txt`), with optional item metadata
    (an `items.tsv` as amazon-tsv's, or an Amazon `meta_*.json[.gz]`).

Timestamps: an empty or absent timestamp column means the file lists each user's interactions in
chronological order (the manifest and `recalign stats` say so); a timestamp missing from some rows
only is a counted skip. Bad records are skipped and counted in an `IngestReport` (or raise
`DataError` with `strict`).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import gzip
import hashlib
import html
import io
import json
import math
import re
import unicodedata
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

from recalign.data.report import DataError, IngestReport
from recalign.paths import local_or_remote


@dataclasses.dataclass(frozen=True)
class Domain:
  """Words the templates use for a data set ("A user has purchased the following Amazon products...")."""
  noun: str = "Amazon products"   # plural noun for the items
  verb_past: str = "purchased"    # "A user has <verb_past> the following ..."
  verb: str = "buy"               # "What would the user <verb> next?"


AMAZON = Domain()
MOVIES = Domain("movies", "watched", "watch")


@dataclasses.dataclass
class ItemMeta:
  title: str = ""
  brand: str = ""
  price: str = ""
  categories: tuple[str, ...] = ()


@dataclasses.dataclass
class Interaction:
  item: str
  timestamp: Optional[float]
  rating: Optional[float]


@dataclasses.dataclass
class RawData:
  """Per-user interactions in file order, item metadata, and where they came from."""
  sequences: dict[str, list[Interaction]]
  items: dict[str, ItemMeta]
  domain: Domain
  source_format: str
  source_files: list[Path]
  report: IngestReport
  has_ratings: bool = False
  user_attributes: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # user -> {field: value}


# Strings that would be mistaken for template markers once an item is rendered into a prompt.
_MARKERS = re.compile(r"\[masked item\]|<extra_id_\d+>", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def clean_text(text: str, report: IngestReport) -> str:
  """Unescapes HTML entities, NFKC-normalises, folds tabs/newlines, removes template markers."""
  if not text:
    return ""
  out = text
  if "&" in out:
    for _ in range(3):  # "&amp;amp;" style double escaping is common in the Amazon dumps
      un = html.unescape(out)
      if un == out:
        break
      out = un
    if out != text:
      report.repair("html_entities_unescaped")
  out = unicodedata.normalize("NFKC", out)
  if _MARKERS.search(out):
    report.repair("template_markers_removed")
    out = _MARKERS.sub(" ", out)
  folded = _SPACE.sub(" ", out).strip()
  if folded != out.strip() and any(c in out for c in "\t\n\r"):
    report.repair("tabs_newlines_folded")
  return folded


def sha256_file(path: Path) -> str:
  h = hashlib.sha256()
  with local_or_remote(path).open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


class Span(NamedTuple):
  """A piece of an uncompressed file for one reader: the lines that start at a byte in [start, end), the first
  of them line number `first_line` of the file (what splits a big source across Beam workers)."""
  start: int
  end: int
  first_line: int = 1


def _lines(path: Path, report: IngestReport, span: Optional[Span] = None) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, line without newline) of the file or of `span`; undecodable lines are
  counted skips."""
  with local_or_remote(path).open("rb") as raw_file, (gzip.GzipFile(fileobj=raw_file) if path.suffix == ".gz"
                                                     else contextlib.nullcontext(raw_file)) as f:
    for i, raw in (enumerate(f, 1) if span is None else _span_lines(f, span)):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        report.skip("undecodable_line", str(path), i, None, f"not UTF-8 ({e.reason})")
        continue
      line = line.rstrip("\r\n")
      if line.strip():
        yield i, line


def _span_lines(f, span: Span) -> Iterator[tuple[int, bytes]]:
  pos = span.start
  if pos:   # from the byte before: a line that started earlier is read to its end and dropped
    f.seek(pos - 1)
    pos += len(f.readline()) - 1
  n = span.first_line
  while pos < span.end:
    raw = f.readline()
    if not raw:
      return
    yield n, raw
    n, pos = n + 1, pos + len(raw)


def file_spans(path: Path, split_bytes: int) -> list[Span]:
  """The file cut into pieces of about `split_bytes` (`first_line` still unknown: `count_lines` numbers them);
  a gzipped file is one piece (it cannot be read from the middle)."""
  if path.suffix == ".gz":
    return [Span(0, 2 ** 63)]
  with local_or_remote(path).open("rb") as f:
    size = f.seek(0, io.SEEK_END)
  return [Span(start, min(start + split_bytes, size)) for start in range(0, size, split_bytes)] or [Span(0, 0)]


def count_lines(path: Path, span: Span) -> int:
  """How many lines of the file start in `span` (a line starts at byte 0 and after every newline)."""
  lo, n = max(span.start - 1, 0), int(span.start == 0 and span.end > 0)
  with local_or_remote(path).open("rb") as f:
    f.seek(lo)
    left = span.end - 1 - lo
    while left > 0:
      block = f.read(min(left, 1 << 24))
      if not block:
        break
      n, left = n + block.count(b"\n"), left - len(block)
  return n


def _split_csv(line: str) -> list[str]:
  import csv
  try:
    return next(csv.reader([line]))      # quoted fields: MovieLens titles hold commas
  except csv.Error as e:
    raise ValueError(f"not CSV ({e})") from None


_SEPARATORS = {"\t": ("tab-separated", lambda line: line.split("\t")), ",": ("comma-separated", _split_csv)}


def _table_rows(path: Path, report: IngestReport, required: tuple[str, ...],
                header_names: Callable[[list[str], Path], list[str]] = lambda cols, p: cols, *, sep: str = "\t",
                span: Optional[Span] = None) -> Iterator[tuple[int, dict[str, str]]]:
  """(line number, {column: value}) for each well-formed row of a tab- (or comma-) separated file with a
  header (of `span` of it: the header is still the file's first row); rows that do not parse or have the
  wrong number of fields are counted skips."""
  what = _SEPARATORS[sep][0]
  header_line, header = 0, []
  if span is not None and span.start > 0:
    header_line, cols = next(_split_lines(path, IngestReport(), sep), (0, []))
    header = _header(cols, path, header_line, required, header_names)
  for n, cols in _split_lines(path, report, sep, span):
    if n == header_line:
      continue
    if not header:
      header = _header(cols, path, n, required, header_names)
      continue
    if len(cols) != len(header):
      report.skip("malformed_line", str(path), n, None, f"expected {len(header)} {what} fields, got {len(cols)}")
      continue
    yield n, dict(zip(header, cols))


def _split_lines(path: Path, report: IngestReport, sep: str, span: Optional[Span] = None
                 ) -> Iterator[tuple[int, list[str]]]:
  split = _SEPARATORS[sep][1]
  for n, line in _lines(path, report, span):
    try:
      yield n, split(line)
    except ValueError as e:
      report.skip("malformed_line", str(path), n, None, str(e))


def _header(cols: list[str], path: Path, n: int, required: tuple[str, ...],
            header_names: Callable[[list[str], Path], list[str]]) -> list[str]:
  header = header_names(cols, path)
  missing = [f for f in required if f not in header]
  if missing:
    raise DataError(str(path), n, ",".join(missing), "missing header column(s)")
  return header


def _interaction(row: dict, path: Path, n: int, report: IngestReport) -> Optional[tuple[str, Interaction]]:
  """A (user, interaction) from a row with user_id, item_id[, timestamp][, rating]; None if skipped.
  An empty timestamp is None here (`_by_user` decides whether the file has timestamps at all)."""
  report.rows += 1
  user, item = row["user_id"].strip(), row["item_id"].strip()
  if not user or not item:
    report.skip("missing_field", str(path), n, "user_id" if not user else "item_id", "empty")
    return None
  ts = rating = None
  if row.get("timestamp", "").strip():
    ts = _number(row["timestamp"], path, n, "timestamp", report, "bad_timestamp")
    if ts is None:
      return None
  if "rating" in row:
    rating = _number(row["rating"], path, n, "rating", report, "bad_rating")
    if rating is None:
      return None
  return user, Interaction(item, ts, rating)


def _by_user(rows: list[tuple[int, str, Interaction]], path: Path, report: IngestReport
             ) -> dict[str, list[Interaction]]:
  """Per-user interactions in file order. A file without any timestamp is in chronological order
  (file order is kept); a row without a timestamp in a file that has them is a counted skip."""
  timed = any(x.timestamp is not None for _, _, x in rows)
  sequences: dict[str, list[Interaction]] = {}
  for n, user, x in rows:
    if timed and x.timestamp is None:
      report.skip("missing_timestamp", str(path), n, "timestamp", "empty while other rows have one")
      continue
    sequences.setdefault(user, []).append(x)
  return sequences


def _number(value, path: Path, line: int, field: str, report: IngestReport,
            kind: str) -> Optional[float]:
  try:
    x = float(value)
  except (TypeError, ValueError):
    report.skip(kind, str(path), line, field, f"not a number: {value!r}")
    return None
  if not math.isfinite(x):
    report.skip(kind, str(path), line, field, f"not finite: {value!r}")
    return None
  return x


def _add_meta(items: dict[str, ItemMeta], item: str, meta: ItemMeta, path: Path, line: int,
              report: IngestReport):
  if item in items:
    report.skip("duplicate_item_metadata", str(path), line, "item_id", f"item {item!r} listed again")
    return
  items[item] = meta


# ---------------------------------------------------------------------------------------------
# Amazon TSV (the layout of shared/data/amazon-beauty)


def amazon_tsv_rows(path: Path, report: IngestReport, span: Optional[Span] = None
                    ) -> Iterator[tuple[int, str, Interaction]]:
  """interactions.tsv: (line, user, interaction) per kept row."""
  for n, row in _table_rows(path, report, ("user_id", "item_id"), span=span):
    got = _interaction(row, path, n, report)
    if got:
      yield n, *got


def read_amazon_tsv(directory: Path | str, *, report: Optional[IngestReport] = None,
                    domain: Domain = AMAZON) -> RawData:
  return read_rows(row_source(directory, "amazon-tsv"), report=report, domain=domain)


def read_items_tsv(items_path: Path, report: IngestReport) -> dict[str, ItemMeta]:
  """items.tsv: item_id, title, brand, price, categories (`A > B | C`); all but item_id optional."""
  items: dict[str, ItemMeta] = {}
  for n, row in _table_rows(items_path, report, ("item_id",)):
    item = row["item_id"].strip()
    if not item:
      report.skip("missing_field", str(items_path), n, "item_id", "empty")
      continue
    cats = tuple(c for c in (clean_text(c, report) for c in row.get("categories", "").split("|")) if c)
    _add_meta(items, item, ItemMeta(
        title=clean_text(row.get("title", ""), report), brand=clean_text(row.get("brand", ""), report),
        price=clean_text(row.get("price", ""), report), categories=cats), items_path, n, report)
  return items


# ---------------------------------------------------------------------------------------------
# Raw Amazon 2014 review / metadata dumps


def _format_categories(value) -> tuple[str, ...]:
  """Amazon meta `categories` is a list of category paths (lists of strings)."""
  if isinstance(value, str):
    return (value,)
  paths = []
  for path in value or []:
    if isinstance(path, (list, tuple)):
      paths.append(" > ".join(str(p) for p in path))
    else:
      paths.append(str(path))
  return tuple(paths)


def _json_objects(path: Path, report: IngestReport, count_rows: bool, span: Optional[Span] = None
                  ) -> Iterator[tuple[int, dict]]:
  """(line number, object) of a JSON-lines file (or `span` of it); lines that are not JSON objects are
  counted skips."""
  for n, line in _lines(path, report, span):
    report.rows += count_rows
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      report.skip("malformed_line", str(path), n, None, f"not JSON ({e.msg})")
      continue
    if not isinstance(obj, dict):
      report.skip("malformed_line", str(path), n, None, "not a JSON object")
      continue
    yield n, obj


def _has_ratings(sequences: dict[str, list[Interaction]], path: Path, field: str) -> bool:
  """Whether the reviews carry ratings: all of them, or none (a mix is an error naming the field)."""
  rated = [x.rating is not None for seq in sequences.values() for x in seq]
  if any(rated) and not all(rated):
    raise DataError(str(path), None, field, "some reviews have a rating and others not")
  return any(rated)


def amazon_raw_rows(reviews: Path, report: IngestReport, span: Optional[Span] = None
                    ) -> Iterator[tuple[int, str, Interaction]]:
  """Amazon 2014 / 2018 reviews: (line, reviewerID, (asin, unixReviewTime, overall)) per kept review."""
  for n, obj in _json_objects(reviews, report, True, span):
    missing = [f for f in ("reviewerID", "asin", "unixReviewTime") if not obj.get(f) and obj.get(f) != 0]
    if missing:
      report.skip("missing_field", str(reviews), n, missing[0], "missing or empty")
      continue
    ts = _number(obj["unixReviewTime"], reviews, n, "unixReviewTime", report, "bad_timestamp")
    if ts is None:
      continue
    rating = None
    if "overall" in obj:
      rating = _number(obj["overall"], reviews, n, "overall", report, "bad_rating")
      if rating is None:
        continue
    yield n, str(obj["reviewerID"]), Interaction(str(obj["asin"]), ts, rating)


def read_amazon_raw(reviews: Path | str, meta: Optional[Path | str] = None, *,
                    report: Optional[IngestReport] = None, domain: Domain = AMAZON) -> RawData:
  source = RowSource("amazon-raw", local_or_remote(reviews), meta and local_or_remote(meta))
  return read_rows(source, report=report, domain=domain)


def read_amazon_meta(meta: Path, report: IngestReport) -> dict[str, ItemMeta]:
  """meta_<Category>.json[.gz]: one JSON object or Python-literal dict per line."""
  items: dict[str, ItemMeta] = {}
  for n, line in _lines(meta, report):
    try:
      obj = json.loads(line)
    except json.JSONDecodeError:
      try:  # the 2014 dumps are Python literals (single quotes); literal_eval is safe, eval is not
        obj = ast.literal_eval(line)
      except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        report.skip("malformed_line", str(meta), n, None, f"not a JSON/Python literal ({type(e).__name__})")
        continue
    if not isinstance(obj, dict) or not obj.get("asin"):
      report.skip("missing_field", str(meta), n, "asin", "missing or not a dict")
      continue
    price = obj.get("price", "")
    _add_meta(items, str(obj["asin"]), ItemMeta(
        title=clean_text(str(obj.get("title", "") or ""), report),
        brand=clean_text(str(obj.get("brand", "") or ""), report),
        price="" if price in ("", None) else clean_text(str(price), report),
        categories=tuple(clean_text(c, report) for c in _format_categories(
            obj["categories"] if "categories" in obj else _category_path(obj.get("category"))))),
        meta, n, report)
  return items


def _category_path(value) -> list:
  """Amazon 2018's `category`: one path as a list of strings (2014's `categories` is a list of paths)."""
  return [value] if isinstance(value, list) and value else []


# ---------------------------------------------------------------------------------------------
# RecBole atomic files


def _atomic_header(cols: list[str], path: Path) -> list[str]:
  names = []
  for c in cols:
    name, _, typ = c.partition(":")
    if not typ:
      raise DataError(str(path), 1, c, "RecBole header fields look like 'name:type'")
    names.append(name)
  return names


def read_recbole(path: Path | str, *, report: Optional[IngestReport] = None,
                 domain: Domain = MOVIES) -> RawData:
  """`path` is the folder holding `<name>.inter` (and optionally `<name>.item`, and `<name>.user`:
  every field but user_id is kept as a user attribute, e.g. ml-100k's age, gender, occupation)."""
  path = local_or_remote(path)
  report = report or IngestReport()
  inters = sorted(path.glob("*.inter"))
  if len(inters) != 1:
    raise DataError(str(path), None, None, f"expected exactly one *.inter file, found {len(inters)}")
  inter_path = inters[0]
  item_path = inter_path.with_suffix(".item")

  rows, has_ratings = [], False
  for n, row in _table_rows(inter_path, report, ("user_id", "item_id"), _atomic_header):
    has_ratings = "rating" in row
    got = _interaction(row, inter_path, n, report)
    if got:
      rows.append((n, *got))
  sequences = _by_user(rows, inter_path, report)

  items: dict[str, ItemMeta] = {}
  files = [inter_path]
  if item_path.exists():
    files.append(item_path)
    for n, row in _table_rows(item_path, report, ("item_id",), _atomic_header):
      title = row.get("movie_title", row.get("title", ""))
      cats = row.get("class", row.get("categories", ""))
      _add_meta(items, row["item_id"], ItemMeta(
          title=clean_text(title, report), brand=clean_text(row.get("brand", ""), report),
          price=clean_text(row.get("price", ""), report),
          categories=tuple(clean_text(c, report) for c in cats.split() if c)), item_path, n, report)
  users = {}
  user_path = inter_path.with_suffix(".user")
  if user_path.exists():
    files.append(user_path)
    for n, row in _table_rows(user_path, report, ("user_id",), _atomic_header):
      user = row.pop("user_id").strip()
      if user in users:
        report.skip("duplicate_user_attributes", str(user_path), n, "user_id", f"user {user!r} listed again")
        continue
      users[user] = {k: clean_text(v, report) for k, v in row.items()}
  return RawData(sequences, items, domain, "recbole", files, report, has_ratings, users)


# ---------------------------------------------------------------------------------------------
# One line per user: `user item item ...` (P5 / S3-Rec style sequential_data.txt, user_sequence.txt)

SEQUENCE_FILES = ("sequential_data.txt", "user_sequence.txt")


def read_sequences(path: Path | str, meta: Optional[Path | str] = None, *,
                   report: Optional[IngestReport] = None, domain: Domain = AMAZON) -> RawData:
  """`path`: the sequence file (or a folder holding one of SEQUENCE_FILES). Each line is a user ID
  then that user's items, separated by white space, oldest first (there are no timestamps: the
  order is the file's). `meta`: optional item metadata, an items.tsv or an Amazon meta_*.json[.gz]."""
  path = local_or_remote(path)
  report = report or IngestReport()
  if path.is_dir():
    found = [path / n for n in SEQUENCE_FILES if (path / n).exists()]
    if not found:
      raise DataError(str(path), None, None, f"no sequence file ({' or '.join(SEQUENCE_FILES)})")
    path = found[0]
  sequences: dict[str, list[Interaction]] = {}
  for n, line in _lines(path, report):
    report.rows += 1
    user, *items = line.split()
    if not items:
      report.skip("empty_sequence", str(path), n, None, f"user {user!r} has no items")
      continue
    if user in sequences:
      report.skip("duplicate_user", str(path), n, None, f"user {user!r} listed again")
      continue
    sequences[user] = [Interaction(item, None, None) for item in items]
  files, items_meta = [path], {}
  if meta is not None:
    meta = local_or_remote(meta)
    files.append(meta)
    items_meta = read_items_tsv(meta, report) if meta.suffix == ".tsv" else read_amazon_meta(meta, report)
  return RawData(sequences, items_meta, domain, "sequences", files, report, False)


# ---------------------------------------------------------------------------------------------
# Amazon Reviews 2023: <Category>.jsonl[.gz] + meta_<Category>.jsonl[.gz]


def amazon_2023_rows(reviews: Path, report: IngestReport, span: Optional[Span] = None
                     ) -> Iterator[tuple[int, str, Interaction]]:
  """Amazon Reviews 2023: (line, user_id, (parent_asin, timestamp in seconds, rating)) per kept review; a
  review without parent_asin falls back to its asin (counted as a repair)."""
  for n, obj in _json_objects(reviews, report, True, span):
    item = obj.get("parent_asin") or obj.get("asin")
    if item and not obj.get("parent_asin"):
      report.repair("review_without_parent_asin_uses_asin")
    missing = "user_id" if not obj.get("user_id") else "parent_asin" if not item else (
        "timestamp" if obj.get("timestamp") in (None, "") else None)
    if missing:
      report.skip("missing_field", str(reviews), n, missing, "missing or empty")
      continue
    ms = _number(obj["timestamp"], reviews, n, "timestamp", report, "bad_timestamp")
    rating = _number(obj["rating"], reviews, n, "rating", report, "bad_rating") if "rating" in obj else None
    if ms is None or ("rating" in obj and rating is None):
      continue
    yield n, str(obj["user_id"]), Interaction(str(item), ms / 1000.0, rating)


def read_amazon_2023_meta(meta: Path, report: IngestReport) -> dict[str, ItemMeta]:
  """meta_<Category>.jsonl[.gz]: parent_asin, title, store (the brand), price, categories."""
  items: dict[str, ItemMeta] = {}
  for n, obj in _json_objects(meta, report, False):
    if not obj.get("parent_asin"):
      report.skip("missing_field", str(meta), n, "parent_asin", "missing or empty")
      continue
    price = obj.get("price")
    _add_meta(items, str(obj["parent_asin"]), ItemMeta(
        title=clean_text(str(obj.get("title") or ""), report), brand=clean_text(str(obj.get("store") or ""), report),
        price="" if price in ("", None) else clean_text(str(price), report),
        categories=tuple(clean_text(c, report) for c in _format_categories(_category_path(obj.get("categories"))))),
        meta, n, report)
  return items


def read_amazon_2023(reviews: Path | str, meta: Optional[Path | str] = None, *,
                     report: Optional[IngestReport] = None, domain: Domain = AMAZON) -> RawData:
  """Amazon Reviews 2023 (McAuley lab); items are parent ASINs, as the 2023 benchmarks use them."""
  source = RowSource("amazon-2023", local_or_remote(reviews), meta and local_or_remote(meta))
  return read_rows(source, report=report, domain=domain)


# ---------------------------------------------------------------------------------------------
# MovieLens CSV: ratings.csv (+ movies.csv), the 20M / 25M / 32M layout


def _stripped(cols: list[str], path: Path) -> list[str]:
  return [c.strip() for c in cols]


def movielens_rows(ratings_path: Path, report: IngestReport, span: Optional[Span] = None
                   ) -> Iterator[tuple[int, str, Interaction]]:
  """ratings.csv (userId, movieId, rating, timestamp in seconds): (line, user, interaction) per kept row."""
  for n, row in _table_rows(ratings_path, report, ("userId", "movieId", "rating", "timestamp"), _stripped, sep=",",
                            span=span):
    got = _interaction({"user_id": row["userId"], "item_id": row["movieId"], "timestamp": row["timestamp"],
                        "rating": row["rating"]}, ratings_path, n, report)
    if got:
      yield n, *got


def read_movies_csv(movies: Path, report: IngestReport) -> dict[str, ItemMeta]:
  """movies.csv: movieId, title, genres separated by '|' ('(no genres listed)' is none)."""
  items: dict[str, ItemMeta] = {}
  for n, row in _table_rows(movies, report, ("movieId", "title"), _stripped, sep=","):
    genres = [g for g in row.get("genres", "").split("|") if g and g != "(no genres listed)"]
    _add_meta(items, row["movieId"].strip(), ItemMeta(
        title=clean_text(row["title"], report), categories=tuple(clean_text(g, report) for g in genres)),
        movies, n, report)
  return items


def read_movielens_csv(path: Path | str, *, report: Optional[IngestReport] = None,
                       domain: Domain = MOVIES) -> RawData:
  """`path`: the folder holding ratings.csv and, if present, movies.csv (the 20M / 25M / 32M layout)."""
  return read_rows(row_source(path, "movielens-csv"), report=report, domain=domain)


# ---------------------------------------------------------------------------------------------
# Row sources: the formats whose interaction file holds one interaction per line. The in-process readers
# group the rows by user here; the Beam pipeline (beam_prepare) reads the same rows in parallel.


@dataclasses.dataclass(frozen=True)
class RowSource:
  format: str
  interactions: Path
  meta: Optional[Path] = None

  def rows(self, report: IngestReport, span: Optional[Span] = None) -> Iterator[tuple[int, str, Interaction]]:
    """(line, user, interaction) of each kept row (of `span` of the file), in file order; skips counted in
    `report`."""
    return ROW_READERS[self.format].rows(self.interactions, report, span)

  def items(self, report: IngestReport) -> dict[str, ItemMeta]:
    return ROW_READERS[self.format].items(self.meta, report) if self.meta else {}

  @property
  def rating_field(self) -> str:
    """The source's name for the rating (errors name it)."""
    return ROW_READERS[self.format].rating_field

  @property
  def files(self) -> list[Path]:
    return [self.interactions] + ([self.meta] if self.meta else [])

  @property
  def domain(self) -> Domain:
    return MOVIES if self.format == "movielens-csv" else AMAZON


def read_rows(source: RowSource, *, report: Optional[IngestReport] = None, domain: Optional[Domain] = None
              ) -> RawData:
  """A row source read into one process: rows grouped by user (`_by_user`), ratings all or none."""
  report = report or IngestReport()
  sequences = _by_user(list(source.rows(report)), source.interactions, report)
  has_ratings = _has_ratings(sequences, source.interactions, source.rating_field)
  return RawData(sequences, source.items(report), domain or source.domain, source.format, source.files, report,
                 has_ratings)


def _movielens_ratings(path: Path) -> Path:
  return path / "ratings.csv" if path.is_dir() else path


class RowReader(NamedTuple):
  rows: Callable[..., Iterator[tuple[int, str, Interaction]]]   # (path, report, span=None): the interactions
  items: Callable[[Path, IngestReport], dict[str, ItemMeta]]                    # its item metadata file
  rating_field: str


ROW_READERS = {
    "amazon-tsv": RowReader(amazon_tsv_rows, read_items_tsv, "rating"),
    "amazon-raw": RowReader(amazon_raw_rows, read_amazon_meta, "overall"),
    "amazon-2023": RowReader(amazon_2023_rows, read_amazon_2023_meta, "rating"),
    "movielens-csv": RowReader(movielens_rows, read_movies_csv, "rating"),
}


SOURCES = {"amazon-tsv": read_amazon_tsv, "amazon-raw": read_amazon_raw, "amazon-2023": read_amazon_2023,
           "recbole": read_recbole, "movielens-csv": read_movielens_csv, "sequences": read_sequences}


def _amazon_2018_reviews(path: Path) -> list[Path]:
  return sorted(p for p in path.glob("*_5.json*") if not p.name.startswith("meta_"))


def _amazon_2023_reviews(path: Path) -> list[Path]:
  return sorted(p for p in path.glob("*.jsonl*") if not p.name.startswith("meta_"))


def detect_format(path: Path) -> str:
  if path.is_dir():
    if (path / "interactions.tsv").exists():
      return "amazon-tsv"
    if list(path.glob("*.inter")):
      return "recbole"
    if (path / "ratings.csv").exists():
      return "movielens-csv"
    if list(path.glob("reviews_*.json*")) or _amazon_2018_reviews(path):
      return "amazon-raw"
    if _amazon_2023_reviews(path):
      return "amazon-2023"
    if any((path / n).exists() for n in SEQUENCE_FILES):
      return "sequences"
  elif path.name.startswith("reviews_") or path.name.endswith(("_5.json", "_5.json.gz")):
    return "amazon-raw"
  elif path.name.endswith((".jsonl", ".jsonl.gz")):
    return "amazon-2023"
  elif path.name == "ratings.csv":
    return "movielens-csv"
  elif path.suffix == ".txt":
    return "sequences"
  raise DataError(str(path), None, None, "cannot tell the format; pass --format " + "|".join(SOURCES))


def _located(path: Path | str, fmt: Optional[str]) -> tuple[Path, str]:
  path = local_or_remote(path)
  if not path.exists():
    raise DataError(str(path), None, None, "no such file or folder")
  return path, fmt or detect_format(path)


def row_source(path: Path | str, fmt: Optional[str] = None, meta: Optional[Path | str] = None) -> RowSource:
  """The interaction file and item metadata file of a source in one of the `ROW_READERS` formats (`fmt=None`:
  detected): the reviews file of a folder, metadata found beside it when not given."""
  path, fmt = _located(path, fmt)
  if fmt not in ROW_READERS:
    raise ValueError(f"{fmt!r} is not read row by row; row formats: {sorted(ROW_READERS)}")
  if fmt == "amazon-tsv":
    for p in (path / "interactions.tsv", path / "items.tsv"):
      if not p.exists():
        raise DataError(str(p), None, None, "file not found (amazon-tsv needs interactions.tsv and items.tsv)")
    return RowSource(fmt, path / "interactions.tsv", path / "items.tsv")
  if fmt == "movielens-csv":
    movies = _movielens_ratings(path).parent / "movies.csv"
    return RowSource(fmt, _movielens_ratings(path), movies if movies.exists() else None)
  if path.is_dir():
    reviews = (sorted(path.glob("reviews_*.json*")) or _amazon_2018_reviews(path) if fmt == "amazon-raw"
               else _amazon_2023_reviews(path))
    if len(reviews) != 1:
      raise DataError(str(path), None, None, f"expected one reviews file ({fmt}), found {len(reviews)}: "
                      f"{[p.name for p in reviews]}")
    path = reviews[0]
  if meta is None:   # beside the reviews: meta_<Category>.json[l][.gz]
    category = path.name.split(".")[0].removeprefix("reviews_").removesuffix("_5")
    cands = sorted(path.parent.glob(f"meta_{category}.json*")) or sorted(path.parent.glob("meta_*.json*"))
    meta = cands[0] if cands else None
  return RowSource(fmt, path, meta and local_or_remote(meta))


def read_source(path: Path | str, fmt: Optional[str] = None, *, meta: Optional[Path | str] = None,
                report: Optional[IngestReport] = None, domain: Optional[Domain] = None) -> RawData:
  """Reads any supported source; `fmt=None` detects it from the path. `domain`: the template words
  (default: Amazon products; movies for RecBole and MovieLens)."""
  path, fmt = _located(path, fmt)
  if fmt not in SOURCES:
    raise ValueError(f"unknown source format {fmt!r}; known: {sorted(SOURCES)}")
  if fmt in ROW_READERS:
    return read_rows(row_source(path, fmt, meta), report=report, domain=domain)
  kw = {"report": report} | ({"domain": domain} if domain else {})
  if fmt == "sequences":
    if meta is None and path.is_dir() and (path / "items.tsv").exists():
      meta = path / "items.tsv"
    return read_sequences(path, meta, **kw)
  return SOURCES[fmt](path, **kw)
