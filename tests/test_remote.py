"""MODEL_DIR on Cloud Storage (gs://), against a local emulator started and stopped by the test:
training (recalign's files through etils.epath, checkpoints through orbax + tensorstore), resuming,
and the eval job's results. TensorBoard summaries are not covered: TensorFlow's own GCS client cannot
be pointed at an emulator (they are switched off here with tensorboard=False)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, prepare_tiny

SCRIPT = r'''
import json, os, socket, sys
from gcp_storage_emulator.handlers import objects
_download = objects.download


def download(request, response, storage, *args, **kwargs):
  """The stub emulator's media download leaves out the x-goog-generation header real Cloud Storage
  sends (tensorstore, under orbax, reads it); add it before the server's routes are built."""
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:
    return
  response["x-goog-generation"], response["x-goog-metageneration"] = obj["generation"], obj["metageneration"]


objects.download = download
from gcp_storage_emulator.server import create_server  # noqa: E402
with socket.socket() as s:
  s.bind(("localhost", 0))
  port = s.getsockname()[1]
server = create_server("localhost", port, in_memory=True, default_bucket="bkt")
server.start()
os.environ["STORAGE_EMULATOR_HOST"] = os.environ["TENSORSTORE_GCS_HTTP_URL"] = f"http://localhost:{port}"
os.environ["EPATH_USE_TF"] = "false"          # epath through gcsfs, which honours the emulator
try:
  from etils import epath
  import recalign.tasks as rt
  from recalign import evaluate as E
  from recalign import train as T
  from recalign import trainer
  from recalign.models.network import CONFIGS
  data, run = sys.argv[1], "gs://bkt/runs/tiny"
  kw = dict(model_dir=run, model=trainer.ModelConfig(CONFIGS["tiny"]), progress=False, tensorboard=False, log_every=1,
            dataset=trainer.DatasetConfig("tiny_retrieval", {"inputs": 128, "targets": 16}, 4, data_dirs=[data],
                                          task_config=rt.TaskConfig(num_candidates=3)),
            checkpoint=trainer.CheckpointConfig(every=1, keep=2))
  first = T.train(train_steps=2, **kw)
  resumed = T.train(train_steps=3, **kw)          # resumes from gs://.../checkpoints/2
  members = E.register_run_tasks(run, "tiny_retrieval")
  done = E.evaluate_run(run, members, E.EvalSettings(split="validation", beam_size=2, batch_size=4),
                        mode="all", progress=False, tensorboard=False)
  # INITIAL_CHECKPOINT_PATH on gs://: a Hugging Face directory read through epath equals the local one
  import numpy as np
  from recalign.models import checkpoints as ck
  local = ck.load_checkpoint(run + "/checkpoints/3")
  ck.save_hf(local.config, local.params, sys.argv[2])
  for f in epath.Path(sys.argv[2]).iterdir():
    (epath.Path("gs://bkt/hf") / f.name).write_bytes(f.read_bytes())
  remote = ck.load_checkpoint("gs://bkt/hf")
  a, b = ck.flatten(remote.params), ck.flatten(local.params)
  same = remote.format == "huggingface" and set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
  root = epath.Path(run)
  print("RESULT", json.dumps({
      "steps": [json.loads(x)["step"] for x in (root / "train_log.jsonl").read_text().splitlines()],
      "checkpoints": sorted(p.name for p in (root / "checkpoints").iterdir()),
      "run_json": json.loads((root / "run.json").read_text())["train_steps"],
      "evaluated": sorted(done),
      "metrics": json.loads((root / "eval" / "3" / "metrics_tiny_retrieval_validation.json").read_text()),
      "logged": [json.loads(x)["step"] for x in (root / "eval" / "evaluated.jsonl").read_text().splitlines()],
      "losses": [first["loss"], resumed["loss"]], "hf_same": bool(same)}))
finally:
  server.stop()
'''


@pytest.mark.slow   # a storage emulator, a training and an eval job: the gs:// path end to end
def test_model_dir_on_cloud_storage_emulator(tmp_path):
  prepare_tiny(tmp_path)
  (tmp_path / "remote.py").write_text(SCRIPT)
  env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, str(tmp_path / "remote.py"), str(tmp_path / "tiny"), str(tmp_path / "hf")],
                        env=env,
                        capture_output=True, text=True, timeout=900)
  assert "RESULT " in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
  out = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
  assert out["steps"] == [1, 2, 3]                      # step 3 came from a resume off gs://
  assert out["checkpoints"] == ["2", "3"] and out["run_json"] == 3    # orbax rotated on gs:// (keep 2)
  assert out["evaluated"] == [2, 3] and out["logged"] == [2, 3]
  assert out["metrics"]["protocol"] == "full catalogue" and out["metrics"]["examples"] > 0
  assert out["hf_same"]
