"""Faults a TPU / GPU VM user meets, injected: preemption (SIGTERM), non-finite steps, two writers on one
MODEL_DIR, damaged checkpoints, a full disk, an unwritable MODEL_DIR, values no run can use, and an eval
job stopped while it waits (README: Reliability)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TRAIN_ENV, logged_losses as losses, train_command, train_env
from tiny_run import configs, train as train_tiny

STEPS, EVERY = 24, 4
ENV = TRAIN_ENV


def command(tiny_root: Path, model_dir: Path, steps: int = STEPS, **extra) -> list[str]:
  return train_command(tiny_root, steps, (model_dir, extra))


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None and (
      not path.exists() or len(path.read_text().splitlines()) < n):
    time.sleep(0.01)
  assert proc.poll() is None, "the run ended before the fault could be injected"


@pytest.fixture(scope="module")
def reference(tiny_root):
  """The losses of an uninterrupted run (checkpoints every 4 steps, the newest 3 kept). Runs interrupted in
  a process of their own are resumed in the test's process (no second start-up): the same computation."""
  train_tiny(tiny_root / "tiny", tiny_root / "ref", STEPS, every=EVERY)
  return losses(tiny_root / "ref")


@pytest.mark.slow   # CI keeps the SIGTERM test below: the same resume, from a checkpoint the signal forced
def test_a_run_killed_mid_way_resumes_to_the_same_losses(tiny_root, reference):
  run = tiny_root / "killed"
  proc = subprocess.Popen(command(tiny_root, run, every=EVERY), env=ENV, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  log = run / "train_log.jsonl"
  wait_for_lines(log, 11, proc)
  proc.send_signal(signal.SIGKILL)   # a crash: no handler runs, the newest checkpoint is whatever was saved
  proc.wait()
  from recalign.models.checkpoints import saved_steps
  assert len(log.read_text().splitlines()) < STEPS, "the run finished before it could be killed"
  resumed_from = max(saved_steps(run))
  train_tiny(tiny_root / "tiny", run, STEPS, every=EVERY)
  assert resumed_from > 1 and resumed_from % EVERY == 0     # from a saved checkpoint, not from scratch ...
  assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == list(range(1, STEPS + 1))
  assert losses(run) == reference                              # ... and every loss equals the uninterrupted run


def test_sigterm_saves_the_step_and_the_resume_reproduces_an_uninterrupted_run(tiny_root, reference, capfd):
  from recalign.faults import PREEMPTED_EXIT_CODE
  from recalign.models.checkpoints import saved_steps
  assert sorted(reference) == list(range(1, STEPS + 1))         # the reference run learns
  first, last = (np.mean([reference[s] for s in steps]) for steps in (range(1, 6), range(STEPS - 4, STEPS + 1)))
  assert last < 0.7 * first, (first, last)
  assert (tiny_root / "ref" / "train").is_dir() and (tiny_root / "ref" / "checkpoints").is_dir()   # TensorBoard, orbax
  run = tiny_root / "preempted"    # CheckpointConfig.every left at 1000: only step 1 would be saved without SIGTERM
  proc = subprocess.Popen(command(tiny_root, run), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for_lines(run / "train_log.jsonl", 8, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
  k = max(losses(run))
  assert 8 <= k < STEPS and saved_steps(run) == [1, k]          # the checkpoint of the step it stopped at
  assert "saving a checkpoint" in err
  assert [p.name for p in (run / "input_state").iterdir()] == [str(k)]   # and the input stream's state there
  train_tiny(tiny_root / "tiny", run, STEPS)
  assert "replaying the input stream" not in capfd.readouterr().err    # restored, not replayed
  assert losses(run) == reference                                   # nothing lost, nothing different
  assert not any((run / "input_state").iterdir())                  # the final checkpoint made the state stale


def test_a_preempted_run_saves_at_once_and_validates_the_steps_an_uninterrupted_run_validates(tiny_root):
  """SIGTERM during step 2's validation: step 3 is saved and the run stops without validating it -- a validation
  can outlast a preemption notice, and an extra one would move the best step and the patience count away from
  an uninterrupted run's -- and the resumed run validates steps 4 and 6, as an uninterrupted one."""
  import recalign.tasks as rt
  from recalign import faults, train as T, trainer
  from recalign.models.checkpoints import saved_steps
  from recalign.models.network import CONFIGS
  rt.register_dataset(tiny_root / "tiny", config=rt.TaskConfig(num_candidates=3))
  calls = []

  def validate(model, params):
    calls.append(len(calls))
    if len(calls) == 1:
      os.kill(os.getpid(), signal.SIGTERM)    # the notice arrives while step 2 is validated
    return {"ndcg@10": 0.1 * len(calls)}

  kw = configs(mixture_or_task_name="tiny_retrieval", task_feature_lengths={"inputs": 128, "targets": 16},
               batch_size=4, network_config=CONFIGS["tiny"], progress=False, train_steps=6,
               validation=trainer.ValidationConfig(every=2, task="tiny_retrieval"))
  run = tiny_root / "preempted_validating"
  validated = lambda: [json.loads(x)["step"] for x in (run / "validation_log.jsonl").read_text().splitlines()]  # noqa: E731
  with pytest.raises(faults.Preempted):
    T.train(model_dir=str(run), validate_fn=validate, **kw)
  assert validated() == [2] and saved_steps(run)[-1] == 3
  T.train(model_dir=str(run), validate_fn=validate, **kw)
  assert validated() == [2, 4, 6]


@pytest.mark.parametrize("pack", [True, False])
def test_the_input_stream_restored_or_replayed_goes_on_as_one_never_interrupted(tiny_root, tmp_path, pack):
  """Saved after 3 batches and restored into a fresh pipeline, the stream gives the batches of a stream never
  interrupted -- the examples waiting in the packer included, and past the tasks' epoch ends, where masks and
  negatives are drawn anew -- and so does replaying it, as a resume without a saved state does."""
  import recalign.tasks as rt
  from recalign import trainer
  from recalign.tasks import packing
  rt.register_dataset(tiny_root / "tiny", config=rt.TaskConfig(num_candidates=3))
  task, lengths = rt.get("tiny_reat"), {"inputs": 128, "targets": 48}

  def batches(n: int, resume_from=None, at: int = 0) -> list[dict]:
    stream = trainer.InputBatches(task, lengths, 8, seed=0, pack=pack)
    how = stream.resume(resume_from, at) if resume_from is not None else ""
    return [next(stream) for _ in range(n)], stream, how

  never, _, _ = batches(15)
  _, saved, _ = batches(3)
  assert not pack or len(saved._packer.waiting) == 8     # a batch closes with `rows` examples waiting
  saved.save(tmp_path, 3)
  restored, _, how = batches(12, tmp_path, 3)
  replayed, _, how_replayed = batches(12, tmp_path / "nothing saved", 3)
  assert "restored" in how and "replayed" in how_replayed
  one_epoch = sum(t.num_input_examples("train") for t in task.tasks)
  assert sum(packing.num_examples(b) for b in never[3:]) > one_epoch     # every task's epoch ended on the way
  for got in (restored, replayed):
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(never[3:], got) for k in a)
  saved.save(tmp_path, 4)
  assert [p.name for p in (tmp_path / "input_state").iterdir()] == ["4"]   # the newest state only
  if pack:   # a damaged state (here the iterator's, read after the packer's) is replayed from the start
    for f in (tmp_path / "input_state" / "4").glob("process_0.data*"):
      f.write_bytes(b"\0" * 64)
    damaged, _, how = batches(11, tmp_path, 4)
    assert "replayed" in how
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(never[4:], damaged) for k in a)


def test_steps_logged_after_the_newest_checkpoint_are_logged_once_when_trained_again(tiny_root, reference):
  """A crash after the log got past the newest checkpoint (here: the run's last checkpoint removed, as if the
  process died before writing it): the resumed run trains those steps again, and train_log.jsonl holds every
  step once -- the losses, examples seen and minutes of an uninterrupted run's steps, not the lost ones' too."""
  import shutil
  run = tiny_root / "rewound"
  train_tiny(tiny_root / "tiny", run, 10, every=EVERY)
  shutil.rmtree(run / "checkpoints" / "10")            # the newest left: step 8; steps 9, 10 were logged
  train_tiny(tiny_root / "tiny", run, 12, every=EVERY)
  rows = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
  ref = {r["step"]: r for r in map(json.loads, (tiny_root / "ref" / "train_log.jsonl").read_text().splitlines())}
  assert [r["step"] for r in rows] == list(range(1, 13))
  assert [r["loss"] for r in rows] == [reference[s] for s in range(1, 13)]
  assert [r["examples_seen"] for r in rows] == [ref[s]["examples_seen"] for s in range(1, 13)]
  assert all(a["minutes"] < b["minutes"] for a, b in zip(rows, rows[1:]))


def test_a_non_finite_step_is_never_applied_nor_saved(tiny_root):
  """A learning rate that turns NaN from step 4 on (as LEARNING_RATE=1e12 does after a few steps): 'stop'
  names the step and the last good checkpoint; 'skip' counts the steps and keeps the last good state."""
  import jax.numpy as jnp
  import recalign.tasks as rt
  from recalign import faults
  from recalign import train as T
  from recalign import trainer
  from recalign.models import checkpoints as ck
  from recalign.models.network import CONFIGS
  rt.register_dataset(tiny_root / "tiny", config=rt.TaskConfig(num_candidates=3))
  nan_from_4 = lambda s: jnp.where(s >= 3, jnp.nan, 1e-3)  # noqa: E731  (step index 3 = the 4th step)
  kw = configs(mixture_or_task_name="tiny_retrieval", task_feature_lengths={"inputs": 128, "targets": 16},
               batch_size=4, network_config=CONFIGS["tiny"], log_every=3, progress=False, schedule=nan_from_4,
               optimizer=trainer.make_optimizer(nan_from_4, name="adamw"), every=3, keep=5)
  stopped = tiny_root / "nan_stop"
  with pytest.raises(faults.NonFiniteError, match=r"step 4: .*not finite.*last good checkpoint is step 3"):
    T.train(model_dir=str(stopped), train_steps=8, **kw)
  assert ck.saved_steps(stopped) == [1, 3]
  assert all(np.isfinite(v).all() for v in ck.flatten(ck.load_params(stopped / "checkpoints" / "3")).values())

  skipped = tiny_root / "nan_skip"
  out = T.train(model_dir=str(skipped), train_steps=6, on_nonfinite="skip", **kw)
  assert out["skipped_steps"] == 3 and out["step"] == 6
  at3, at6 = (ck.flatten(ck.load_params(skipped / "checkpoints" / str(s))) for s in (3, 6))
  assert all(np.array_equal(at3[k], at6[k]) for k in at3)          # steps 4-6 changed nothing
  with pytest.raises(ValueError, match="on_nonfinite must be 'stop' or 'skip'"):
    T.train(model_dir=str(tiny_root / "nan_bad"), train_steps=6, on_nonfinite="ignore", **kw)


def test_a_second_trainer_on_a_model_dir_is_refused_until_the_first_is_gone(tiny_root, reference):
  """The first job holds MODEL_DIR's lock as train() takes it (a small process: faults.ModelDirLock alone)."""
  import shutil
  from recalign import faults
  run = tiny_root / "shared_dir"
  shutil.copytree(tiny_root / "ref", run)
  holder = ("import sys, time; from recalign.faults import ModelDirLock; ModelDirLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(600)")
  proc = subprocess.Popen([sys.executable, "-c", holder, str(run)], env=ENV, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  try:
    with pytest.raises(faults.ModelDirBusy, match=rf"being written by another training job, pid {proc.pid} on "):
      train_tiny(tiny_root / "tiny", run, STEPS + 1)
  finally:
    proc.kill()    # a crash: the kernel drops its lock
    proc.wait()
  assert json.loads((run / "train.lock").read_text())["pid"] == proc.pid
  assert max(losses(run)) == STEPS                           # the refused job trained nothing
  out = train_tiny(tiny_root / "tiny", run, STEPS + 1)             # the lock of the killed job is not stuck
  assert out["step"] == STEPS + 1 and json.loads((run / "train.lock").read_text())["pid"] == os.getpid()


def test_a_lease_on_an_object_store_is_refused_while_fresh_and_taken_over_when_stale(tmp_path):
  from recalign import faults
  lease = tmp_path / "train.lock"
  other = {"host": "vm-7", "pid": 4242, "since": "2026-12-01T00:00:00+0000", "token": "theirs"}
  lease.write_text(json.dumps({**other, "heartbeat": time.time()}))
  with pytest.raises(faults.ModelDirBusy, match="pid 4242 on vm-7"):
    faults.ModelDirLock(tmp_path, remote=True).acquire()
  lease.write_text(json.dumps({**other, "heartbeat": time.time() - 600}))    # its job died 10 minutes ago
  lock = faults.ModelDirLock(tmp_path, remote=True, heartbeat_s=0.05).acquire()
  first = json.loads(lease.read_text())
  assert first["pid"] == os.getpid()
  time.sleep(0.3)
  assert json.loads(lease.read_text())["heartbeat"] > first["heartbeat"]      # renewed while held
  lock.release()
  assert not lease.exists()


def test_a_damaged_checkpoint_is_named_and_the_previous_one_used_only_on_request(tiny_root, reference, capsys):
  import shutil
  from recalign import faults
  from recalign.models import checkpoints as ck
  run = tiny_root / "damaged"
  shutil.copytree(tiny_root / "ref", run)
  kept = ck.saved_steps(run)
  assert kept[-2:] == [STEPS - EVERY, STEPS]
  biggest = max((run / "checkpoints" / "24").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
  with open(biggest, "r+b") as f:        # a crash mid-write: the newest checkpoint's largest file cut in half
    f.truncate(biggest.stat().st_size // 2)
  with pytest.raises(faults.CheckpointDamaged, match=rf"{run}/checkpoints/24 cannot be restored.*start from step 20"):
    train_tiny(tiny_root / "tiny", run, STEPS + 2)
  with pytest.raises(faults.CheckpointDamaged, match=f"{run}/checkpoints/24/default cannot be read"):
    ck.load_checkpoint(run / "checkpoints" / "24")                # the eval job's reader says so too
  assert ck.saved_steps(run) == kept and not (run / "checkpoints_damaged").exists()   # nothing moved unasked
  train_tiny(tiny_root / "tiny", run, STEPS, restore_fallback=True)
  assert "could not be restored and were moved to" in capsys.readouterr().err
  assert [p.name.split(".")[0] for p in (run / "checkpoints_damaged").iterdir()] == ["24"]
  assert ck.saved_steps(run) == kept
  assert losses(run) == reference          # steps 21-24 trained again from step 20 give the same losses


@pytest.mark.slow   # CI keeps the other fault tests; a training process of its own with a file-size limit
def test_a_full_disk_fails_the_save_clearly_and_leaves_no_half_checkpoint(tiny_root):
  from recalign.models.checkpoints import saved_steps
  run = tiny_root / "full_disk"
  r = subprocess.run(command(tiny_root, run, steps=4), env=train_env(file_size=100_000), capture_output=True, text=True)
  err = json.loads(r.stdout.splitlines()[-1])
  assert r.returncode == 2 and err["error"] == "CheckpointWriteError", r.stderr[-2000:]
  assert "File too large" in err["message"] and "newest complete checkpoint is none" in err["message"]
  assert saved_steps(run) == []                        # the half-written step is not a checkpoint
  train_tiny(tiny_root / "tiny", run, 4)                                           # space again: it trains
  assert saved_steps(run) == [1, 4]


def test_an_unwritable_model_dir_and_impossible_values_are_refused_before_training(tiny_root, tmp_path):
  import recalign.tasks as rt
  from recalign import faults
  from recalign import train as T
  from recalign import trainer
  from recalign.models.network import CONFIGS
  rt.register_dataset(tiny_root / "tiny", config=rt.TaskConfig(num_candidates=3))
  kw = dict(mixture_or_task_name="tiny_retrieval", task_feature_lengths={"inputs": 128, "targets": 16},
            batch_size=4, network_config=CONFIGS["tiny"], progress=False, train_steps=2)
  (tmp_path / "a_file").write_text("")
  with pytest.raises(faults.CheckpointWriteError, match="a_file/run is not writable"):
    T.train(model_dir=str(tmp_path / "a_file" / "run"), **configs(**kw))
  bad = [({"train_steps": -5}, "TRAIN_STEPS must be a positive integer, not -5"),
         ({"batch_size": 0}, "BATCH_SIZE must be a positive integer"),
         ({"every": 0}, "CheckpointConfig.every must be positive"),
         ({"validation": trainer.ValidationConfig(patience=-1)}, "cannot be negative"),
         ({"task_feature_lengths": {"inputs": 128}}, "TASK_FEATURE_LENGTHS must be"),
         ({"mixture_or_task_name": "tiny_reat", "task_feature_lengths": {"inputs": 16, "targets": 48}},
          r"\['inputs'\]=16 .* too short for tiny_mim: none of its first 32"),      # (it used to hang)
         ({"task_feature_lengths": {"inputs": 128, "targets": 2}},
          r"\['targets'\]=2 is too short for tiny_retrieval: 32 of its first 32 .* need up to 3 tokens"),
         ({"mixture_or_task_name": "tiny_ranking", "task_feature_lengths": {"inputs": 32, "targets": 16}},
          "tiny_ranking: ranking: the template and 3 candidate IDs do not fit"),
         ({"mixture_or_task_name": "tiny_retrival"}, "tiny_retrival")]
  for change, message in bad:
    model_dir = tmp_path / "bad"
    with pytest.raises(ValueError, match=message):
      T.train(model_dir=str(model_dir), **configs(**{**kw, **change}))
    assert not (model_dir / "train_log.jsonl").exists() and not (model_dir / "checkpoints").exists()


def test_batch_not_divisible_by_the_data_parallel_devices_is_refused_by_name(tiny_root):
  code = (f"import recalign.tasks as rt, jax; from recalign import train as T, trainer; from recalign.models.network "
          f"import CONFIGS; rt.register_dataset({str(tiny_root / 'tiny')!r}); "
          f"T.train(model_dir={str(tiny_root / 'par')!r}, "
          "dataset=trainer.DatasetConfig('tiny_retrieval', {'inputs': 128, 'targets': 16}, 12), "
          "model=trainer.ModelConfig(CONFIGS['tiny']), train_steps=2, progress=False)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                     env=train_env(8))
  assert r.returncode != 0 and "BATCH_SIZE=12 is not divisible by the 8 data-parallel devices" in r.stderr


@pytest.mark.slow   # an eval job process; CI keeps the training job's SIGTERM test
def test_the_eval_job_stops_cleanly_on_sigterm_while_it_waits(tiny_root, reference):
  import shutil
  from recalign.faults import PREEMPTED_EXIT_CODE
  from recalign.models.checkpoints import saved_steps
  run = tiny_root / "eval_waits"
  shutil.copytree(tiny_root / "ref", run)
  code = "import sys; from recalign.cli import main; sys.exit(main(sys.argv[1:]))"
  proc = subprocess.Popen([sys.executable, "-c", code, "eval", "--checkpoint", str(run), "--task",
                           "tiny_retrieval", "--data", str(tiny_root / "tiny"), "--split", "validation",
                           "--beam", "2", "--batch", "4", "--wait",
                           "--until-step", "1000", "--poll-seconds", "600"],
                          env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300      # the saved steps evaluated, then it sleeps until step 1000 appears
  while (time.time() < deadline and proc.poll() is None and
         len(list((run / "eval").glob("*/metrics_*"))) < len(saved_steps(run))):
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()[1][-2000:]
  time.sleep(1)
  t = time.time()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == PREEMPTED_EXIT_CODE and time.time() - t < 30, err[-2000:]
  assert "the eval job stopped" in err
