import gzip
import json
import re

import numpy as np
import pytest

from conftest import shared, write_tiny_tsv
from recalign import cli
from recalign.data import DataError, IngestReport, PreparedData, item_id, prepare, read_source
from recalign.data.ingest import MOVIES, Interaction, RawData, clean_text
from recalign.data.prepare import kcore_filter


@pytest.fixture(scope="module")
def beauty():
  return prepare(read_source(shared("amazon-beauty")), name="beauty", seed=0)


def test_beauty_counts_match_source_md(beauty):
  text = (shared("amazon-beauty") / "SOURCE.md").read_text()
  expected = {k: int(v) for k, v in re.findall(r"- (users|items|interactions): (\d+)", text)}
  c = beauty.manifest["counts"]
  assert expected == {"users": 22363, "items": 12101, "interactions": 198502}  # SOURCE.md was parsed
  assert (c["users"], c["items"], c["interactions"]) == (
      expected["users"], expected["items"], expected["interactions"])
  assert c["validation_users"] == 3000 and c["test_users"] == 22363
  assert beauty.manifest["report"]["repaired"]["html_entities_unescaped"] > 0
  assert not any("&amp;" in m.title for m in beauty.items)


def test_leave_one_out_has_no_leakage(beauty):
  for u, seq in enumerate(beauty.sequences):
    train = set(beauty.train_sequence(u).tolist())
    assert len(train) == len(seq) - 2
    assert beauty.validation_target(u) not in train and beauty.test_target(u) not in train
    assert beauty.validation_target(u) != beauty.test_target(u)
    ts = beauty.timestamps[u]
    assert np.all(np.diff(ts) >= 0)  # chronological: the held-out items are the latest
  # popularity counts only the training split
  assert beauty.train_popularity().sum() == beauty.manifest["counts"]["train_interactions"]


def test_random_ids_deterministic_seeded_and_not_order_of_appearance(beauty, tmp_path):
  raw = read_source(shared("amazon-beauty"))
  again = prepare(raw, name="beauty", seed=0)
  other = prepare(read_source(shared("amazon-beauty")), name="beauty", seed=1)
  assert again.source_item_ids == beauty.source_item_ids
  assert other.source_item_ids != beauty.source_item_ids
  assert not np.array_equal(other.validation_users, beauty.validation_users)
  # Order of first appearance vs. assigned number: uncorrelated.
  first_seen, order = {}, []
  for seq in beauty.sequences:
    for i in seq.tolist():
      if i not in first_seen:
        first_seen[i] = len(first_seen)
        order.append(i)
  rho = np.corrcoef(np.arange(len(order)), np.array(order))[0, 1]
  assert abs(rho) < 0.05, rho
  # IDs survive a save/load round trip.
  beauty.save(tmp_path / "b")
  loaded = PreparedData.load(tmp_path / "b")
  assert loaded.source_item_ids == beauty.source_item_ids
  assert all(np.array_equal(a, b) for a, b in zip(loaded.sequences, beauty.sequences))
  assert loaded.items[5] == beauty.items[5]


def test_recbole_ml100k_has_ratings_and_movie_domain():
  raw = read_source(shared("ml-100k"))
  assert raw.source_format == "recbole" and raw.has_ratings
  assert len(raw.sequences) == 943 and sum(map(len, raw.sequences.values())) == 100000
  assert len(raw.items) == 1682 and raw.items["1"].title == "Toy Story"
  assert raw.items["1"].categories == ("Animation", "Children's", "Comedy")
  # ml-100k.user: `1	24	M	technician	85711`
  assert raw.user_attributes["1"] == {"age": "24", "gender": "M", "occupation": "technician", "zip_code": "85711"}
  data = prepare(raw, name="ml100k")
  assert data.has_ratings and data.domain.noun == "movies"
  assert data.ratings[0].shape == data.sequences[0].shape
  assert data.manifest["user_attributes"] == ["age", "gender", "occupation", "zip_code"]
  u = data.users.index("1")
  assert data.user_attributes[u]["occupation"] == "technician"


def test_user_attributes_survive_save_and_load(tmp_path):
  raw = RawData({"a": [Interaction(str(i), float(i), 4.0) for i in range(3)]}, {}, MOVIES, "x", [], IngestReport(),
                True, {"a": {"age": "31", "gender": "F"}})
  prepare(raw, name="one", kcore=0).save(tmp_path / "one")
  assert PreparedData.load(tmp_path / "one").user_attributes == [{"age": "31", "gender": "F"}]
  assert PreparedData.load(tmp_path / "one").ratings is not None


def test_chronological_sort_is_stable_and_duplicates_keep_earliest(tmp_path):
  write_tiny_tsv(tmp_path)
  data = prepare(read_source(tmp_path), name="tiny", kcore=0)
  u1 = data.users.index("u1")
  assert [data.source_item_ids[i] for i in data.sequences[u1]] == ["b", "c", "a", "d", "e"]
  u5 = data.users.index("u5")  # a and e share timestamp 1: file order kept
  assert [data.source_item_ids[i] for i in data.sequences[u5]] == ["a", "e", "h", "c"]
  assert data.ratings[u1].tolist() == [4, 2, 5, 5, 1]
  assert [data.items[i].title for i in data.sequences[u1][:1]] == ["Lip Balm & Tint"]


def test_kcore_is_iterative():
  I = lambda *items: [Interaction(i, None, None) for i in items]  # noqa: E731, E741
  seqs = {"u1": I("a", "b"), "u2": I("a", "b"), "u3": I("a", "c")}
  # k=2: item c (1 user) goes, then u3 has 1 item and goes, then a and b still have 2 users.
  assert {u: [x.item for x in s] for u, s in kcore_filter(seqs, 2).items()} == {
      "u1": ["a", "b"], "u2": ["a", "b"]}
  assert kcore_filter(seqs, 3) == {}


def test_clean_text_unescapes_folds_and_removes_markers():
  rep = IngestReport()
  assert clean_text("Tom &amp;amp; Jerry\tpart\n2", rep) == "Tom & Jerry part 2"
  assert clean_text("Balm [masked item] <extra_id_3> x", rep) == "Balm x"
  assert rep.repaired["html_entities_unescaped"] == 1
  assert rep.repaired["template_markers_removed"] == 1
  assert rep.repaired["tabs_newlines_folded"] == 1


def _write_raw(tmp_path):
  reviews = [
      {"reviewerID": "U1", "asin": "A", "overall": 5.0, "unixReviewTime": 10},
      {"reviewerID": "U1", "asin": "B", "overall": 2.0, "unixReviewTime": 20},
      "this is { not json",
      {"reviewerID": "U1", "asin": "C", "overall": 4.0},                       # no time
      {"reviewerID": "U1", "asin": "C", "overall": 4.0, "unixReviewTime": 30},
      {"reviewerID": "U2", "asin": "A", "overall": "x", "unixReviewTime": 5},  # bad rating
      {"reviewerID": "U2", "asin": "A", "overall": 3.0, "unixReviewTime": 5},
      {"reviewerID": "U2", "asin": "B", "overall": 4.0, "unixReviewTime": 6},
      {"reviewerID": "U2", "asin": "C", "overall": 1.0, "unixReviewTime": 7},
      {"reviewerID": "U3", "asin": "A", "overall": 1.0, "unixReviewTime": 7},  # only 1 interaction
  ]
  with gzip.open(tmp_path / "reviews_Test_5.json.gz", "wt") as f:
    for r in reviews:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  meta = [
      "{'asin': 'A', 'title': 'Shampoo &amp; Rinse', 'price': 3.5, 'brand': 'X', "
      "'categories': [['Beauty', 'Hair']]}",
      "{'asin': 'B', 'title': 'Tab\\there', 'categories': [['Beauty']]}",
      "{'asin': 'C', 'title': __import__('os').system('echo pwned')}",   # must never be evaluated
      "{'asin': 'Z', 'title': 'unused'}",
  ]
  (tmp_path / "meta_Test.json").write_text("\n".join(meta) + "\n")


def test_amazon_raw_parser_counts_every_bad_line(tmp_path):
  _write_raw(tmp_path)
  raw = read_source(tmp_path)
  assert raw.source_format == "amazon-raw" and raw.has_ratings
  rep = raw.report
  assert rep.skipped["malformed_line"] == 2          # the broken review and the code-carrying meta line
  assert rep.skipped["missing_field"] == 1 and rep.skipped["bad_rating"] == 1
  assert any("reviews_Test_5.json.gz:3" in e for e in rep.examples["malformed_line"])
  assert raw.items["A"] .title == "Shampoo & Rinse" and raw.items["A"].price == "3.5"
  assert raw.items["A"].categories == ("Beauty > Hair",) and raw.items["B"].title == "Tab here"
  data = prepare(raw, name="t", kcore=0)
  sk = data.manifest["report"]["skipped"]
  assert sk["users_with_fewer_than_3_interactions"] == 1   # U3
  assert sk["items_without_metadata"] == 1                  # C (its meta line was refused)
  assert sk["metadata_items_not_in_interactions"] == 1      # Z
  assert data.num_users == 2 and data.num_items == 3


def test_strict_mode_names_file_line_and_field(tmp_path):
  _write_raw(tmp_path)
  with pytest.raises(DataError, match=r"reviews_Test_5\.json\.gz:3: not JSON"):
    read_source(tmp_path, report=IngestReport(strict=True))
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "x.inter").write_text("user_id:token\titem_id:token\trating:float\n1\t2\tfive\n")
  with pytest.raises(DataError, match=r"x\.inter:2 \[rating\]: not a number"):
    read_source(tmp_path / "bad", report=IngestReport(strict=True))


def test_cli_prepare_and_stats(tmp_path, capsys):
  write_tiny_tsv(tmp_path / "src")
  assert cli.main(["prepare", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "tiny"),
                   "--kcore", "2"]) == 0
  assert cli.main(["stats", str(tmp_path / "tiny")]) == 0
  out = capsys.readouterr().out
  assert "users         6" in out and "items         8" in out and "ratings       yes" in out
  manifest = json.loads((tmp_path / "tiny" / "manifest.json").read_text())
  assert manifest["source"]["files"][str(tmp_path / "src" / "items.tsv")] is not None
  rows = (tmp_path / "tiny" / "items.jsonl").read_text().splitlines()
  assert [json.loads(r)["id"] for r in rows] == [item_id(k) for k in range(8)]


def _tsv_without_timestamps(root, *, partial=False):
  """The shared Beauty rows of the first 300 users, timestamp column empty (rows stay chronological)."""
  lines = (shared("amazon-beauty") / "interactions.tsv").read_text().splitlines()
  users, out = [], [lines[0]]
  for line in lines[1:]:
    u, i, t = line.split("\t")
    if u not in users:
      if len(users) == 300:
        break
      users.append(u)
    out.append(f"{u}\t{i}\t{t if partial and len(out) % 3 else ''}")
  root.mkdir()
  (root / "interactions.tsv").write_text("\n".join(out) + "\n")
  (root / "items.tsv").write_text((shared("amazon-beauty") / "items.tsv").read_text())
  return root, len(out) - 1


def test_empty_timestamp_column_means_file_order(tmp_path, capsys):
  src, rows = _tsv_without_timestamps(tmp_path / "src")
  with_ts = prepare(read_source(shared("amazon-beauty")), name="b", kcore=0)
  data = prepare(read_source(src), name="b", kcore=0)
  assert data.manifest["counts"]["interactions"] == rows and not data.manifest["has_timestamps"]
  skipped = data.manifest["report"]["skipped"]
  assert data.manifest["order"].startswith("file order") and "bad_timestamp" not in skipped
  assert sum(v for k, v in skipped.items() if k != "metadata_items_not_in_interactions") == 0
  # Same sequences as the timestamped file for these users (its rows are chronological).
  by_user = {u: [with_ts.source_item_ids[i] for i in s] for u, s in zip(with_ts.users, with_ts.sequences)}
  assert all([data.source_item_ids[i] for i in s] == by_user[u] for u, s in zip(data.users, data.sequences))
  assert cli.main(["prepare", "--source", str(src), "--out", str(tmp_path / "p"), "--kcore", "0"]) == 0
  assert "order         file order (the source has no timestamps)" in capsys.readouterr().out


def test_timestamps_missing_in_some_rows_are_counted_and_a_mostly_skipped_file_says_why(tmp_path, capsys):
  src, rows = _tsv_without_timestamps(tmp_path / "src", partial=True)
  data = prepare(read_source(src), name="b", kcore=0)
  skipped = data.manifest["report"]["skipped"]["missing_timestamp"]
  assert 0.3 * rows < skipped < 0.4 * rows      # one row in three had no timestamp
  assert data.manifest["report"]["examples"]["missing_timestamp"][0].startswith(str(src / "interactions.tsv") + ":")
  # Every timestamp unreadable: one clear line naming the dominant reason, not a traceback.
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "interactions.tsv").write_text("user_id\titem_id\ttimestamp\n" + "".join(
      f"u{k % 5}\ti{k}\t2014-07-{k % 28 + 1:02d}\n" for k in range(50)))
  (bad / "items.tsv").write_text("item_id\ttitle\n")
  assert cli.main(["prepare", "--source", str(bad), "--out", str(tmp_path / "p")]) == 2
  err = capsys.readouterr().err.splitlines()
  assert err[0].startswith("error: ") and "no users left" in err[0] and "50 of 50 rows" in err[0]
  assert "bad_timestamp" in err[0] and "interactions.tsv:2 [timestamp]" in err[0]
  assert not any("Traceback" in line for line in err)


def test_one_line_per_user_sequence_files(tmp_path):
  """`user item item ...` (sequential_data.txt / user_sequence.txt), with optional item metadata."""
  src = tmp_path / "seq"
  src.mkdir()
  lines = [f"u{u} " + " ".join(f"i{(u + t) % 12}" for t in range(6)) for u in range(30)]
  (src / "sequential_data.txt").write_text("\n".join(lines + ["u99", "u3 i1 i2 i3"]) + "\n")
  (src / "items.tsv").write_text("item_id\ttitle\tbrand\tprice\tcategories\n" + "".join(
      f"i{k}\tThing {k}\t\t\tBeauty > Things\n" for k in range(12)))
  raw = read_source(src)
  assert raw.source_format == "sequences" and len(raw.sequences) == 30
  assert raw.report.skipped == {"empty_sequence": 1, "duplicate_user": 1}
  data = prepare(raw, name="seq", kcore=0)
  u0 = data.users.index("u0")
  assert [data.source_item_ids[i] for i in data.sequences[u0]] == [f"i{t}" for t in range(6)]   # file order
  assert data.items[data.source_item_ids.index("i3")].title == "Thing 3"
  assert data.manifest["order"].startswith("file order") and data.manifest["fields"]["title"] == 12
  bare = read_source(src / "sequential_data.txt", "sequences")        # the file alone, no metadata
  assert not bare.items and len(bare.sequences) == 30


def _jsonl(path, rows, bad=()):
  """Rows as JSON lines (gzip for .gz); `bad`: (1-based line, raw text) written in place of a row."""
  lines = [json.dumps(r) for r in rows]
  for n, text in bad:
    lines.insert(n - 1, text)
  data = ("\n".join(lines) + "\n").encode()
  path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_amazon_2018_reviews_and_json_meta_with_a_category_list(tmp_path):
  reviews = [{"reviewerID": u, "asin": i, "overall": 4.0, "unixReviewTime": t, "vote": "2", "style": {"Size:": "M"}}
             for u, i, t in [("U1", "A", 10), ("U1", "B", 20), ("U1", "C", 30), ("U2", "B", 5), ("U2", "A", 6)]]
  _jsonl(tmp_path / "Luxury_Beauty_5.json.gz", reviews, bad=[(3, '{"reviewerID": "U9", "asin": "Q"}')])
  _jsonl(tmp_path / "meta_Luxury_Beauty.json.gz", [
      {"asin": "A", "title": "Night &amp; Day Cream", "brand": "Olay", "price": "$12.99",
       "category": ["Luxury Beauty", "Skin Care"]},
      {"asin": "B", "title": "Serum", "category": []}])
  raw = read_source(tmp_path)
  assert raw.source_format == "amazon-raw" and raw.has_ratings
  assert [x.item for x in raw.sequences["U1"]] == ["A", "B", "C"] and raw.sequences["U2"][0].timestamp == 5
  assert raw.report.skipped["missing_field"] == 1
  assert any("Luxury_Beauty_5.json.gz:3" in e for e in raw.report.examples["missing_field"])
  assert raw.items["A"].categories == ("Luxury Beauty > Skin Care",) and raw.items["A"].title == "Night & Day Cream"
  assert raw.items["A"].price == "$12.99" and raw.items["B"].categories == ()
  assert [p.name for p in raw.source_files] == ["Luxury_Beauty_5.json.gz", "meta_Luxury_Beauty.json.gz"]


def test_amazon_2023_parent_asins_millisecond_timestamps_and_store(tmp_path):
  rows = [{"user_id": "AG1", "asin": "a1", "parent_asin": "P1", "rating": 5.0, "timestamp": 1588615855070},
          {"user_id": "AG1", "asin": "a2", "parent_asin": "P2", "rating": 3.0, "timestamp": 1588615856000},
          {"user_id": "AG2", "asin": "a3", "rating": 4.0, "timestamp": 1588615000000},             # no parent: asin
          {"user_id": "AG2", "parent_asin": "P1", "rating": "five", "timestamp": 1588615900000},
          {"user_id": "", "parent_asin": "P1", "rating": 1.0, "timestamp": 1}]
  _jsonl(tmp_path / "All_Beauty.jsonl", rows, bad=[(2, "not json")])
  _jsonl(tmp_path / "meta_All_Beauty.jsonl", [
      {"parent_asin": "P1", "title": "Lip Balm", "store": "Burt's Bees", "price": 4.99,
       "categories": ["Beauty", "Lips"], "main_category": "All Beauty"},
      {"parent_asin": "P2", "title": "Comb", "store": None, "price": None, "categories": []},
      {"title": "no id"}])
  raw = read_source(tmp_path)
  assert raw.source_format == "amazon-2023" and raw.has_ratings
  assert [(x.item, x.timestamp, x.rating) for x in raw.sequences["AG1"]] == [
      ("P1", 1588615855.07, 5.0), ("P2", 1588615856.0, 3.0)]
  assert [x.item for x in raw.sequences["AG2"]] == ["a3"]
  rep = raw.report
  assert (rep.skipped["malformed_line"], rep.skipped["bad_rating"], rep.skipped["missing_field"]) == (1, 1, 2)
  assert rep.repaired["review_without_parent_asin_uses_asin"] == 1 and rep.rows == 6
  assert any("All_Beauty.jsonl:2" in e for e in rep.examples["malformed_line"])
  assert any("All_Beauty.jsonl:5 [rating]" in e for e in rep.examples["bad_rating"])
  assert raw.items["P1"].brand == "Burt's Bees" and raw.items["P1"].price == "4.99"
  assert raw.items["P1"].categories == ("Beauty > Lips",) and raw.items["P2"].price == ""


def test_movielens_csv_ratings_and_quoted_titles(tmp_path):
  (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4.0,964982703\n1,20,3.5,964981247\n"
                                        "1,30,five,964982224\n2,10,5.0,964983000\n2,20\n")
  (tmp_path / "movies.csv").write_text('movieId,title,genres\n10,"American President, The (1995)",Comedy|Romance\n'
                                       "20,Heat (1995),(no genres listed)\n")
  raw = read_source(tmp_path)
  assert raw.source_format == "movielens-csv" and raw.has_ratings and raw.domain == MOVIES
  assert [(x.item, x.timestamp, x.rating) for x in raw.sequences["1"]] == [("10", 964982703.0, 4.0),
                                                                           ("20", 964981247.0, 3.5)]
  rep = raw.report
  assert (rep.skipped["bad_rating"], rep.skipped["malformed_line"]) == (1, 1)
  assert any("ratings.csv:4 [rating]" in e for e in rep.examples["bad_rating"])
  assert any("ratings.csv:6" in e for e in rep.examples["malformed_line"])
  assert raw.items["10"].title == "American President, The (1995)" and raw.items["10"].categories == (
      "Comedy", "Romance")
  assert raw.items["20"].categories == ()
  with pytest.raises(DataError, match=r"ratings\.csv:1 \[timestamp\]: missing header"):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "ratings.csv").write_text("userId,movieId,rating\n1,2,3\n")
    read_source(tmp_path / "x")


def test_file_pieces_numbered_by_counted_lines_give_the_whole_file(tmp_path):
  """What Beam's readers rely on: a file cut into byte ranges at any size, each range's first line numbered
  from the lines counted in the ranges before it, yields exactly the file's lines and numbers (ranges that
  start or end inside a line, on a newline, empty lines, CRLF, no final newline)."""
  from recalign.data.ingest import _lines, count_lines, file_spans
  rng = np.random.default_rng(0)
  path = tmp_path / "f.txt"
  for _ in range(60):
    lines = ["x" * int(rng.integers(0, 8)) for _ in range(int(rng.integers(0, 12)))]
    path.write_bytes(("\r\n" if rng.random() < 0.3 else "\n").join(lines).encode()
                     + [b"", b"\n", b"\n\n"][int(rng.integers(3))])
    whole = list(_lines(path, IngestReport()))
    for split in range(1, 16):
      got, first = [], 1
      for span in file_spans(path, split):
        got += _lines(path, IngestReport(), span._replace(first_line=first))
        first += count_lines(path, span)
      assert got == whole, (path.read_bytes(), split)
  packed = tmp_path / "f.txt.gz"
  packed.write_bytes(gzip.compress(b"a\nb\nc\n"))
  (span,) = file_spans(packed, 1)   # not cut: a gzip stream is read from its start
  assert list(_lines(packed, IngestReport(), span)) == [(1, "a"), (2, "b"), (3, "c")]


def test_ragged_rows_are_views_of_one_flat_array():
  """PreparedData's per-user arrays as one flat array + offsets: indexing, negative indices, slices, iteration
  and lengths as a list of arrays gives them; rows are read-only; rows put in another order (the TFDS copy's
  files hold users out of order) are the rows moved, not re-cut."""
  from recalign.data.prepare import Ragged, _in_order
  rows = [[3, 1, 4], [], [1, 5], [9, 2, 6, 5]]
  r = Ragged.from_rows(rows, np.int32)
  assert len(r) == 4 and [x.tolist() for x in r] == rows and r[-1].tolist() == rows[-1] and r[1].size == 0
  assert [x.tolist() for x in r[1:3]] == rows[1:3] and r.lengths().tolist() == [3, 0, 2, 4]
  assert r[2].dtype == np.int32 and np.shares_memory(r[0], r.values)
  with pytest.raises(IndexError):
    r[4]
  with pytest.raises(ValueError):
    r[0][0] = 7
  with pytest.raises(ValueError, match="add up to 5, not the 9 values"):
    Ragged(r.values, [3, 0, 2])
  order = np.array([3, 0, 2, 1])
  moved = _in_order(r.values.copy(), r.lengths(), order)
  assert [x.tolist() for x in moved] == [rows[k] for k in order]
  assert _in_order(r.values, r.lengths(), np.arange(4)).values is r.values      # in order already: no copy


def test_a_folder_loaded_twice_is_one_object_until_rewritten_or_released(tmp_path):
  import dataclasses
  import gc
  import weakref
  data = prepare(read_source(write_tiny_tsv(tmp_path / "src")), name="tiny", kcore=0)
  data.save(tmp_path / "p")
  a = PreparedData.load(tmp_path / "p")
  assert PreparedData.load(str(tmp_path / "p" / ".." / "p")) is a   # the tasks and validation share it
  # the same folder written again (other validation users) is read again, with its new content
  changed = dataclasses.replace(data, validation_users=np.array([0], np.int32))
  changed.save(tmp_path / "p")
  b = PreparedData.load(tmp_path / "p")
  assert b is not a and b.validation_users.tolist() == [0] and a.validation_users.tolist() != [0]
  # without timestamps: another object, the same sequences, and one that is never saved
  lean = PreparedData.load(tmp_path / "p", timestamps=False)
  assert lean is not b and lean.timestamps is None and b.timestamps is not None
  assert all(np.array_equal(lean.sequences[u], b.sequences[u]) for u in range(b.num_users))
  with pytest.raises(ValueError, match="loaded without its timestamps"):
    lean.save(tmp_path / "q")
  # nothing is kept alive by the cache: released objects are freed
  ref = weakref.ref(b)
  del b
  gc.collect()
  assert ref() is None
  # a folder of another format version is an error naming the manifest's field
  manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
  (tmp_path / "p" / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
  with pytest.raises(DataError, match=r"manifest.json.*format_version.*got 0"):
    PreparedData.load(tmp_path / "p")
