import itertools
import json

import numpy as np
import pytest

from conftest import shared, write_tiny_tsv
from recalign import baselines as B
from recalign import cli
from recalign.baselines.sasrec import SASRecConfig, evaluate_sasrec, train_sasrec
from recalign.data import AMAZON, prepare, read_source
from recalign.data.ingest import Interaction, RawData
from recalign.data.report import IngestReport


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("base")
  return prepare(read_source(write_tiny_tsv(root / "src")), name="tiny", kcore=0), root


def test_popularity_ranks_unseen_items_by_training_counts(tiny):
  data, _ = tiny
  pop = data.train_popularity()
  targets, history = B.targets_and_history(data, "test", np.arange(data.num_users))
  ranked = B.top_k_excluding(np.broadcast_to(pop.astype(float), (data.num_users, data.num_items)), history, 3)
  for r in range(data.num_users):
    unseen = [i for i in range(data.num_items) if i not in set(history[r].tolist())]
    expected = sorted(unseen, key=lambda i: -pop[i])[:3]
    assert sorted(pop[ranked[r]].tolist(), reverse=True) == pop[expected].tolist()
    assert not set(ranked[r].tolist()) & set(history[r].tolist())
  full = B.top_k_excluding(np.broadcast_to(pop.astype(float), (data.num_users, data.num_items)), history, 10 - 6)
  assert full.shape == (6, 4)


def test_history_rating_auc_matches_pairwise(tiny):
  data, _ = tiny
  rate = np.array([np.mean(data.ratings[u][:-2] > 3) for u in range(data.num_users)])
  labels = np.array([data.ratings[u][-1] > 3 for u in range(data.num_users)])
  pos, neg = rate[labels], rate[~labels]
  pairwise = np.mean([(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)])
  assert B.history_rating(data, "test")["auc"] == pytest.approx(pairwise)


def test_sasrec_learns_a_deterministic_sequence_pattern():
  # Every user walks the catalogue in steps of +1: the next item is fully predictable.
  rng = np.random.default_rng(0)
  seqs = {}
  for u in range(300):
    start = int(rng.integers(0, 40))
    seqs[f"u{u}"] = [Interaction(f"i{(start + t) % 40:02d}", float(t), None) for t in range(9)]
  data = prepare(RawData(seqs, {}, AMAZON, "synthetic", [], IngestReport()), name="walk", kcore=0)
  model, params, log = train_sasrec(data, SASRecConfig(epochs=30, dropout=0.0, batch_size=64, eval_every=0),
                                    progress=False)
  assert log[-1]["loss"] < 0.5 * log[0]["loss"]
  m = evaluate_sasrec(model, params, data, "test", exclude_history=True)
  assert m["hr@5"] > 0.9, m        # random guessing over the 32 items outside the history: 5/32
  full = evaluate_sasrec(model, params, data, "test")   # the full catalogue protocol can only be harder
  assert full["hr@10"] > 0.9 and full["ndcg@10"] <= m["ndcg@10"] + 1e-9, (full, m)
  pop = B.popularity(data, "test")
  assert pop["hr@5"] < 0.5


@pytest.mark.parametrize("loss", ["ce", "sampled_ce"])
def test_sasrec_with_cross_entropy_learns_and_keeps_the_best_validation_epoch(loss):
  rng = np.random.default_rng(1)
  seqs = {}
  for u in range(300):
    start = int(rng.integers(0, 40))
    seqs[f"u{u}"] = [Interaction(f"i{(start + t) % 40:02d}", float(t), None) for t in range(9)]
  data = prepare(RawData(seqs, {}, AMAZON, "synthetic", [], IngestReport()), name="walk", kcore=0)
  cfg = SASRecConfig(epochs=12, dropout=0.1, batch_size=64, loss=loss, num_negatives=16, eval_every=2, patience=10)
  model, params, log = train_sasrec(data, cfg, progress=False)
  assert log[-1]["loss"] < 0.5 * log[0]["loss"]
  validated = [e["validation_ndcg@10"] for e in log if "validation_ndcg@10" in e]
  assert len(validated) == 6
  # The returned parameters are the best validation epoch's, not the last one's.
  assert evaluate_sasrec(model, params, data, "validation")["ndcg@10"] == pytest.approx(max(validated))
  assert evaluate_sasrec(model, params, data, "test")["hr@5"] > 0.9


def test_mean_and_spread_over_seeds_in_tables():
  rows = {"m": B.mean_std([{"hr@5": 0.5, "examples": 3}, {"hr@5": 0.7, "examples": 3}])}
  assert rows["m"]["hr@5"] == pytest.approx(0.6) and rows["m"]["hr@5_std"] == pytest.approx(0.1)
  assert B.format_table(rows).splitlines()[1].split() == ["m", "0.6000±0.1000"]


def test_format_table():
  assert B.format_table({}) == ""   # `recalign eval MODEL_DIR` again: nothing left to evaluate, no error
  t = B.format_table({"a": {"hr@5": 0.5, "ndcg@5": 0.25}, "bb": {"hr@5": 1.0}})
  assert t.splitlines()[1].split() == ["a", "0.5000", "0.2500"]
  assert t.splitlines()[2].split() == ["bb", "1.0000", "-"]


def test_short_demo_end_to_end_on_tiny_data_then_cli_eval(tmp_path, capsys):
  from recalign.demo import run_demo
  from recalign.experiments import RECIPES
  src = write_tiny_tsv(tmp_path / "src")
  out = tmp_path / "demo"
  res = run_demo(src, out, minutes=0.1, ml100k=None, size="tiny", sasrec_epochs=2, kcore=0, name="beauty")
  table = res["beauty_retrieval"]
  assert set(table) == {f"{m} / {s}" for m in ("recalign tiny bare", "popularity", "SASRec-BCE", "SASRec-CE")
                        for s in ("validation", "test")}
  assert all(0.0 <= v["ndcg@10"] <= v["hr@10"] <= 1.0 for v in table.values())
  saved = json.loads((out / "results.json").read_text())
  assert saved["size"] == "tiny" and saved["recipe_config"]["run_file"] == RECIPES["bare"].run_file
  assert saved["sasrec"]["CE"]["loss"] == "sampled_ce" and saved["sasrec"]["BCE"]["epochs"] <= 2
  assert set(saved["test_ndcg@10_ratio"]) == {"popularity", "SASRec-BCE", "SASRec-CE"}
  assert saved["total_minutes"] > 0
  assert (out / "beauty_bare.png").stat().st_size > 1000
  run = json.loads((out / "beauty_bare" / "run.json").read_text())
  assert run["task_config"]["prompt_words"] is False and run["task_feature_lengths"]["inputs"] == 96
  config = (out / "beauty_bare" / "config.gin").read_text()     # the recipe's gin, as `recalign train` takes it
  assert "MODEL_SIZE = 'tiny'" in config and "decay = 'rsqrt'" in config
  assert (out / "beauty_bare" / "best.json").exists()
  import recalign.tasks as rt   # the model wrote collaborative codes; predictions name the data set's IDs
  assert all(i.startswith("<a_") for i in rt.registry.task_info("beauty_retrieval").ids)
  best_step = json.loads((out / "beauty_bare" / "best.json").read_text())["step"]
  results = out / "beauty_bare" / "eval" / f"best_{best_step}"     # apart from the checkpoints
  line = json.loads((results / "predictions_beauty_retrieval_test.jsonl").read_text().splitlines()[0])
  # the other protocol's test files beside them, not over them
  assert json.loads((results / "metrics_beauty_retrieval_test_history_excluded.json").read_text())["protocol"] == (
      "history excluded") and json.loads((results / "metrics_beauty_retrieval_test.json").read_text())["protocol"] == (
      "full catalogue")
  assert set(saved["beauty_retrieval_test_history_excluded"]) == {"recalign tiny bare", "popularity",
                                                                    "SASRec-BCE", "SASRec-CE"}
  assert line["target"].startswith("I") and len(line["ranked"]) == 8
  # The same checkpoint through `recalign eval` (registers the data from run.json).
  assert cli.main(["eval", "--checkpoint", str(out / "beauty_bare" / "best"), "--task", "beauty_ut",
                   "--split", "test", "--beam", "4", "--batch", "4"]) == 0
  printed = capsys.readouterr().out
  assert "beauty_retrieval" in printed and "beauty_ranking" in printed and "score/hr@1" in printed
  assert (results / "metrics_beauty_ranking_test.json").exists()
  assert not list((out / "beauty_bare" / "best").glob("metrics_*"))
  evaluated = [json.loads(x) for x in (results.parent / "evaluated.jsonl").read_text().splitlines()]
  assert {(e["task"], e["split"], e["step"]) for e in evaluated} >= {
      ("beauty_retrieval", "test", best_step), ("beauty_ranking", "test", best_step)}


@pytest.mark.slow
def test_demo_on_shared_beauty_and_ml100k(tmp_path):
  from recalign.demo import run_demo
  res = run_demo(shared("amazon-beauty"), tmp_path / "demo", minutes=2, ml100k=shared("ml-100k"),
                 sasrec_epochs=5, max_test=500)
  assert res["beauty_retrieval"]["popularity / test"]["hr@10"] > 0.005
  assert 0.0 < res["ml100k_rating"]["History / test"]["auc"] < 1.0


def test_format_table_blocks_for_rows_with_many_metrics():
  row = {f"score/m{i}": i / 10 for i in range(6)} | {f"generated/m{i}": i / 10 for i in range(6)} | {"examples": 3}
  lines = B.format_table({"itdr": row}).splitlines()
  assert lines[0] == "itdr  (3 examples)"
  assert lines[1].split()[:4] == ["generated/m0", "0.0000", "generated/m1", "0.1000"]
  assert lines[2].split()[:2] == ["score/m0", "0.0000"]


def test_data_set_names_come_from_the_source_folder():
  """The demo and `recalign prepare` name a data set after its folder, whatever the category."""
  from recalign.data.prepare import name_from_path
  assert [name_from_path(p) for p in ("x/amazon-beauty", "Toys_and_Games", "../ml-100k", "Amazon_Sports")] == [
      "beauty", "toys_and_games", "ml_100k", "sports"]
