"""`recalign prepare --beam_runner DirectRunner` makes exactly the folder the in-process path makes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

if not os.environ.get("CI"):   # CI installs the test extra, which holds the beam extra: there, missing is a failure
  pytest.importorskip("apache_beam", reason="the beam extra: pip install -e '.[beam]'")

from recalign.data import DataError, PreparedData, prepare, read_source, tfds_data  # noqa: E402
from recalign.data import beam_prepare  # noqa: E402
from conftest import shared, write_tiny_tsv  # noqa: E402


def messy_rows(users: int = 40, items: int = 45, seed: int = 0) -> list[tuple[str, str, int, int]]:
  """Short random sequences (a k-core that needs several rounds), repeated user-item pairs, equal timestamps
  (Unix seconds that float32 would round)."""
  rng = np.random.default_rng(seed)
  return [(f"u{u}", f"i{int(rng.integers(items))}", 1_388_534_401 + 3_601 * int(rng.integers(1, 6)),
           int(rng.integers(1, 6)))
          for u in range(users) for _ in range(int(rng.integers(2, 8)))]


def messy_tsv(root: Path, users: int = 40, items: int = 45, seed: int = 0) -> Path:
  """messy_rows as amazon-tsv, with a row without a timestamp and a malformed line (counted skips)."""
  lines = ["user_id\titem_id\ttimestamp\trating"] + ["\t".join(map(str, r)) for r in messy_rows(users, items, seed)]
  lines.insert(7, "u3\ti1\t\t4")
  lines.insert(11, "broken line")
  root.mkdir(parents=True, exist_ok=True)
  (root / "interactions.tsv").write_text("\n".join(lines) + "\n")
  (root / "items.tsv").write_text("item_id\ttitle\n" + "".join(f"i{k}\tThing {k}\n" for k in range(items - 3)))
  return root


def messy_source(root: Path, fmt: str) -> Path:
  """messy_rows in another row format, each with its own kinds of bad lines and partial metadata."""
  rows, root = messy_rows(), root / fmt
  root.mkdir(parents=True)
  if fmt == "movielens-csv":
    lines = ["userId,movieId,rating,timestamp"] + [f"{u[1:]},{i[1:]},{r}.0,{t}" for u, i, t, r in rows]
    lines[5:5] = ["7,3,x,10", "7,3"]                                   # bad rating, malformed
    (root / "ratings.csv").write_text("\n".join(lines) + "\n")
    (root / "movies.csv").write_text("movieId,title,genres\n" + "".join(
        f'{k},"Film {k}, The",Drama|Comedy\n' for k in range(40)))
  elif fmt == "amazon-2023":
    lines = [json.dumps({"user_id": u, "parent_asin": i, "timestamp": t * 1000, "rating": float(r)})
             for u, i, t, r in rows]
    lines[4:4] = ['{"user_id": "u1", "timestamp": 5}', "not json"]     # no item, malformed
    lines.insert(9, json.dumps({"user_id": "u2", "asin": "i7", "timestamp": 2000, "rating": 3.0}))   # a repair
    (root / "Beauty.jsonl").write_text("\n".join(lines) + "\n")
    (root / "meta_Beauty.jsonl").write_text("".join(
        json.dumps({"parent_asin": f"i{k}", "title": f"Thing {k}", "store": "S", "categories": ["A", "B"]}) + "\n"
        for k in range(40)))
  elif fmt == "amazon-raw":
    lines = [json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t, "overall": float(r)}) for u, i, t, r in rows]
    lines[3:3] = ['{"reviewerID": "u5", "asin": "i2", "unixReviewTime": "soon", "overall": 4}']   # bad timestamp
    (root / "Beauty_5.json").write_text("\n".join(lines) + "\n")
    (root / "meta_Beauty.json").write_text("".join(
        json.dumps({"asin": f"i{k}", "title": f"Thing {k}", "category": ["A", "B"]}) + "\n" for k in range(40)))
  return root


def assert_same_folder(src: Path, work: Path, split_bytes: int = beam_prepare.SPLIT_BYTES, **settings) -> PreparedData:
  """The in-process folder and the Beam one (its source read in pieces of `split_bytes`) load as the same data
  set, with the same manifest (but when)."""
  mem = prepare(read_source(src), name="x", **settings)
  tfds_data.save(mem, work / "mem")
  manifest = beam_prepare.prepare_folder(src, work / "beam", name="x", split_bytes=split_bytes, **settings)
  assert not (work / "beam" / "users.jsonl").exists()         # the users are the TFDS copy
  a, b = PreparedData.load(work / "mem"), PreparedData.load(work / "beam")
  for field in ("users", "source_item_ids", "items"):
    assert getattr(a, field) == getattr(b, field), field
  for field in ("sequences", "timestamps", "ratings"):
    assert (getattr(a, field) is None) == (getattr(b, field) is None), field
    for u, (x, y) in enumerate(zip(getattr(a, field) or [], getattr(b, field) or [])):
      np.testing.assert_array_equal(x, y, err_msg=f"{field} of user {u}")
  np.testing.assert_array_equal(a.validation_users, b.validation_users)
  assert json.loads((work / "beam" / "validation_users.json").read_text()) == a.validation_users.tolist()
  drop = lambda m: {k: v for k, v in m.items() if k not in ("created", "beam")}   # noqa: E731
  assert drop(b.manifest) == drop(a.manifest) and b.manifest == manifest
  assert tfds_data.manifest(tfds_data.reader(work / "beam")) == manifest      # the copy is this preparation's
  return a


@pytest.mark.parametrize("kcore,split_bytes,group", [(0, beam_prepare.SPLIT_BYTES, 3), (3, 97, 100_000)])
def test_beam_folder_is_the_in_process_folder(tmp_path, monkeypatch, kcore, split_bytes, group):
  """One reader, and the file cut into ~60 pieces (most boundaries inside a line; the header only in the first);
  one reader grouping its rows by user in runs of 3 rows (a user's rows come in many parts)."""
  monkeypatch.setattr(beam_prepare, "GROUP_ROWS", group)
  data = assert_same_folder(messy_tsv(tmp_path / "src"), tmp_path / "messy", split_bytes, kcore=kcore,
                            num_validation_users=10)
  report = data.manifest["report"]
  assert report["skipped"]["missing_timestamp"] == 1 and report["skipped"]["malformed_line"] == 1
  assert report["repaired"]["duplicate_user_item_dropped"] > 0 and report["skipped"]["items_without_metadata"] > 0
  assert ":8 [timestamp]" in report["examples"]["missing_timestamp"][0]           # file:line, as in-process
  if kcore:
    assert report["skipped"]["users_removed_by_kcore"] > 0
  assert assert_same_folder(write_tiny_tsv(tmp_path / "tiny"), tmp_path / "t", kcore=kcore).num_users == 6


@pytest.mark.parametrize("fmt", ["movielens-csv", "amazon-2023", "amazon-raw"])
def test_beam_reads_every_row_format_as_the_in_process_readers(tmp_path, fmt):
  data = assert_same_folder(messy_source(tmp_path, fmt), tmp_path / "out", 101, kcore=3, num_validation_users=10)
  assert data.manifest["source"]["format"] == fmt and sum(data.manifest["report"]["skipped"].values()) > 0
  assert data.has_ratings and data.timestamps is not None and data.has_titles


def test_beam_folder_without_timestamps_ratings_brands_or_prices(tmp_path):
  """A source in file order only (no timestamp column), no ratings, titles only: the same folder too."""
  src = tmp_path / "src"
  src.mkdir()
  (src / "interactions.tsv").write_text("user_id\titem_id\n" + "".join(f"{u}\t{i}\n" for u, i, _, _ in messy_rows()))
  (src / "items.tsv").write_text("item_id\ttitle\n" + "".join(f"i{k}\tThing {k}\n" for k in range(30)))
  data = assert_same_folder(src, tmp_path / "out", kcore=3, num_validation_users=10)
  assert data.timestamps is None and not data.has_ratings and data.manifest["order"].startswith("file order")
  assert data.manifest["fields"]["brand"] == data.manifest["fields"]["price"] == 0


def test_beam_kcore_that_has_not_converged_fails(tmp_path):
  with pytest.raises(Exception, match="raise kcore_rounds"):
    beam_prepare.prepare_folder(messy_tsv(tmp_path / "src"), tmp_path / "out", kcore=3, kcore_rounds=1)


def test_beam_strict_fails_on_the_first_bad_row_by_name(tmp_path):
  # line 12 named when the file is read in pieces too, by parallel workers: the earliest bad row of the file
  # (line 12; later pieces hold more), whichever piece failed first
  src = messy_tsv(tmp_path / "src")
  with open(src / "interactions.tsv", "a") as f:
    f.write("".join(f"bad line {k}\n" for k in range(40)))
  parallel = ["--direct_num_workers=4", "--direct_running_mode=multi_threading"]
  for split_bytes, options in ((beam_prepare.SPLIT_BYTES, None), (97, None), (97, parallel)):
    with pytest.raises(DataError, match=r"interactions.tsv:12: expected 4 tab-separated fields"):
      beam_prepare.prepare_folder(src, tmp_path / "out", strict=True, split_bytes=split_bytes, options=options,
                                  kcore=3)
  with pytest.raises(ValueError, match="not read row by row"):
    beam_prepare.prepare_folder(shared("ml-100k"), tmp_path / "out2")
  with pytest.raises(DataError, match="no such file"):
    beam_prepare.prepare_folder(tmp_path / "nothing", tmp_path / "out3")
  with pytest.raises(ValueError, match=r"at least a byte \(--beam_split_mb\), not 0 bytes"):
    beam_prepare.prepare_folder(write_tiny_tsv(tmp_path / "tiny"), tmp_path / "out5", split_bytes=0)
  with pytest.raises(DataError, match="interactions.tsv: no users left after filtering"):
    beam_prepare.prepare_folder(write_tiny_tsv(tmp_path / "tiny"), tmp_path / "out4", kcore=50)
  # strict, and the rows left make no user: the bad row still, not "no users left"
  with pytest.raises(DataError, match=r"interactions.tsv:12: expected 4 tab-separated fields"):
    beam_prepare.prepare_folder(src, tmp_path / "out6", strict=True, split_bytes=97, kcore=50)


def test_beam_prepare_train_streamed_and_eval_end_to_end(tmp_path):
  """`recalign prepare --beam_runner DirectRunner` (a folder without users.jsonl) -> `recalign vocab` ->
  `recalign train` on streamed tasks, in a fresh process -> `recalign eval` of its checkpoint (which
  re-registers them streamed, as run.json says)."""
  import subprocess
  import sys
  import tensorflow_datasets as tfds
  from conftest import REPO, TRAIN_ENV
  from recalign.cli import main
  import recalign.tasks as rt
  from recalign.tasks import registry
  write_tiny_tsv(tmp_path / "src")
  data = tmp_path / "tiny"
  assert main(["prepare", "--source", str(tmp_path / "src"), "--out", str(data), "--kcore", "0",
               "--beam_runner", "DirectRunner", "--beam_options=--direct_num_workers=1"]) == 0
  assert not (data / "users.jsonl").exists()
  assert tfds_data.reader(data).info.splits["users"].num_examples == 6
  assert tfds.builder_from_directory(str(tfds_data.directory(data))).info.name == tfds_data.NAME
  assert main(["vocab", str(data), "--size", "300"]) == 0
  run, gin_dir = tmp_path / "run", REPO / "recalign" / "gin"
  argv = ["train", f"--gin_file={gin_dir / 'models' / 'tiny.gin'}",
          f"--gin_file={gin_dir / 'runs' / 'from_scratch.gin'}",
          f"--gin.DATA_DIRS=['{data}']", "--gin.MIXTURE_OR_TASK_NAME='tiny_ut'",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 16}", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=4",
          f"--gin.MODEL_DIR='{run}'", "--gin.registry.TaskConfig.num_candidates=3",
          "--gin.registry.TaskConfig.streamed=True", "--gin.CheckpointConfig.every=2"]
  code = "import sys; from recalign.cli import main; sys.exit(main(sys.argv[1:]))"
  r = subprocess.run([sys.executable, "-c", code, *argv], env=TRAIN_ENV, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert json.loads((run / "run.json").read_text())["task_config"]["streamed"] is True
  rt.unregister()
  assert main(["eval", "--checkpoint", str(run / "checkpoints" / "2"), "--task", "tiny_retrieval", "--split", "test",
               "--beam", "2", "--batch", "4"]) == 0
  metrics = json.loads((run / "eval" / "2" / "metrics_tiny_retrieval_test.json").read_text())
  assert metrics["examples"] == 6 and 0.0 <= metrics["ndcg@10"] <= 1.0
  assert registry._SOURCES["tiny"]["config"].streamed       # evaluated on the tasks it trained on
  rt.unregister()


@pytest.mark.slow   # ~1.5 min on the DirectRunner (2 cores); the synthetic and tiny sets above run in CI
def test_beam_folder_is_the_in_process_folder_on_shared_beauty(tmp_path):
  assert assert_same_folder(shared("amazon-beauty"), tmp_path).num_users == 22363


def test_beam_refuses_a_tfds_copy_that_lost_users(tmp_path, monkeypatch):
  """A pipeline whose written copy holds fewer users than it kept fails with an error that says so (an
  index error at 30M interactions once), instead of a folder with users missing."""
  import apache_beam as beam
  real = beam_prepare._prepare

  def lossy(parts, **settings):
    records, stats = real(parts, **settings)
    return records | "LoseUser0" >> beam.Filter(lambda r: r[0] != 0), stats

  monkeypatch.setattr(beam_prepare, "_prepare", lossy)
  with pytest.raises(DataError, match="kept 6 users but its TFDS copy holds 5 records"):
    beam_prepare.prepare_folder(write_tiny_tsv(tmp_path / "tiny"), tmp_path / "out", kcore=0)
  assert not (tmp_path / "out" / "manifest.json").exists()


def _summary(**changes) -> dict:
  """The ledger of a consistent run: 10 rows read, 1 duplicate dropped, 9 interactions of 3 users grouped, a
  k-core whose round 0 removes a user and round 1 (the check) nothing."""
  s = {"reports": [[0, {"handed_on": 6}], [100, {"handed_on": 4}]], "grouped": [3, 9], "duplicates": 1,
       "missing_count": 0, "kcored": [2, 7],
       "kcore_ledger": [[["batched", -1], [3, 9]], [["in", 0], [3, 9]], [["counted", 0], [0, 9]], [["out", 0], [2, 7]],
                        [["in", 1], [2, 7]], [["counted", 1], [0, 7]], [["out", 1], [2, 7]]]}
  return {**s, **changes}


def test_beam_ledger_finds_data_lost_between_stages():
  assert beam_prepare.ledger_errors(_summary()) == []
  assert beam_prepare.ledger_errors(_summary(kcore_ledger=[], kcored=[3, 9])) == []       # no k-core
  lost_group = beam_prepare.ledger_errors(_summary(grouped=[3, 8], kcore_ledger=[]))
  assert lost_group == ["the readers handed on 10 rows, the grouping by user received 9"]
  ledger = _summary()["kcore_ledger"]
  between = beam_prepare.ledger_errors(_summary(kcore_ledger=ledger[:4] + [[["in", 1], [1, 4]]] + ledger[5:]))
  assert between == ["k-core round 1 received (users, interactions) (1, 4), round 0 passed on (2, 7)",
                     "k-core round 1 counted 7 interactions of the 4 it received"]   # (its count saw them all)
  batched = beam_prepare.ledger_errors(_summary(kcore_ledger=[[["batched", -1], [2, 6]]] + ledger[1:]))
  assert batched == ["the k-core's batches hold (users, interactions) (2, 6), the grouping made (3, 9)",
                     "k-core round 0 received (users, interactions) (3, 9), its batches held (2, 6)"]
  miscounted = beam_prepare.ledger_errors(_summary(kcore_ledger=[[["counted", 0], [0, 8]]] + ledger[:2] + ledger[3:]))
  assert miscounted == ["k-core round 0 counted 8 interactions of the 9 it received"]
  assert beam_prepare.ledger_errors(_summary(kcored=[2, 6])) == [
      "the k-core's last round passed on (2, 7), its users hold (2, 6)"]
  # rounds that no batch reached (every user removed before them) have only their count's entry: no loss
  emptied = [[["batched", -1], [3, 9]], [["in", 0], [3, 9]], [["counted", 0], [0, 9]], [["out", 0], [0, 0]]] + [
      [["counted", r], [0, 0]] for r in (1, 2, 3)]
  assert beam_prepare.ledger_errors(_summary(kcore_ledger=emptied, kcored=[0, 0])) == []


def test_beam_pipeline_that_loses_data_between_stages_fails(tmp_path, monkeypatch):
  """Elements lost in the runner (what the DirectRunner's multi-process mode did at 30M interactions) are
  found by the ledger, instead of a smaller k-core. Two losses injected into one run: a grouped user that
  never arrives, and a k-core round's batch that the next round never receives (its ledger says it was
  passed on); the error names both."""
  chronological, kcore_round = beam_prepare._chronological, beam_prepare._kcore_round
  monkeypatch.setattr(beam_prepare, "_chronological", lambda u, timed: [] if u[0] == "u5" else chronological(u, timed))
  monkeypatch.setattr(beam_prepare, "KCORE_BATCH", 4)
  monkeypatch.setattr(beam_prepare, "_kcore_round", lambda batch, counts, k, r=0: [
      x for x in kcore_round(batch, counts, k, r) if r != 1 or isinstance(x, beam_prepare.beam.pvalue.TaggedOutput)
      or batch[0].sum() % 3])
  with pytest.raises(DataError, match=r"the readers handed on \d+ rows, the grouping by user received \d+; .*"
                     r"k-core round 2 received \(users, interactions\) \(\d+, \d+\), round 1 passed on .*"
                     "runner lost data between stages"):
    beam_prepare.prepare_folder(messy_tsv(tmp_path / "src"), tmp_path / "out", kcore=3, num_validation_users=10)
  assert not (tmp_path / "out" / "manifest.json").exists()
