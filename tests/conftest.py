import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("RECALIGN_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_configure(config):
  """One XLA compilation cache for the session, shared with the training / eval processes the tests start
  (they inherit the environment): dozens of tests compile the same tiny train step, and each compile costs
  10-30 s on 2 cores. A fresh folder per session, so every program is compiled once by this suite."""
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="recalign-test-xla-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_xdist_auto_num_workers(config) -> int:
  """`-n auto` (pyproject): a worker per core this process may use (xdist's own count is the physical cores, 1 on
  a VM of 2 hyperthreads), at most 4 and one per 6 GiB of memory -- a worker peaked at 4.4 GiB, with the training
  processes its tests start up to 1.7 GiB more (2 workers, 2026-12-05)."""
  memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS: none
  return max(1, min(4, cores, int(memory_gib // 6)))


def pytest_collection_modifyitems(config, items):
  """Slow end-to-end tests train on the shared data for many minutes: a longer per-test limit than
  pyproject's (which is there so a hang fails by name rather than running into CI's limit)."""
  for item in items:
    if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
      item.add_marker(pytest.mark.timeout(3 * 3600))


TRAIN_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))


def train_command(root: Path, steps: int, *runs: tuple[Path, dict]) -> list[str]:
  """The command that trains each (model_dir, extra) of `runs` for `steps` on root/tiny (tiny_root) in a
  process of its own, as tiny_run.train does in the test's process."""
  import json
  import sys
  return [sys.executable, str(REPO / "tests" / "tiny_run.py"), str(root / "tiny"), str(steps),
          *(a for model_dir, extra in runs for a in (str(model_dir), json.dumps(extra)))]


def train_env(devices: int = 1, file_size: int = 0) -> dict:
  env = dict(TRAIN_ENV)
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  if file_size:
    env["RECALIGN_TEST_FILE_SIZE"] = str(file_size)
  return env


def logged_losses(model_dir: Path) -> dict[int, float]:
  """step -> loss from train_log.jsonl (every step once: a resume rewinds the log to its checkpoint)."""
  import json
  return {r["step"]: r["loss"] for r in map(json.loads, (model_dir / "train_log.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module", autouse=True)
def fresh_registry():
  """Every test module registers its data sets afresh (several prepare their own "tiny" in their own folder,
  and a name registered again from another folder is an error, as in seqio)."""
  import recalign.tasks as rt
  rt.unregister()
  yield


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
  """The hand-made data set prepared at <root>/tiny, shared by the tests that train on it."""
  root = tmp_path_factory.mktemp("tiny_runs")
  prepare_tiny(root)
  return root


def shared(name: str) -> Path:
  path = SHARED / name
  if not path.exists():
    if os.environ.get("CI"):
      raise FileNotFoundError(f"{path} is missing: CI must run with ../shared beside the checkout")
    pytest.skip(f"{path} not available")
  return path


def write_tiny_tsv(root: Path, *, ratings: bool = True) -> Path:
  """A hand-made amazon-tsv data set: 6 users, 8 items, titles; every user has >= 4 items."""
  root.mkdir(parents=True, exist_ok=True)
  seqs = {  # user -> [(item, timestamp, rating)], deliberately out of time order in the file
      "u1": [("a", 3, 5), ("b", 1, 4), ("c", 2, 2), ("d", 4, 5), ("e", 5, 1)],
      "u2": [("b", 1, 5), ("c", 2, 4), ("d", 3, 3), ("f", 4, 5)],
      "u3": [("a", 1, 2), ("c", 2, 5), ("e", 3, 4), ("g", 4, 5), ("h", 5, 4)],
      "u4": [("b", 1, 1), ("d", 2, 5), ("f", 3, 4), ("g", 4, 2)],
      "u5": [("a", 1, 4), ("e", 1, 5), ("h", 2, 3), ("c", 3, 5)],
      "u6": [("f", 1, 5), ("g", 2, 4), ("h", 3, 1), ("a", 4, 5), ("b", 5, 4)],
  }
  head = "user_id\titem_id\ttimestamp" + ("\trating" if ratings else "")
  lines = [head]
  for u, s in seqs.items():
    for item, t, r in s:
      lines.append(f"{u}\t{item}\t{t}" + (f"\t{r}" if ratings else ""))
  (root / "interactions.tsv").write_text("\n".join(lines) + "\n")
  titles = {"a": "Rose Oil", "b": "Lip Balm &amp; Tint", "c": "Nail Polish", "d": "Hair Gel",
            "e": "Face Cream", "f": "Eye Liner", "g": "Soap Bar", "h": "Body Lotion"}
  rows = ["item_id\ttitle\tbrand\tprice\tcategories"]
  for k, title in titles.items():
    rows.append(f"{k}\t{title}\tBrand{k.upper()}\t{ord(k) - 90}.99\tBeauty > {title.split()[-1]}")
  (root / "items.tsv").write_text("\n".join(rows) + "\n")
  return root


def train_t5_like_vocab(data, path: Path, vocab_size: int = 400) -> Path:
  """A SentencePiece model shaped like T5's: unigram, digits not split (and allowed to merge with
  the characters around them), pad 0 / eos 1 / unk 2, no BOS; seqio adds the 100 extra ids."""
  import io
  import sentencepiece as spm
  from recalign.data.vocab import training_text
  # Many "x7," in the text: pieces that swallow the comma after a digit, as "7," in "I7, I2".
  text = list(training_text(data)) + [" ".join(f"{c}{d}," for c in "abxyz") for d in range(10)] * 100
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(text), model_writer=model, vocab_size=vocab_size, model_type="unigram",
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, split_digits=False, split_by_number=False,
      character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(model.getvalue())
  return path


def synthetic_dataset(root: Path, name: str, *, users: int = 60, items: int = 200, length: int = 8,
                      num_candidates: int = 20):
  """A registered data set of random sequences (no titles), one training window per user, so that
  example i is user i in every split."""
  import numpy as np
  import recalign.tasks as rt
  from recalign.data import AMAZON, prepare
  from recalign.data.ingest import Interaction, RawData
  from recalign.data.report import IngestReport
  from recalign.data.vocab import train_vocabulary
  rng = np.random.default_rng(0)
  seqs = {f"u{u:04d}": [Interaction(f"i{int(x):04d}", float(t), None)
                        for t, x in enumerate(rng.choice(items, length, replace=False))] for u in range(users)}
  data = prepare(RawData(seqs, {}, AMAZON, "synthetic", [], IngestReport()), name=name, kcore=0)
  data.save(root / name)
  train_vocabulary(data, root / name / "vocab", vocab_size=200)
  rt.register_dataset(root / name, config=rt.TaskConfig(num_candidates=num_candidates))
  return data


def large_graph_constants(ds, min_elements: int) -> list[tuple[str, int]]:
  """(name, size) of the constants of at least `min_elements` values inside the map / filter functions of
  the tf.data pipeline `ds` (walked through its input datasets): tables a map function should capture as
  tensors, not copy into its graph (tf.data copies graph constants into every graph it serialises).
  TF itself copies captured tensors of at most 128 values by value: test with larger tables."""
  found, stack = [], [ds]
  while stack:
    d = stack.pop()
    for attr in ("_map_func", "_predicate"):
      fn = getattr(d, attr, None)
      if fn is not None:
        found += [(op.name, op.outputs[0].shape.num_elements()) for op in fn.function.graph.get_operations()
                  if op.type == "Const" and (op.outputs[0].shape.num_elements() or 0) >= min_elements]
    if getattr(d, "_input_dataset", None) is not None:
      stack.append(d._input_dataset)
  return found


def prepare_tiny(root: Path, name: str = "tiny") -> Path:
  """The hand-made data set prepared (no k-core) under root/name (JSON lines and TFDS copy), with a 300-piece
  vocabulary."""
  from recalign.data import prepare, read_source, tfds_data
  from recalign.data.vocab import train_vocabulary
  data = prepare(read_source(write_tiny_tsv(root / "src")), name=name, kcore=0)
  tfds_data.save(data, root / name)
  train_vocabulary(data, root / name / "vocab", vocab_size=300)
  return root / name


def run_two_processes(script: Path, args: list[str], devices: int = 2, timeout: int = 900) -> list[dict]:
  """Runs `script` as a 2-process JAX job on this machine (devices CPU devices each), launched the way
  the README launches multi-host jobs (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID);
  returns each process's `RESULT <json>` line, parsed."""
  import json
  import socket
  import subprocess
  import sys
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = []
  for pid in range(2):
    env = dict(train_env(devices), JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  return [json.loads(o.split("RESULT ", 1)[1].splitlines()[0]) for o in outs]
