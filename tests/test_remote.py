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

EMULATOR = r'''
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
'''

SCRIPT = r'''
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
  out = run_script(SCRIPT, tmp_path / "tiny", tmp_path / "hf")
  assert out["steps"] == [1, 2, 3]                      # step 3 came from a resume off gs://
  assert out["checkpoints"] == ["2", "3"] and out["run_json"] == 3    # orbax rotated on gs:// (keep 2)
  assert out["evaluated"] == [2, 3] and out["logged"] == [2, 3]
  assert out["metrics"]["protocol"] == "full catalogue" and out["metrics"]["examples"] > 0
  assert out["hf_same"]


SOURCES = r'''
try:
  import gzip, shutil
  from pathlib import Path
  import numpy as np
  from etils import epath
  from recalign.data import PreparedData, beam_prepare, prepare, read_source
  tsv, reviews, work = (Path(a) for a in sys.argv[1:4])
  with (reviews / "Beauty.jsonl").open("rb") as f, gzip.open(reviews / "Beauty.jsonl.gz", "wb") as g:
    shutil.copyfileobj(f, g)          # a gzipped source: read through a remote file object
  (reviews / "Beauty.jsonl").unlink()
  for folder in (tsv, reviews):
    for f in folder.iterdir():
      (epath.Path(f"gs://bkt/raw/{folder.name}") / f.name).write_bytes(f.read_bytes())

  def same(a, b, a_root, b_root):   # the reports' file:line examples name each its own copy of the files
    drop = lambda m, root: json.dumps({k: v for k, v in m.items() if k not in ("created", "beam", "source")}
                                      ).replace(str(root), "SOURCE")
    return (a.users == b.users and a.items == b.items and a.source_item_ids == b.source_item_ids
            and all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences))
            and all(np.array_equal(x, y) for x, y in zip(a.timestamps, b.timestamps))
            and np.array_equal(a.validation_users, b.validation_users)
            and drop(a.manifest, a_root) == drop(b.manifest, b_root))

  settings = dict(name="x", kcore=3, num_validation_users=10)
  local = prepare(read_source(tsv), **settings)
  remote = prepare(read_source(f"gs://bkt/raw/{tsv.name}"), **settings)
  remote.save("gs://bkt/prepared/x")                     # the JSON lines written to and read from the bucket
  loaded = PreparedData.load("gs://bkt/prepared/x")
  beam_prepare.prepare_folder(reviews, work / "local", **settings)
  beam_prepare.prepare_folder(f"gs://bkt/raw/{reviews.name}", work / "remote", **settings)
  beam = [PreparedData.load(work / w) for w in ("local", "remote")]
  print("RESULT", json.dumps({
      "in_process": same(local, remote, tsv, "gs://bkt/raw/tsv"), "saved_and_loaded": same(remote, loaded, tsv, tsv),
      "beam": same(*beam, reviews, "gs://bkt/raw/amazon-2023"),
      "files": [sorted(d.manifest["source"]["files"]) for d in (remote, beam[1])],
      "hashes": [sorted(d.manifest["source"]["files"].values()) for d in (local, remote, *beam)],
      "users": [local.num_users, beam[0].num_users]}))
finally:
  server.stop()
'''


def run_script(script: str, *args) -> dict:
  env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "-c", EMULATOR + script, *map(str, args)], env=env, capture_output=True,
                        text=True, timeout=900)
  assert "RESULT " in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
  return json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])


def test_sources_on_cloud_storage_emulator(tmp_path):
  """`recalign prepare` reads its source from gs:// (in one process and through Beam; a gzipped file too) and
  gives the data set it gives from local files; a prepared folder's JSON lines written to and read from gs://."""
  pytest.importorskip("apache_beam")
  from test_beam import messy_source, messy_tsv
  out = run_script(SOURCES, messy_tsv(tmp_path / "tsv"), messy_source(tmp_path, "amazon-2023"), tmp_path / "out")
  assert out["in_process"] and out["saved_and_loaded"] and out["beam"]
  assert out["files"] == [["gs://bkt/raw/tsv/interactions.tsv", "gs://bkt/raw/tsv/items.tsv"],
                          ["gs://bkt/raw/amazon-2023/Beauty.jsonl.gz", "gs://bkt/raw/amazon-2023/meta_Beauty.jsonl"]]
  assert out["hashes"][0] == out["hashes"][1] and out["hashes"][2] == out["hashes"][3]   # the same bytes were read
  assert min(out["users"]) > 5
