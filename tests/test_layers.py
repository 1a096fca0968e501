"""The layering of T5X: train.py and evaluate.py are siblings over partitioning / trainer / evaluator and
never import each other (a circle made gin need one imported before parsing the other's files)."""
import json
import subprocess
import sys

from conftest import REPO

PROBE = r'''
import json, sys
import {module}
print(json.dumps(sorted(m for m in sys.modules if m.startswith("recalign."))))
'''


def loaded_by(module: str) -> set[str]:
  r = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], capture_output=True, text=True,
                     cwd=REPO, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  return set(json.loads(r.stdout.splitlines()[-1]))


def test_train_and_evaluate_never_import_each_other():
  assert "recalign.evaluate" not in loaded_by("recalign.train")
  for_eval = loaded_by("recalign.evaluate")
  assert "recalign.train" not in for_eval
  assert {"recalign.partitioning", "recalign.evaluator"} <= for_eval


def test_the_run_record_reads_every_version_it_wrote(tmp_path):
  from recalign.run_record import VERSION, RunRecord
  base = {"network_config": {"d_model": 8}, "mixture_or_task_name": "tiny_retrieval",
          "task_feature_lengths": {"inputs": 8, "targets": 4}, "train_steps": 3}
  old = tmp_path / "v1_dataset_config"                    # before 2026-11-30
  old.mkdir()
  (old / "run.json").write_text(json.dumps({**base, "dataset_config": {"window": 20}, "data_dirs": ["/d"]}))
  rec = RunRecord.find(old / "checkpoints" / "3")
  assert (rec.version, rec.task_config, rec.data_dirs) == (1, {"window": 20}, ("/d",))
  new = tmp_path / "v2"
  RunRecord(**base, task_config={"window": 5}).write(new.mkdir() or new)
  again = RunRecord.read(new)
  assert again.version == VERSION == json.loads((new / "run.json").read_text())["version"] and again.task_config == {
      "window": 5}
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "run.json").write_text(json.dumps({"train_steps": 3}))
  import pytest
  with pytest.raises(ValueError, match="run.json lacks .*network_config"):
    RunRecord.read(tmp_path / "bad")


def test_a_mixture_and_a_model_file_without_a_run_file_get_the_from_scratch_run(monkeypatch):
  """`recalign train --gin_file=gin/retrieval_aux.gin --gin_file=gin/models/tiny.gin`: the model file's
  macros (DROPOUT_RATE) belong to run files; gin used to stop with "No bindings specified"."""
  import gin
  from recalign import cli
  monkeypatch.chdir(REPO)
  try:
    added = cli.parse_train_config(["recalign/gin/retrieval_aux.gin", "recalign/gin/models/tiny.gin"],
                                   ["MODEL_DIR = '/tmp/x'", "MIXTURE_OR_TASK_NAME = 'tiny_retrieval'"], [])
    assert added == cli.DEFAULT_RUN
    assert gin.query_parameter("%MODEL_SIZE") == "tiny" and gin.query_parameter("%DROPOUT_RATE") == 0.1
    gin.clear_config()
    bindings = ["MODEL_DIR = '/tmp/x'", "MIXTURE_OR_TASK_NAME = 'tiny_retrieval'"]
    assert cli.parse_train_config(["recalign/gin/runs/from_scratch.gin", "recalign/gin/retrieval_aux.gin",
                                   "recalign/gin/models/tiny.gin"], bindings, []) == []    # a run given: nothing added
  finally:
    gin.clear_config()
