"""The eval job: every checkpoint of a run (T5X's restore modes, skipping evaluated steps, waiting for
a training job), and evaluation over a ('data', 'model') mesh equal to one device's."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, prepare_tiny, run_two_processes


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A tiny prepared data set and a 3-step run with a checkpoint at every step (3 kept)."""
  import recalign.tasks as rt
  from recalign import train as T
  from recalign import trainer
  from recalign.models.network import CONFIGS
  root = tmp_path_factory.mktemp("evaljob")
  prepare_tiny(root)
  kw = dict(model_dir=str(root / "run"), progress=False, model=trainer.ModelConfig(CONFIGS["tiny"]),
            dataset=trainer.DatasetConfig("tiny_retrieval", {"inputs": 128, "targets": 16}, 4,
                                          data_dirs=[str(root / "tiny")], task_config=rt.TaskConfig(num_candidates=3)),
            checkpoint=trainer.CheckpointConfig(every=1, keep=3))
  T.train(train_steps=3, **kw)
  return root, kw


def test_every_checkpoint_skips_evaluated_steps_and_waits_for_new_ones(tiny_run):
  from recalign import evaluate as E
  from recalign import train as T
  root, kw = tiny_run
  run = root / "run"
  settings = E.EvalSettings(split="validation", beam_size=2, batch_size=4)
  members = E.register_run_tasks(run, "tiny_retrieval")
  assert members == ["tiny_retrieval"]
  assert sorted(E.evaluate_run(run, members, settings, mode="latest", progress=False)) == [3]
  assert sorted(E.evaluate_run(run, members, settings, mode="all", progress=False)) == [1, 2]   # 3: done
  assert E.evaluate_run(run, members, settings, mode="all", progress=False) == {}
  for step in (1, 2, 3):
    m = json.loads((run / "eval" / str(step) / "metrics_tiny_retrieval_validation.json").read_text())
    assert m["examples"] > 0 and m["protocol"] == "full catalogue"
  # Another protocol is another evaluation; 'specific' takes the listed steps only.
  other = E.EvalSettings(split="validation", beam_size=2, batch_size=4, exclude_history=True)
  assert sorted(E.evaluate_run(run, members, other, mode="specific", steps=[2], progress=False)) == [2]
  # Waiting: a training job writes step 4 while the eval job polls; it stops once step 4 is evaluated.
  polls = []

  def train_meanwhile(seconds):
    polls.append(seconds)
    T.train(train_steps=4, **kw)

  done = E.evaluate_run(run, members, settings, wait=True, until_step=4, poll_seconds=7, sleep=train_meanwhile,
                        progress=False)
  assert sorted(done) == [4] and polls == [7]
  logged = [json.loads(x) for x in (run / "eval" / "evaluated.jsonl").read_text().splitlines()]
  assert [(e["step"], e["protocol"]) for e in logged] == [
      (3, "full catalogue"), (1, "full catalogue"), (2, "full catalogue"), (2, "history excluded"),
      (4, "full catalogue")]
  assert (run / "eval" / "tensorboard").is_dir()
  with pytest.raises(ValueError, match="restore mode"):
    E.evaluate_run(run, members, settings, mode="best")


MESH = r'''
import json, sys
import jax
from recalign import evaluate as E
from recalign import partitioning
run, out = sys.argv[1], sys.argv[2]
members = E.register_run_tasks(run, "tiny_ut")
settings = E.EvalSettings(split="test", beam_size=4, batch_size=8)
res = {}
meshes = {"one": partitioning.make_mesh(1, num_devices=1), "data8": partitioning.make_mesh(1),
          "data4_model2": partitioning.make_mesh(2)}
for name, mesh in meshes.items():
  r = E.evaluate_checkpoint(run + "/checkpoints/3", members, settings, mesh=mesh, output_dir=out + "/" + name,
                            progress=False)
  res[name] = {k: {"metrics": v.metrics, "predictions": v.predictions} for k, v in r.items()}
from recalign import cli   # the eval job as a user runs it, on the trainer's 4 x 2 mesh
assert cli.main(["eval", "--checkpoint", run + "/checkpoints/3", "--task", "tiny_ut", "--split", "test", "--beam", "4",
                 "--batch", "8", "--model-parallel", "2", "--output-dir", out + "/cli"]) == 0
res["cli_model2"] = {k: {"metrics": json.load(open(f"{out}/cli/metrics_{k}_test.json"))} for k in res["one"]}
print("RESULT", json.dumps({"devices": jax.device_count(), "res": res}))
'''


@pytest.mark.slow   # with the two-process evaluation below; CI keeps test_train's 8-device training parity
def test_mesh_evaluation_equals_one_device(tiny_run, tmp_path):
  """8 simulated CPU devices, data-parallel and 4 x 2 data x model parallel (also through `recalign eval
  --model-parallel 2`): the same beams, scores and metrics as one device (retrieval, and ranking's beams
  and teacher-forced scores)."""
  import os
  root, _ = tiny_run
  script = tmp_path / "mesh.py"
  script.write_text(MESH)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(REPO),
             TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, str(script), str(root / "run"), str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
  assert out["devices"] == 8
  one = out["res"]["one"]
  assert set(one) >= {"tiny_retrieval", "tiny_ranking"}
  for name in ("data8", "data4_model2", "cli_model2"):
    for task, r in out["res"][name].items():
      for k, v in one[task]["metrics"].items():
        assert r["metrics"][k] == pytest.approx(v, abs=1e-6), (name, task, k)
      for p, q in zip(r.get("predictions", []), one[task]["predictions"]):
        assert {k: v for k, v in p.items() if k != "scores"} == {k: v for k, v in q.items() if k != "scores"}
        assert p.get("scores", []) == pytest.approx(q.get("scores", []), abs=2e-3)


MULTI = r'''
import json, sys
import jax
from recalign import evaluate as E
from recalign import partitioning
run, out = sys.argv[1], sys.argv[2]
partitioning.maybe_initialize_distributed()
members = E.register_run_tasks(run, "tiny_ut")
res = E.evaluate_checkpoint(run + "/checkpoints/3", members, E.EvalSettings(split="test", beam_size=4, batch_size=2),
                            output_dir=out, progress=False)
print("RESULT", json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                            "metrics": {k: v.metrics for k, v in res.items()}}))
'''


@pytest.mark.slow   # two JAX processes; CI keeps test_train's 8-device training parity
def test_two_processes_evaluate_their_shares_and_equal_one_process(tiny_run, tmp_path):
  """2 processes x 2 CPU devices (launched as the README launches multi-host jobs): each decodes half
  of the users; both return the single-process metrics, and process 0 alone writes the same files."""
  from recalign import evaluate as E
  root, _ = tiny_run
  run = root / "run"
  members = E.register_run_tasks(run, "tiny_ut")
  single = E.evaluate_checkpoint(run / "checkpoints" / "3", members, E.EvalSettings(split="test", beam_size=4,
                                 batch_size=2), output_dir=tmp_path / "single" / "out", progress=False)
  script = tmp_path / "multi.py"
  script.write_text(MULTI)
  results = run_two_processes(script, [str(run), str(tmp_path / "multi" / "out")])
  assert [r["process"] for r in results] == [0, 1] and results[0]["processes"] == 2
  for r in results:
    for name, res in single.items():
      for k, v in res.metrics.items():
        assert r["metrics"][name][k] == pytest.approx(v, abs=1e-6), (r["process"], name, k)
  one, two = tmp_path / "single" / "out", tmp_path / "multi" / "out"
  files = sorted(p.name for p in one.glob("*_test.*"))
  assert files and files == sorted(p.name for p in two.glob("*_test.*"))
  for f in files:
    if f.startswith("metrics"):
      a, b = json.loads((one / f).read_text()), json.loads((two / f).read_text())
      assert {k: v for k, v in a.items() if isinstance(v, str)} == {k: v for k, v in b.items() if isinstance(v, str)}
      assert {k: v for k, v in a.items() if not isinstance(v, str)} == pytest.approx(
          {k: v for k, v in b.items() if not isinstance(v, str)}, abs=1e-6), f
    else:
      a, b = [[json.loads(x) for x in (d / f).read_text().splitlines()] for d in (one, two)]
      assert [{k: v for k, v in x.items() if k not in ("scores", "p_yes")} for x in a] == \
          [{k: v for k, v in x.items() if k not in ("scores", "p_yes")} for x in b], f
  assert len((tmp_path / "multi" / "evaluated.jsonl").read_text().splitlines()) == len(single)   # written once


def test_eval_with_gin_as_t5x_and_flags_override(tiny_run, tmp_path, capsys):
  from recalign import cli
  root, _ = tiny_run
  out = tmp_path / "g" / "out"
  assert cli.main(["eval", f"--gin_file={REPO / 'gin' / 'eval.gin'}",
                   f"--gin.CHECKPOINT_PATH='{root / 'run' / 'checkpoints' / '3'}'",
                   "--gin.MIXTURE_OR_TASK_NAME='tiny_retrieval'", "--gin.eval_job.beam_size=2",
                   f"--gin.eval_job.output_dir='{out}'", "--split", "validation"]) == 0
  printed = capsys.readouterr().out
  assert "protocol: full catalogue" in printed and "split: validation" in printed
  m = json.loads((out / "metrics_tiny_retrieval_validation.json").read_text())   # the flag beat EVAL_SPLIT
  assert m["split"] == "validation" and m["examples"] > 0
  import gin
  assert gin.query_parameter("eval_job.beam_size") == 2
  gin.clear_config()
  assert cli.main(["eval", "--task", "tiny_retrieval"]) == 2     # no checkpoint: a clear error
  assert "give --checkpoint" in capsys.readouterr().err
