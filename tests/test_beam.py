"""prepare's Beam transforms (DirectRunner) give exactly the users `prepare.prepare` gives in one process."""

from __future__ import annotations

from pathlib import Path

import os

import numpy as np
import pytest

if not os.environ.get("CI"):   # CI installs the test extra, which holds the beam extra: there, missing is a failure
  pytest.importorskip("apache_beam", reason="the beam extra: pip install -e '.[beam]'")

from recalign.data import prepare, read_source  # noqa: E402
from recalign.data import beam_prepare  # noqa: E402
from conftest import shared, write_tiny_tsv  # noqa: E402


def messy_tsv(root: Path, users: int = 40, items: int = 45, seed: int = 0) -> Path:
  """Short random sequences (a k-core that needs several rounds), repeated user-item pairs, equal
  timestamps, ratings, a row without a timestamp and a malformed line (both counted skips)."""
  rng = np.random.default_rng(seed)
  lines = ["user_id\titem_id\ttimestamp\trating"]
  for u in range(users):
    for _ in range(int(rng.integers(2, 8))):
      lines.append(f"u{u}\ti{int(rng.integers(items))}\t{int(rng.integers(5))}\t{int(rng.integers(1, 6))}")
  lines.insert(7, "u3\ti1\t\t4")
  lines.insert(11, "broken line")
  root.mkdir(parents=True, exist_ok=True)
  (root / "interactions.tsv").write_text("\n".join(lines) + "\n")
  (root / "items.tsv").write_text("item_id\ttitle\n" + "".join(f"i{k}\tThing {k}\n" for k in range(items)))
  return root


def assert_same(src: Path, out: Path, **settings):
  data = prepare(read_source(src), name="x", **settings)
  records = beam_prepare.run_local(src / "interactions.tsv", out, **settings)
  assert [r["user"] for r in records] == list(range(data.num_users))
  val = set(data.validation_users.tolist())
  for u, r in enumerate(records):
    assert r["user_id"] == data.users[u]
    assert r["items"] == data.sequences[u].tolist()
    assert r["timestamps"] == (data.timestamps[u].tolist() if data.timestamps is not None else [])
    assert r["ratings"] == (data.ratings[u].tolist() if data.ratings is not None else [])
    assert r["validation"] == (u in val)
  return data


@pytest.mark.parametrize("kcore", [0, 3])
def test_beam_gives_the_in_process_users(tmp_path, kcore):
  data = assert_same(messy_tsv(tmp_path / "src"), tmp_path / "out", kcore=kcore, num_validation_users=10)
  report = data.manifest["report"]["skipped"]
  assert report["missing_timestamp"] == 1 and report["malformed_line"] == 1
  if kcore:
    assert report["users_removed_by_kcore"] > 0
  assert assert_same(write_tiny_tsv(tmp_path / "tiny"), tmp_path / "tiny_out", kcore=kcore).num_users == 6


def test_beam_writes_the_tfds_copy_the_in_process_path_writes(tmp_path):
  """One Beam pipeline from interactions.tsv to the TFDS copy: every record equals `tfds_data.write`'s after
  `prepare` (so streamed tasks read the same examples from either)."""
  import tensorflow_datasets as tfds
  from recalign.data import tfds_data
  src = messy_tsv(tmp_path / "src")
  tfds_data.save(prepare(read_source(src), name="x", kcore=3, num_validation_users=10), tmp_path / "mem")
  beam_prepare.write_tfds(src / "interactions.tsv", tmp_path / "beam", kcore=3, num_validation_users=10)
  read = lambda d: {int(r["user"]): r for r in tfds.builder_from_directory(   # noqa: E731
      str(tfds_data.directory(d))).as_dataset(split="users").as_numpy_iterator()}
  mem, beam = read(tmp_path / "mem"), read(tmp_path / "beam")
  assert sorted(mem) == sorted(beam) and len(mem) > 10
  for u in mem:
    for field in ("user_id", "items", "timestamps", "ratings", "attributes", "validation"):
      np.testing.assert_array_equal(mem[u][field], beam[u][field], err_msg=f"user {u} {field}")


def test_beam_kcore_that_has_not_converged_fails(tmp_path):
  src = messy_tsv(tmp_path / "src")
  with pytest.raises(Exception, match="raise kcore_rounds"):
    beam_prepare.run_local(src / "interactions.tsv", tmp_path / "out", kcore=3, kcore_rounds=1)


@pytest.mark.slow   # ~1 min on the DirectRunner (2 cores); the synthetic and tiny sets above run in CI
def test_beam_gives_the_in_process_users_on_shared_beauty(tmp_path):
  assert assert_same(shared("amazon-beauty"), tmp_path / "out").num_users == 22363
