"""The study script's table: the numbers the ablation's reading is written from."""

import importlib.util
import itertools
import os

import pytest

from conftest import REPO


def load_study():
  spec = importlib.util.spec_from_file_location("study", REPO / "tools" / "study.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run(row, seed, ndcg=None, auc=None):
  r = {"row": row, "seed": seed, "mixture": f"ml100k_{row}"}
  if ndcg is not None:
    r.update({f"test/{k}": ndcg for k in ("hr@5", "ndcg@5", "hr@10", "ndcg@10")}, **{"validation/ndcg@10": ndcg})
  if auc is not None:
    r["test/auc"] = auc
  return r


def study_table(stdout: str) -> list[str]:
  """The study's table: the first block of Markdown rows it prints (the equal-supervision table may follow)."""
  lines = stdout.splitlines()
  start = next(i for i, x in enumerate(lines) if x.startswith("| "))
  return [x for x in itertools.takewhile(lambda x: x.startswith("|"), lines[start:]) if x.startswith("| ")]


def test_study_table_means_spreads_and_rating_auc():
  study = load_study()
  results = {f"{r['row']}/seed{r['seed']}": r for r in [
      run("retrieval", 0, 0.010), run("retrieval", 1, 0.020),        # 0.0150 ± 0.0071 (0.01 / sqrt 2: ddof=1)
      run("ut", 0, 0.030, 0.6), run("ut", 1, 0.030, 0.7),            # +0.0150 > spread 0.0071 + 0
      run("ut_at", 0, 0.012, 0.5), run("ut_at", 1, 0.016, 0.5),      # vs UT: -0.0160 > spread 0 + 0.0028
      run("rating", 0, auc=0.55), run("rating", 1, auc=0.65),         # no retrieval metrics
      run("rpat", 0, auc=0.62), run("rpat", 1, auc=0.64)]}            # +0.03 AUC < spread 0.0707 + 0.0141
  lines = study.table(results).splitlines()
  assert lines[0].endswith("| val NDCG@10 | vs its base row (test) | test rating AUC | training (mean) |")
  assert lines[2] == ("| retrieval only (`ml100k_retrieval`) | 2 | " + "0.0150 ± 0.0071 | " * 5 + "— | — | — |")
  # each row against the row it adds to: UT and retrieval, UT + AT and UT (not retrieval), RpAT and rating by AUC
  assert lines[3] == ("| UT (retrieval + ranking [+ rating]) (`ml100k_ut`) | 2 | " + "0.0300 ± 0.0000 | " * 5
                      + "+0.0150 NDCG@10 vs retrieval only (exceeds spread 0.0071) | 0.6500 ± 0.0707 | — |")
  assert lines[4] == ("| UT + AT (+ MLM + MIM) (`ml100k_ut_at`) | 2 | " + "0.0140 ± 0.0028 | " * 5
                      + "-0.0160 NDCG@10 vs UT (retrieval + ranking [+ rating]) (exceeds spread 0.0028) | "
                      + "0.5000 ± 0.0000 | — |")
  assert lines[5] == "| rating only (`ml100k_rating`) | 2 | " + "— | " * 6 + "0.6000 ± 0.0707 | — |"
  assert lines[6] == ("| rating + MLM + MIM (RpAT) (`ml100k_rpat`) | 2 | " + "— | " * 5
                      + "+0.0300 AUC vs rating only (within spread 0.0849) | 0.6300 ± 0.0141 | — |")
  # a row whose base row is not in the study has no difference
  alone = study.table({k: v for k, v in results.items() if v["row"] == "ut_at"}).splitlines()
  assert alone[2].split(" | ")[7] == "—"
  # one seed of each row: a difference, but no spread to read it against (not "exceeds spread 0.0000")
  first = study.table({k: v for k, v in results.items() if k in ("ut/seed0", "ut_at/seed0")}).splitlines()
  assert first[3].split(" | ")[7] == ("-0.0180 NDCG@10 vs UT (retrieval + ranking [+ rating]) "
                                     "(one seed each: no spread yet)")
  assert len(lines) == 7
  # the baselines on the same users: rows of the same table, mean ± std over their runs
  base = study.baseline_runs(
      {"popularity / validation": {k: 0.005 for k in ("hr@5", "ndcg@5", "hr@10", "ndcg@10")},
       "popularity / test": {k: 0.004 for k in ("hr@5", "ndcg@5", "hr@10", "ndcg@10")},
       "History / test": {"auc": 0.58}},
      {f"CE/seed{s}": {"validation": {"ndcg@10": v}, "test": {k: v for k in ("hr@5", "ndcg@5", "hr@10", "ndcg@10")},
                       "epochs": 9 + s, "best_epoch": 5, "minutes": 1.0} for s, v in ((0, 0.03), (1, 0.05))})
  assert list(base) == ["popularity", "History (training like-rate)", "SASRec-CE (sampled softmax)"]   # no BCE run
  lines = study.table(results, base).splitlines()
  assert lines[7] == "| popularity | 1 | " + "0.0040 | " * 4 + "0.0050 | — | — | — |"   # one run: no spread
  assert lines[8] == "| History (training like-rate) | 1 | " + "— | " * 6 + "0.5800 | — |"
  assert lines[9] == ("| SASRec-CE (sampled softmax) | 2 | " + "0.0400 ± 0.0141 | " * 5
                      + "— | — | 10 epochs (best 5), 1.0 min |")
  # how long recalign's rows trained: steps, best step, minutes, how many stopped early (the rest hit the cap)
  trained = [{**run("retrieval", s, 0.01), "steps": n, "best_step": b, "training_minutes": m, "early_stopped": e}
             for s, (n, b, m, e) in enumerate([(3000, 1500, 40.0, True), (4500, None, 61.0, False)])]
  assert study._training(trained) == "3750 steps (best 3000), 50 min, 1/2 stopped early"
  sasrec = {"BCE/seed0": {"minutes": 6.0}, "CE/seed0": {"minutes": 12.0}}
  assert study.compute_used(dict(enumerate(trained)), sasrec) == (
      "training time in the record: 2 runs 1.7 h + 2 SASRec runs 0.3 h = 2.0 h (validation and scoring not counted)")
  trained = [{**r, "epochs": e} for r, e in zip(trained, (4.0, 5.0))]
  assert study._training(trained) == "3750 steps (best 3000), 4.5 epochs, 50 min, 1/2 stopped early"
  # where the capped runs were heading: their validation curve's slope at the end (the early-stopped one's ignored)
  trained = [{**r, "trend": t} for r, t in zip(trained, (-0.002, 0.0012))]
  assert study._training(trained) == ("3750 steps (best 3000), 4.5 epochs, 50 min, 1/2 stopped early; "
                                      "capped runs' validation +0.0012 per 1k steps at the end")
  assert len(lines) == 10
  # without any AUC, no AUC column
  plain = study.table({k: v for k, v in results.items() if k.startswith("retrieval")}).splitlines()
  assert not plain[0].endswith("AUC | training (mean) |") and plain[1].count("---") == 9


def test_study_trend_is_the_slope_of_the_last_validations(tmp_path):
  import json
  study = load_study()
  log = tmp_path / "retrieval" / "seed0" / "validation_log.jsonl"
  log.parent.mkdir(parents=True)
  # 0.010 then +0.001 every 500 steps over the last four: +0.002 per 1,000 steps (the first point is left out)
  log.write_text("\n".join(json.dumps({"step": s, "ndcg@10": v}) for s, v in
                           [(500, 0.030), (1000, 0.010), (1500, 0.011), (2000, 0.012), (2500, 0.013)]))
  runs = {"retrieval/seed0": run("retrieval", 0, 0.01), "retrieval/seed1": run("retrieval", 1, 0.01)}
  trend = {k: r["trend"] for k, r in study.with_trend(tmp_path, runs).items()}
  assert trend["retrieval/seed0"] == pytest.approx(0.002) and trend["retrieval/seed1"] is None   # (no log)


def test_study_compares_auxiliary_rows_at_equal_main_task_examples(tmp_path):
  """Each auxiliary row's last validation against its base row's curve interpolated at as many main-task
  examples (examples seen x the mixture's main share), over the base seeds whose curve spans that point."""
  import json
  study = load_study()
  logs = {  # run: (main share, [(examples seen in thousands, metric)])
      "retrieval/seed0": (1.0, [(100, 0.01), (200, 0.02), (300, 0.03)]),
      "retrieval/seed1": (1.0, [(100, 0.02), (200, 0.04)]),
      "re_mlm/seed0": (0.5, [(200, 0.015), (400, 0.025)]),   # at 200k main: base 0.02 and 0.04 -> -0.005
      "re_mlm/seed1": (0.5, [(300, 0.02), (500, 0.035)]),    # at 250k: only seed 0's curve gets there, 0.025
      "reat/seed0": (1 / 3, [(3000, 0.05)]),                  # 1,000k: beyond every base curve -> no line
      "ut/seed0": (1.0, [(100, 0.05)]),                        # adds main tasks, no auxiliary one -> no line
      "rating/seed0": (1.0, [(1000, 0.60), (2000, 0.70)]),
      "rpat/seed0": (1 / 3, [(3000, 0.66)]),                   # 1,000k, the base's first point: 0.60
  }
  results = {}
  for key, (share, points) in logs.items():
    row, seed = key.split("/seed")
    metric = "auc" if "rating" in row or row == "rpat" else "ndcg@10"
    log = tmp_path / row / f"seed{seed}" / "validation_log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text("\n".join(json.dumps({"step": i, "examples_seen": x * 1000, metric: v})
                             for i, (x, v) in enumerate(points)))
    results[key] = run(row, int(seed))
  shares = {f"ml100k_{k.split('/')[0]}": share for k, (share, _) in logs.items()}
  lines = study.at_equal_supervision(tmp_path, results, shares.get).splitlines()
  assert lines[2] == "| retrieval + MLM | 2 | NDCG@10 | 225k | 0.0300 | 0.0275 | +0.0025 ± 0.0106 |"
  assert lines[3] == "| rating + MLM + MIM (RpAT) | 1 | AUC | 1000k | 0.6600 | 0.6000 | +0.0600 |"
  assert len(lines) == 4
  assert study.at_equal_supervision(tmp_path, {k: results[k] for k in ("retrieval/seed0", "ut/seed0")},
                                    shares.get) == ""


def test_study_record_refuses_a_command_with_other_settings(tmp_path):
  """A record's runs and a command (a resume, or --report) with another recipe, gin binding, ID scheme or
  users fraction: stopped, naming the record, the run and the setting; settings an older record lacks pass."""
  study = load_study()
  same = {"recipe": "bare", "gin": [], "id_scheme": "hybrid", "users_fraction": 0.25}
  results = {"ut/seed0": {"row": "ut", **same}, "rating/seed0": {"row": "rating", "recipe": "bare"}}
  study.check_record(tmp_path / "study.json", results, same)   # (rating/seed0: an older run, recipe only)
  for field, other in [("recipe", "compact"), ("gin", ["X = 1"]), ("id_scheme", "collaborative"),
                       ("users_fraction", 1.0)]:
    with pytest.raises(SystemExit, match=rf"study.json: ut/seed0 was trained with {field} .*, this command has "):
      study.check_record(tmp_path / "study.json", results, {**same, field: other})


def test_study_sasrecs_train_once_per_seed_on_the_studys_users(tiny_root, monkeypatch):
  """study.py's SASRec rows: per seed, both losses, scored on the study's users; kept in sasrec.json, so a
  resumed study does not train them again -- unless it is scored on other users."""
  import json
  import numpy as np
  from recalign import experiments as E
  from recalign.baselines.sasrec import evaluate_sasrec
  from recalign.data import PreparedData
  study = load_study()
  data = PreparedData.load(tiny_root / "tiny")
  path = tiny_root / "sasrec_study.json"
  ids = {"validation": np.array([0, 1]), "test": np.array([1, 2, 3])}
  trained = []
  real = E.train_sasrecs

  def counting(data, seed, epochs, exclude_history):
    trained.append(seed)
    out = real(data, seed, epochs, exclude_history)
    kept[seed] = out[0]
    return out

  kept: dict = {}
  monkeypatch.setattr(E, "train_sasrecs", counting)
  done = study.sasrec_baselines(path, data, [0, 1], ids, epochs=2)
  assert trained == [0, 1] and sorted(done) == ["BCE/seed0", "BCE/seed1", "CE/seed0", "CE/seed1"]
  assert json.loads(path.read_text()) == done
  model, params, _ = kept[1]["CE"]
  assert done["CE/seed1"]["test"] == evaluate_sasrec(model, params, data, "test", example_ids=ids["test"])
  assert done["BCE/seed0"]["loss"] == "bce" and done["CE/seed0"]["loss"] == "sampled_ce"
  assert study.sasrec_baselines(path, data, [0, 1], ids, epochs=2) == done and trained == [0, 1]   # kept
  other = {**ids, "test": np.array([0, 2])}
  again = study.sasrec_baselines(path, data, [0], other, epochs=2)   # other users: seed 0 trained and scored again
  model, params, _ = kept[0]["CE"]
  assert trained == [0, 1, 0] and again["CE/seed0"]["test"] == evaluate_sasrec(model, params, data, "test",
                                                                               example_ids=other["test"])
  assert again["CE/seed0"]["users"] != done["CE/seed0"]["users"] and again["CE/seed1"] == done["CE/seed1"]
  study.sasrec_baselines(path, data, [1], ids, epochs=1)   # another epoch budget: trained again
  assert trained == [0, 1, 0, 1]


def test_every_curves_recipe_is_the_gin_run_it_trains():
  """tools/curves.py's recipes (and their @k=v variants) train through gin (`gin_recipe`: from_scratch.gin +
  bindings, written to MODEL_DIR/config.gin): what gin builds is exactly what the recipe says -- data, lengths,
  batch, network, loss, optimiser and the learning rate at every phase of its schedule."""
  import sys
  import gin
  import recalign.tasks as rt
  from recalign import experiments as E
  from recalign import trainer
  sys.path.insert(0, str(REPO / "tools"))
  import curves
  names = [*curves.RECIPES, "bare_prefixes@dropout=0.1", "prefixes_semantic@lr=1e-3,batch=128,decay=linear",
           "bare_prefixes_hybrid_item@ema=0.995,raw=1",
           'compact_random@size={"num_encoder_layers":2}']   # (one key: variants split at commas; last: checked below)
  for name in names:
    r = curves.recipe(name)
    with E.recipe_config(curves.gin_recipe(r), ["DATA_DIRS = ['/d']", "MIXTURE_OR_TASK_NAME = 'm'"]):
      ds, mc = trainer.DatasetConfig(), trainer.ModelConfig()
      schedule, optimizer = trainer.learning_rate_schedule(total_steps=200), gin.query_parameter("make_optimizer.name")
      averaged = (gin.query_parameter("%EMA_DECAY"), trainer.ValidationConfig().raw_too)
    assert averaged == (r["ema"], bool(r["raw"])), name
    want = trainer.learning_rate_schedule(base=r["lr"], warmup_steps=r["warmup"], decay=r["decay"], total_steps=200)
    assert ds.task_config == rt.TaskConfig(**r["data"]), name
    assert (dict(ds.task_feature_lengths), ds.batch_size, mc.loss_normalizing_factor, optimizer) == (
        r["lengths"], r["batch"], r["loss"], r["optimizer"]), name
    assert mc.network == curves.network_config(r["size"]).replace(dropout_rate=r["dropout"], dtype=r["dtype"]), name
    steps = (0, 25, 49, 50, 120, 199)
    assert [float(schedule(s)) for s in steps] == [float(want(s)) for s in steps]
  assert mc.network.num_encoder_layers == 2     # the size dict reached the network


def test_the_demo_recipes_are_the_shipped_run_files():
  """`recalign demo --recipe bare` trains gin/runs/cpu_bare.gin, the file the README gives `recalign train`."""
  from recalign import experiments as E
  bare = E.dataset_config(E.RECIPES["bare"])
  assert E.RECIPES["bare"].run_file == "recalign/gin/runs/cpu_bare.gin"
  assert (dict(bare.task_feature_lengths), bare.batch_size, bare.task_config.id_scheme,
          bare.task_config.prompt_words) == ({"inputs": 96, "targets": 16}, 64, "collaborative", False)
  paper = E.dataset_config(E.RECIPES["paper"])
  assert (paper.task_config.id_scheme, paper.task_config.with_titles, E.RECIPES["paper"].mixture) == (
      "random", None, "reat")


def test_aux_share_mixture_gives_the_auxiliary_tasks_their_share(tiny_root):
  """--aux-share 0.3: MIM + MLM take 30% of ReAT's rate together (split by their example counts), retrieval 70%."""
  import seqio
  import recalign.tasks as rt
  rt.register_dataset(tiny_root / "tiny", config=rt.TaskConfig(num_candidates=3), replace=True)
  study = load_study()
  assert study.aux_mixture("tiny", "retrieval", 0.3) == "tiny_retrieval"      # nothing auxiliary to share
  assert study.aux_mixture("tiny", "reat", None) == "tiny_reat"               # the paper's: by example counts
  mix = seqio.get_mixture_or_task(study.aux_mixture("tiny", "reat", 0.3))
  rates = {t.name: mix.get_rate(t) for t in mix.tasks}
  assert sorted(rates) == ["tiny_mim", "tiny_mlm", "tiny_retrieval"]
  assert abs(rates["tiny_retrieval"] - 0.7) < 1e-9 and abs(rates["tiny_mim"] + rates["tiny_mlm"] - 0.3) < 1e-9
  n = {t: rt.get(t).num_input_examples("train") for t in ("tiny_mim", "tiny_mlm")}
  assert abs(rates["tiny_mim"] / rates["tiny_mlm"] - n["tiny_mim"] / n["tiny_mlm"]) < 1e-9
  # a run's epochs: passes over its mixture's training examples, every member counted, whatever the rates
  total = sum(rt.get(f"tiny_{t}").num_input_examples("train") for t in ("retrieval", "mim", "mlm"))
  runs = {"a": {"mixture": "tiny_reat", "examples_seen": 3 * total},
          "b": {"mixture": mix.name, "examples_seen": total // 2},
          "c": {"mixture": "tiny_retrieval", "examples_seen": 9}}
  epochs = {k: r["epochs"] for k, r in study.with_epochs(runs).items()}
  assert epochs["a"] == 3.0 and epochs["b"] == round(total // 2 / total, 2)
  assert epochs["c"] == round(9 / rt.get("tiny_retrieval").num_input_examples("train"), 2)
  # the share of the main tasks' examples (the curves' second axis): 70% at --aux-share 0.3, by counts otherwise
  assert study.main_share(mix.name) == pytest.approx(0.7) and study.main_share("tiny_retrieval") == 1.0
  n = {t: rt.get(f"tiny_{t}").num_input_examples("train") for t in ("retrieval", "mim", "mlm")}
  assert study.main_share("tiny_reat") == pytest.approx(n["retrieval"] / sum(n.values()))


def test_users_subset_is_seeded_whole_and_keeps_the_catalogue(tiny_root):
  import numpy as np
  from recalign.data import PreparedData
  from recalign.data.prepare import subset_users
  full = PreparedData.load(tiny_root / "tiny")
  half, again, other = (subset_users(full, 0.5, s, num_validation_users=2) for s in (0, 0, 1))
  assert half.num_users == 3 and half.num_items == full.num_items and half.items == full.items
  assert half.users == again.users and half.users != other.users
  for u, name in enumerate(half.users):                     # whole sequences, ratings with them
    k = full.users.index(name)
    np.testing.assert_array_equal(half.sequences[u], full.sequences[k])
    np.testing.assert_array_equal(half.ratings[u], full.ratings[k])
  assert len(half.validation_users) == 2 and half.validation_users.max() < 3
  assert half.manifest["subset"] == {"of": "tiny", "fraction": 0.5, "seed": 0, "users": 3}
  assert half.manifest["counts"]["interactions"] == sum(len(s) for s in half.sequences)


def test_study_recipes_and_a_subsets_own_item_ids(tmp_path):
  """study.py runs the curves recipes (the recipe issue's best, with its IDs' build settings), and a users subset
  gets IDs built from its own training sequences (the full set's come from users it does not have)."""
  import json
  from conftest import synthetic_dataset
  from recalign import experiments as E
  from recalign.data import PreparedData
  from recalign.data.ids import build_ids
  study = load_study()
  recipe, ids = study.named_recipe("bare_prefixes_hybrid_item@dropout=0.1,decay=linear")
  cfg = E.dataset_config(recipe)
  assert ids == {"leaf": "item"} and cfg.task_config.id_scheme == "hybrid"
  assert cfg.task_config.train_examples == "prefixes"
  assert study.named_recipe("bare_prefixes_hybrid_item", "collaborative")[1] == {}   # --id-scheme replaces its IDs
  assert study.named_recipe("bare") == (E.RECIPES["bare"], {})
  # a gin run file: its own lengths, or the paper's mixture files' where it leaves them to one
  assert E.dataset_config(study.named_recipe("recalign/gin/runs/cpu_bare.gin")[0]).task_feature_lengths == {
      "inputs": 96, "targets": 16}
  assert E.dataset_config(study.named_recipe("recalign/gin/runs/paper_base.gin")[0], [
      "INITIAL_CHECKPOINT_PATH = '/ckpt'"]).task_feature_lengths == study.PAPER_LENGTHS
  with pytest.raises(SystemExit, match="no such gin file"):
    study.named_recipe("recalign/gin/runs/nope.gin")
  synthetic_dataset(tmp_path, "syn", users=60)
  E.ensure_ids(tmp_path / "syn", ("collaborative",))
  sub = E.ensure_subset(tmp_path / "syn", 0.5, id_schemes=("collaborative",))
  data = PreparedData.load(sub)
  assert data.num_users == 30
  own = json.loads((sub / "ids" / "collaborative.json").read_text())["ids"]
  assert own == build_ids(data, "collaborative").ids
  assert own != json.loads((tmp_path / "syn" / "ids" / "collaborative.json").read_text())["ids"]
  assert E.ensure_subset(tmp_path / "syn", 0.5, id_schemes=("collaborative",)) == sub    # written once


@pytest.mark.slow   # ~2 minutes: the study's whole path, twice (run by hand before a study of many CPU hours)
def test_study_runs_to_its_step_cap_and_a_second_run_reads_everything_back(tmp_path):
  """tools/study.py end to end on tiny data (rows capped in steps, SASRecs per seed): study.json, the table with
  the baselines' rows, the validation curves, all in the record (`--record`); the same command again, after
  <out> (checkpoints, prepared data) is lost, trains nothing and prints the same table; so does --report with
  seeds not yet trained."""
  import json
  import shutil
  import subprocess
  import sys
  from conftest import write_tiny_tsv
  src = write_tiny_tsv(tmp_path / "src")
  cmd = [sys.executable, str(REPO / "tools" / "study.py"), "--data", str(src), "--name", "beauty", "--out",
         str(tmp_path / "scratch"), "--record", str(tmp_path / "study"), "--recipe", "bare", "--size", "tiny",
         "--kcore", "0", "--max-steps", "4",
         "--every", "2", "--rows", "retrieval", "re_mlm", "--seeds", "0", "--test-users", "4", "--val-users", "2",
         "--sasrec-epochs", "1", "--aux-share", "0.5"]   # (a mixture the second run must register again)
  first = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert first.returncode == 0, first.stderr[-2000:]
  results = json.loads((tmp_path / "study" / "study.json").read_text())
  assert sorted(results) == ["re_mlm@aux50/seed0", "retrieval/seed0"] and {r["steps"] for r in results.values()} == {4}
  assert sorted(json.loads((tmp_path / "study" / "sasrec.json").read_text())) == ["BCE/seed0", "CE/seed0"]
  table = study_table(first.stdout)
  assert [x.split(" | ")[0] for x in table[1:]] == ["| retrieval only (`beauty_retrieval`)",
                                                     "| retrieval + MLM, auxiliary tasks 50% of the examples "
                                                     "(`beauty_re_mlm_aux50`)", "| popularity",
                                                     "| History (training like-rate)",   # (it has ratings)
                                                     "| SASRec-BCE", "| SASRec-CE (sampled softmax)"]
  assert (tmp_path / "study" / "validation_curves.png").stat().st_size > 1000
  assert (tmp_path / "study" / "re_mlm@aux50" / "seed0" / "validation_log.jsonl").read_text() == (
      tmp_path / "scratch" / "re_mlm@aux50" / "seed0" / "validation_log.jsonl").read_text()
  kept = {f.relative_to(tmp_path / "study").parts[-1] for f in (tmp_path / "study").glob("*/seed0/**/*")}
  assert kept == {"train_log.jsonl", "validation_log.jsonl"}   # (the record: logs, no checkpoint)
  shutil.rmtree(tmp_path / "scratch")
  again = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert again.returncode == 0 and "trained beauty" not in again.stdout   # no row, no SASRec trained again
  assert study_table(again.stdout) == table
  # --report: what the record holds, nothing trained (not seed 1's rows, nor its SASRecs)
  report = subprocess.run(cmd + ["--seeds", "0", "1", "--report"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
  assert report.returncode == 0 and "[recalign] trained" not in report.stdout
  assert study_table(report.stdout) == table
  assert sorted(json.loads((tmp_path / "study" / "sasrec.json").read_text())) == ["BCE/seed0", "CE/seed0"]
  # --report with another recipe (the epochs and curves would come from its mixtures): refused
  other = [x if x != "bare" else "compact" for x in cmd] + ["--report"]
  refused = subprocess.run(other, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert refused.returncode != 0 and "was trained with recipe 'bare', this command has 'compact'" in refused.stderr
  # a later command trains one row alone, without --aux-share: the curves drawn after its run hold the record's
  # re_mlm@aux50 too, whose mixture that command registers from the record
  alone = subprocess.run(cmd[:-2] + ["--rows", "retrieval", "--seeds", "1"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
  assert alone.returncode == 0, alone.stderr[-2000:]
  assert sorted(json.loads((tmp_path / "study" / "study.json").read_text())) == [
      "re_mlm@aux50/seed0", "retrieval/seed0", "retrieval/seed1"]
  assert [x.split(" | ")[:2] for x in alone.stdout.splitlines() if x.startswith("| retrieval")] == [
      ["| retrieval only (`beauty_retrieval`)", "2"],
      ["| retrieval + MLM, auxiliary tasks 50% of the examples (`beauty_re_mlm_aux50`)", "1"]]


@pytest.mark.slow   # ~2 minutes: the paper-scale command's path (a gin run file + --gin) on a checkpoint made here
def test_study_fine_tunes_a_checkpoint_from_a_gin_run_file_on_its_own_vocabulary(tmp_path, tiny_root):
  """`--recipe <run file> --gin "INITIAL_CHECKPOINT_PATH = ..."`: the study's rows start from a Hugging Face
  T5 (made here, with its own T5-like SentencePiece model), train on that vocabulary and are scored."""
  import json
  import subprocess
  import sys
  import torch
  import transformers
  from conftest import train_t5_like_vocab, write_tiny_tsv
  from recalign.data import PreparedData
  from recalign.data.vocab import load_vocabulary
  from recalign.models.network import padded_vocab_size
  hf_dir = tmp_path / "hf"
  train_t5_like_vocab(PreparedData.load(tiny_root / "tiny"), hf_dir / "spiece.model")
  torch.manual_seed(0)
  transformers.T5ForConditionalGeneration(transformers.T5Config(   # the shape of recalign's `tiny`
      vocab_size=padded_vocab_size(load_vocabulary(hf_dir).vocab_size), d_model=32, d_kv=8, d_ff=64, num_layers=2,
      num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
      pad_token_id=0, eos_token_id=1)).save_pretrained(hf_dir)
  src = write_tiny_tsv(tmp_path / "src")
  out = tmp_path / "study"
  cmd = [sys.executable, str(REPO / "tools" / "study.py"), "--data", str(src), "--name", "beauty", "--out", str(out),
         "--recipe", "recalign/gin/runs/finetune.gin", "--gin", "include 'recalign/gin/models/tiny.gin'",
         "--gin", f"INITIAL_CHECKPOINT_PATH = '{hf_dir}'", "--kcore", "0", "--max-steps", "2", "--every", "2",
         "--rows", "retrieval", "--seeds", "0", "--test-users", "4", "--val-users", "2", "--sasrec-epochs", "0"]
  done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert done.returncode == 0, done.stderr[-2000:]
  run = json.loads((out / "retrieval" / "seed0" / "run.json").read_text())
  assert run["vocabulary"]["path"] == str((hf_dir / "spiece.model").resolve())   # not the data set's own
  config = (out / "retrieval" / "seed0" / "config.gin").read_text().replace("\\\n    ", "")   # (gin wraps lines)
  assert f"INITIAL_CHECKPOINT_PATH = '{hf_dir}'" in config
  result = json.loads((out / "study.json").read_text())["retrieval/seed0"]
  assert result["steps"] == 2 and 0 <= result["test/ndcg@10"] <= 1


def test_study_aux_share_runs_are_rows_of_their_own(tmp_path):
  """A row trained at --aux-share sits in the same record and table as the default mixing, under its own name
  (keys, log directories), set against the same base row; a row without auxiliary tasks is one row at any share."""
  import json
  study = load_study()
  assert study.run_label("reat", 0.3) == "reat@aux30" and study.run_label("reat", None) == "reat"
  assert study.run_label("retrieval", 0.3) == "retrieval" and study.run_label("ut_at", 0.25) == "ut_at@aux25"
  shared = [{**run("ut_at", s, v), "aux_share": 0.3, "mixture": "ml100k_ut_at_aux30"}
            for s, v in ((0, 0.05), (1, 0.07))]
  results = {f"{study.label_of(r)}/seed{r['seed']}": r for r in [
      run("ut", 0, 0.04), run("ut", 1, 0.04), run("ut_at", 0, 0.02), run("ut_at", 1, 0.02), *shared,
      {**run("ut", 2, 0.04), "aux_share": 0.3}]}                     # UT has nothing to share: a UT run
  assert sorted(results) == ["ut/seed0", "ut/seed1", "ut/seed2", "ut_at/seed0", "ut_at/seed1",
                             "ut_at@aux30/seed0", "ut_at@aux30/seed1"]
  lines = study.table(results).splitlines()
  assert len(lines) == 5 and lines[2].startswith("| UT (retrieval + ranking [+ rating]) (`ml100k_ut`) | 3 |")
  assert lines[3].startswith("| UT + AT (+ MLM + MIM) (`ml100k_ut_at`) | 2 | 0.0200 ± 0.0000 |")
  assert lines[4] == ("| UT + AT (+ MLM + MIM), auxiliary tasks 30% of the examples (`ml100k_ut_at_aux30`) | 2 | "
                      + "0.0600 ± 0.0141 | " * 5 + "+0.0200 NDCG@10 vs UT (retrieval + ranking [+ rating]) "
                      + "(exceeds spread 0.0141); +0.0400 NDCG@10 vs the paper's mixing (exceeds spread 0.0141)"
                      + " | — |")
  # its validation log is read from its own directory
  log = tmp_path / "ut_at@aux30" / "seed1" / "validation_log.jsonl"
  log.parent.mkdir(parents=True)
  log.write_text(json.dumps({"step": 500, "ndcg@10": 0.07}))
  assert study.validation_log(tmp_path, shared[1]) == ("ndcg@10", [{"step": 500, "ndcg@10": 0.07}])
  assert study.validation_log(tmp_path, results["ut_at/seed1"]) == (None, [])
