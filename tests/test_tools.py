"""The study script's table: the numbers the ablation's reading is written from."""

import importlib.util

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


def test_study_table_means_spreads_and_rating_auc():
  study = load_study()
  results = {f"{r['row']}/seed{r['seed']}": r for r in [
      run("retrieval", 0, 0.010), run("retrieval", 1, 0.020),        # 0.0150 ± 0.0050
      run("ut", 0, 0.030, 0.6), run("ut", 1, 0.030, 0.7),            # +0.0150 > spread 0.0050 + 0
      run("ut_at", 0, 0.012, 0.5), run("ut_at", 1, 0.016, 0.5),      # -0.0010 < spread 0.0050 + 0.0020
      run("rating", 0, auc=0.55), run("rating", 1, auc=0.65)]}       # no retrieval metrics
  lines = study.table(results).splitlines()
  assert lines[0].endswith("| test NDCG@10 vs retrieval only | test rating AUC |")
  assert lines[2] == ("| retrieval only (`ml100k_retrieval`) | 2 | " + "0.0150 ± 0.0050 | " * 5 + "— | — |")
  assert lines[3] == ("| UT (retrieval + ranking [+ rating]) (`ml100k_ut`) | 2 | " + "0.0300 ± 0.0000 | " * 5
                      + "+0.0150 (exceeds spread 0.0050) | 0.6500 ± 0.0500 |")
  assert lines[4] == ("| UT + AT (+ MLM + MIM) (`ml100k_ut_at`) | 2 | " + "0.0140 ± 0.0020 | " * 5
                      + "-0.0010 (within spread 0.0070) | 0.5000 ± 0.0000 |")
  assert lines[5] == "| rating only (`ml100k_rating`) | 2 | " + "— | " * 6 + "0.6000 ± 0.0500 |"
  assert len(lines) == 6
  # without any AUC, no AUC column
  plain = study.table({k: v for k, v in results.items() if k.startswith("retrieval")}).splitlines()
  assert not plain[0].endswith("AUC |") and plain[1].count("---") == 8
