"""The prepared data set's TFDS copy, and tasks that stream their examples from it (TaskConfig.streamed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import recalign.tasks as rt
from recalign.data import AMAZON, DataError, PreparedData, prepare, read_source, tfds_data
from recalign.data.ingest import Interaction, ItemMeta, RawData
from recalign.data.report import IngestReport
from recalign.data.vocab import train_vocabulary
from recalign.tasks import sources
from conftest import shared

LENGTHS = {"inputs": 256, "targets": 64}


def rated_dataset(root: Path, name: str, users: int = 40, items: int = 60, validation_users: int = 15) -> PreparedData:
  """Random sequences of 3..30 items with ratings and titles: windows, prefixes and long histories."""
  rng = np.random.default_rng(1)
  # Unix seconds with a fraction (Amazon 2023's are ms): float32 would round them (128 s apart near 1.4e9)
  seqs = {f"u{u:03d}": [Interaction(f"i{int(x):03d}", 1_388_534_401.25 + 3_599 * t, float(rng.integers(1, 6)))
                        for t, x in enumerate(rng.choice(items, rng.integers(3, 31), replace=False))]
          for u in range(users)}
  meta = {f"i{k:03d}": ItemMeta(title=f"Thing {k}") for k in range(items)}
  attrs = {u: {"age": str(20 + k % 30)} for k, u in enumerate(seqs)}
  data = prepare(RawData(seqs, meta, AMAZON, "synthetic", [], IngestReport(), has_ratings=True, user_attributes=attrs),
                 name=name, kcore=0, num_validation_users=min(validation_users, users))
  tfds_data.save(data, root / name)
  train_vocabulary(data, root / name / "vocab", vocab_size=200)
  return data


def test_tfds_copy_holds_every_user_as_prepared(tmp_path):
  data = rated_dataset(tmp_path, "rated")
  builder = tfds_data.reader(tmp_path / "rated")
  assert str(builder.info.version) == tfds_data.VERSION
  assert tfds_data.manifest(builder) == json.loads((tmp_path / "rated" / "manifest.json").read_text())
  rows = {int(r["user"]): r for r in builder.as_dataset(split="users").as_numpy_iterator()}
  assert sorted(rows) == list(range(data.num_users))
  val = set(data.validation_users.tolist())
  for u, r in rows.items():
    assert r["user_id"].decode() == data.users[u]
    np.testing.assert_array_equal(r["items"], data.sequences[u])
    np.testing.assert_array_equal(r["ratings"], data.ratings[u])
    np.testing.assert_array_equal(r["timestamps"], data.timestamps[u])
    assert bool(r["validation"]) == (u in val)
    assert json.loads(r["attributes"]) == data.user_attributes[u]
  lengths, flags = tfds_data.index(builder)
  np.testing.assert_array_equal(lengths, [len(s) for s in data.sequences])
  assert flags.sum() == 15 and set(np.flatnonzero(flags)) == val
  *same, pop = tfds_data.index(builder, batch=7, num_items=data.num_items)   # rows split across batches
  np.testing.assert_array_equal(same[0], lengths)
  np.testing.assert_array_equal(pop, data.train_popularity())
  assert pop.sum() == sum(len(s) - 2 for s in data.sequences)
  keep = np.maximum(lengths - 2 - np.arange(len(lengths)) % 4, 0)  # ITDR's held-out users keep fewer items for training
  np.testing.assert_array_equal(tfds_data.popularity(builder, data.num_items, keep, batch=7), np.bincount(
      np.concatenate([s[:k] for s, k in zip(data.sequences, keep)]), minlength=data.num_items))


def test_user_records_are_tfds_decoding_in_file_order_for_every_host_slice(tmp_path):
  import tensorflow_datasets as tfds
  data = rated_dataset(tmp_path, "rated")
  builder = tfds_data.reader(tmp_path / "rated")
  seen, whole = [], None
  for part in ["users", *tfds.even_splits("users", 3)]:
    fast = list(tfds_data.user_records(builder, part).as_numpy_iterator())
    slow = list(builder.as_dataset(split=part, shuffle_files=False).as_numpy_iterator())
    assert [int(r["user"]) for r in fast] == [int(r["user"]) for r in slow]
    for a, b in zip(fast, slow):
      for k in ("items", "ratings", "validation"):
        np.testing.assert_array_equal(a[k], b[k])
        assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype
    if part == "users":
      whole = [int(r["user"]) for r in fast]
    else:
      seen += [int(r["user"]) for r in fast]
  # the hosts' slices: every user once, in the files' order (TFDS wrote them in its own shuffled order)
  assert seen == whole and sorted(seen) == list(range(data.num_users))


def test_load_from_the_tfds_copy_is_the_prepared_data_set(tmp_path):
  """Without users.jsonl, `PreparedData.load` reads the users from the TFDS copy: the same, field by field."""
  rated_dataset(tmp_path, "rated")
  want = PreparedData.load(tmp_path / "rated")
  (tmp_path / "rated" / "users.jsonl").unlink()
  got = PreparedData.load(tmp_path / "rated")
  assert (got.name, got.domain, got.items, got.source_item_ids, got.users, got.manifest, got.user_attributes) == (
      want.name, want.domain, want.items, want.source_item_ids, want.users, want.manifest, want.user_attributes)
  np.testing.assert_array_equal(got.validation_users, want.validation_users)
  for u in range(want.num_users):
    for field in ("sequences", "timestamps", "ratings"):
      np.testing.assert_array_equal(getattr(got, field)[u], getattr(want, field)[u], err_msg=f"{field} {u}")
      assert getattr(got, field)[u].dtype == getattr(want, field)[u].dtype
  # without timestamps (what training and evaluation load): the rest the same; never written back
  lean = PreparedData.load(tmp_path / "rated", timestamps=False)
  assert lean is not got and lean.timestamps is None and lean.omitted == ("timestamps",)
  assert lean.users == want.users and all(np.array_equal(lean.sequences[u], want.sequences[u])
                                          and np.array_equal(lean.ratings[u], want.ratings[u])
                                          for u in range(want.num_users))
  with pytest.raises(ValueError, match="loaded without its timestamps"):
    tfds_data.save(lean, tmp_path / "copy")


def test_reader_says_when_the_copy_is_missing_or_of_another_preparation(tmp_path):
  data = rated_dataset(tmp_path, "rated")
  data.save(tmp_path / "json_only")      # an older recalign's folder: no TFDS copy
  with pytest.raises(DataError, match="no TFDS copy"):
    tfds_data.reader(tmp_path / "json_only")
  manifest = json.loads((tmp_path / "rated" / "manifest.json").read_text())
  manifest["created"] = "2030-01-01T00:00:00+00:00"   # users.jsonl rewritten by another `prepare`
  (tmp_path / "rated" / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(DataError, match="another preparation"):
    tfds_data.reader(tmp_path / "rated")


def _by_id(ds, n=None) -> dict:
  it = ds.as_numpy_iterator() if n is None else ds.take(n).as_numpy_iterator()
  out = {}
  for e in it:
    key = (int(e["example_id"]), int(e.get("epoch", 0)))
    assert key not in out
    out[key] = e
  return out


def _same(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].keys() == b[k].keys(), k
    for f in a[k]:
      np.testing.assert_array_equal(a[k][f], b[k][f], err_msg=f"{k} {f}")


@pytest.mark.parametrize("train_examples", ["windows", "prefixes", "continuations"])
def test_streamed_examples_are_the_in_memory_ones(tmp_path, train_examples):
  data = rated_dataset(tmp_path, "rated")
  users = tfds_data.reader(tmp_path / "rated")
  lengths, flags = tfds_data.index(users)
  held = np.array([max(1, len(s) - 2 - (u % 3)) for u, s in enumerate(data.sequences)])  # as ITDR holds out
  next_items = 3 if train_examples == "continuations" else 1
  for split in sources.SPLITS:
    for limit in (None, held):
      mem = sources.build_examples(data, split, 6, train_examples, limit, next_items=next_items)
      st = sources.streamed_examples(lengths, flags, split, 6, train_examples, limit, next_items, with_ratings=True)
      assert len(st) == len(mem)
      # (shuffled: both orders differ, the examples keyed by id must not)
      _same(_by_id(sources.to_dataset(mem, split="test", shuffle=True, seed=3)),
            _by_id(sources.stream_to_dataset(users.as_dataset(split="users"), st.make, split="test", shuffle=True,
                                             seed=3)))


def test_streamed_beauty_examples_are_the_in_memory_ones(tmp_path):
  """The shared Beauty data, prepared as `recalign prepare` does: the same examples (a slice of the users
  streamed: their examples, ids included, are those the in-memory path makes of them)."""
  data = prepare(read_source(shared("amazon-beauty")), name="beauty")
  tfds_data.save(data, tmp_path / "beauty")
  users = tfds_data.reader(tmp_path / "beauty")
  assert users.info.splits["users"].num_examples == data.num_users == 22363
  lengths, flags = tfds_data.index(users)
  part = users.as_dataset(split="users[:1500]")
  mine = {int(r["user"]) for r in part.as_numpy_iterator()}
  for split in sources.SPLITS:
    mem = sources.build_examples(data, split, 20, "prefixes")
    st = sources.streamed_examples(lengths, flags, split, 20, "prefixes")
    assert len(st) == len(mem)
    got = _by_id(sources.stream_to_dataset(part, st.make, split="test", shuffle=False, seed=0))
    assert sorted(i for i, _ in got) == np.flatnonzero(np.isin(mem.user, list(mine))).tolist()
    for (i, _), e in got.items():
      assert e["user"] == mem.user[i] and e["target"] == mem.target[i]
      np.testing.assert_array_equal(e["history"], mem.history[mem.history_splits[i]:mem.history_splits[i + 1]])


def test_streamed_tasks_render_the_same_examples_every_epoch(tmp_path, monkeypatch):
  """Every task of a data set registered in memory, then streamed (the same name: task names salt the
  draws): the same rendered tokens for each (example, epoch) -- masks, negatives and spans drawn from the
  same keys -- in two training epochs and the evaluation splits; streamed training visits them shuffled."""
  rated_dataset(tmp_path, "rated", users=20)
  kinds = ["retrieval", "ranking", "rating", "mim", "mlm", "bpr"]
  rendered = []
  loads = []   # streamed registration holds nothing per user: no users loaded (popularity and exclusions streamed)
  real = PreparedData._load.__func__
  monkeypatch.setattr(PreparedData, "_load", classmethod(lambda cls, *a: loads.append(a[2:]) or real(cls, *a)))
  for streamed in (False, True):
    loads.clear()
    rt.register_dataset(tmp_path / "rated", config=rt.TaskConfig(window=8, streamed=streamed), replace=True)
    assert loads == [(False, not streamed)], loads   # (timestamps, users)
    out = {}
    for kind in kinds:
      task = rt.get(f"rated_{kind}")
      for split in task.splits:
        n = task.num_input_examples(split)
        epochs = 2 if split == "train" else 1
        ds = task.get_dataset(LENGTHS, split=split, shuffle=False, seed=5, num_epochs=None if epochs > 1 else 1)
        out[kind, split] = (n, _by_id(ds, n * epochs))
    rendered.append(out)
  memory, streamed = rendered
  assert memory.keys() == streamed.keys() and len(memory) == 15    # mim, mlm, bpr: no test split
  for k in memory:
    assert memory[k][0] == streamed[k][0], k
    _same(memory[k][1], streamed[k][1])
  n, mim = memory["mim", "train"]
  assert sum(not np.array_equal(mim[i, 0]["inputs"], mim[i, 1]["inputs"]) for i in range(n)) > n // 2
  for kind in kinds:
    task = rt.get(f"rated_{kind}")
    n = task.num_input_examples("train")
    order = [int(e["example_id"]) for e in task.source.get_dataset("train", shuffle=True, seed=5).take(2 * n)
             .as_numpy_iterator()]
    assert sorted(order[:n]) == sorted(order[n:]) == list(range(n))
    assert order[:n] != sorted(order[:n]) and order[:n] != order[n:], f"{kind}: not shuffled, or not afresh"
  rt.unregister("rated")


def test_streamed_itdr_tasks_render_the_in_memory_examples(tmp_path, monkeypatch):
  """ITDR's TKR, NIR and RP streamed (no user loaded: each row carries its user's items for the negatives,
  the held-out users' items leave the training popularity in a pass of its own): the same rendered
  examples -- candidates and negatives drawn from the same keys -- for every (example, epoch) as in memory."""
  rated_dataset(tmp_path, "rated", users=30)
  loads = []
  real = PreparedData._load.__func__
  monkeypatch.setattr(PreparedData, "_load", classmethod(lambda cls, *a: loads.append(a[2:]) or real(cls, *a)))
  rendered = []
  for streamed in (False, True):
    loads.clear()
    names = rt.register_dataset(tmp_path / "rated", replace=True,
                                config=rt.TaskConfig(itdr=True, itdr_eval_users=3, streamed=streamed))
    assert loads == [(False, not streamed)], loads   # (timestamps, users)
    assert "rated_itdr_uap" not in names             # (its users have an age only)
    out = {}
    for kind in ("tkr", "nir", "rp"):
      task = rt.get(f"rated_itdr_{kind}")
      for split in task.splits:
        n, epochs = task.num_input_examples(split), 2 if split == "train" else 1
        ds = task.get_dataset({"inputs": 4096, "targets": 1024}, split=split, shuffle=False, seed=5,
                              num_epochs=None if epochs > 1 else 1)
        out[kind, split] = (n, _by_id(ds, n * epochs))
    rendered.append(out)
  memory, streamed = rendered
  assert memory.keys() == streamed.keys() and len(memory) == 9
  for k in memory:
    assert memory[k][0] == streamed[k][0] > 0 and len(memory[k][1]) == memory[k][0] * (2 if k[1] == "train" else 1), k
    _same(memory[k][1], streamed[k][1])
  n, tkr = memory["tkr", "train"]   # the candidates are drawn afresh every epoch
  assert sum(not np.array_equal(tkr[i, 0]["candidates"], tkr[i, 1]["candidates"]) for i in range(n)) > n // 2
  rt.unregister("rated")


def test_streamed_hosts_read_disjoint_users_that_cover_every_example(tmp_path):
  import seqio
  rated_dataset(tmp_path, "rated")
  rt.register_dataset(tmp_path / "rated", name="rated_h", config=rt.TaskConfig(window=8, streamed=True))
  task = rt.get("rated_h_retrieval")
  n = task.num_input_examples("test")
  parts = [_by_id(task.source.get_dataset("test", shuffle=False, shard_info=seqio.ShardInfo(i, 3)))
           for i in range(3)]
  users = [{int(e["user"]) for e in p.values()} for p in parts]
  assert all(users) and not (users[0] & users[1] or users[0] & users[2] or users[1] & users[2])
  assert sorted(k for p in parts for k in p) == [(i, 0) for i in range(n)]
  rt.unregister("rated_h")
