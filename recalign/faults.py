"""What training and eval jobs do when the VM, the disk or the numbers fail (README: Reliability).

- Preemption (spot / preemptible VMs get SIGTERM and ~30 s): `PreemptionWatcher` turns SIGTERM and
  SIGINT into a checkpoint at the next step boundary -- on several hosts the step jax's preemption
  service agrees on (T5X's preemption sync point) -- and `Preempted` ends the process with
  PREEMPTED_EXIT_CODE; the same command started again resumes there.
- Two writers: `ModelDirLock` lets one training job at a time write a MODEL_DIR.
- Non-finite loss or gradients (`NonFiniteError`), damaged checkpoints (`CheckpointDamaged`) and
  failed saves (`CheckpointWriteError`: a full disk, an unwritable MODEL_DIR) are errors that say which
  step or folder and where the last good state is; `recalign` prints them as one line (exit status 2).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Optional

from recalign import paths

PREEMPTED_EXIT_CODE = 75   # sysexits' EX_TEMPFAIL: "try again later" -- start the same command to resume


class RunError(RuntimeError):
  """A fault that stops a run with a message a user can act on (the CLI prints it as one line)."""


class ModelDirBusy(RunError):
  pass


class NonFiniteError(RunError):
  pass


class CheckpointDamaged(RunError):
  pass


class CheckpointWriteError(RunError):
  pass


class Preempted(SystemExit):
  """Raised after the preemption checkpoint is saved; a SystemExit, so a script that trains (the demo,
  tools/) exits with PREEMPTED_EXIT_CODE without a traceback unless it catches it."""

  def __init__(self, message: str):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.message = message

  def __str__(self) -> str:
    return self.message


# --------------------------------------------------------------------------------------------
# Preemption


class PreemptionWatcher:
  """A context that records SIGTERM / SIGINT instead of dying, so the loop can save first.

  One process: its own handlers; `requested(step)` is true from the signal on. Several processes:
  jax's preemption service owns SIGTERM on every host and `requested(step)` is its sync point (the
  same step everywhere; SIGINT keeps its default there). `immediate=True` (the eval job, which has no
  state to save) raises `Preempted` from the handler itself. A second Ctrl-C interrupts at once.
  """

  def __init__(self, what: str = "training", immediate: bool = False):
    self.what, self.immediate = what, immediate
    self.signum: Optional[int] = None
    self._previous: dict[int, object] = {}

  def __enter__(self) -> "PreemptionWatcher":
    import jax
    self.multihost = jax.process_count() > 1
    if threading.current_thread() is threading.main_thread() and not self.multihost:
      for s in (signal.SIGTERM, signal.SIGINT):
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handle(self, signum: int, frame) -> None:
    if self.signum is not None:
      raise KeyboardInterrupt   # asked twice (a hung step, an impatient user): stop now, unsaved
    self.signum = signum
    name = signal.Signals(signum).name
    if self.immediate:
      raise Preempted(f"{name}: {self.what} stopped; start the same command again to go on")
    print(f"\n{name}: saving a checkpoint at the end of this step, then stopping (again to stop now)",
          file=sys.stderr, flush=True)

  def requested(self, step: int) -> bool:
    if self.multihost:
      from jax.experimental import multihost_utils
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:   # preemption service switched off (jax_enable_preemption_service)
        return False
    return self.signum is not None


# --------------------------------------------------------------------------------------------
# One writer per MODEL_DIR


_HELD: dict[str, "ModelDirLock"] = {}   # re-entrant within a process (the CLI, then train())


class ModelDirLock:
  """One training job writes a MODEL_DIR; a second one is refused with the holder's host and pid.

  Local: an flock on MODEL_DIR/train.lock, which the kernel releases when the holder dies (kill -9, a
  crash), so nothing is left stuck. Remote (gs://, no locks there): a lease file the holder rewrites
  every `heartbeat_s` from a thread; one not rewritten for `stale_s` belongs to a dead job and is taken
  over (best effort: two jobs started within the same second can both get it). Readers (the eval job)
  take no lock. Creating the lock file is also the first write to MODEL_DIR: an unwritable one fails here,
  before any training.
  """

  def __init__(self, model_dir: paths.PathLike, *, remote: Optional[bool] = None, heartbeat_s: float = 30.0,
               stale_s: float = 120.0):
    self.dir = paths.as_path(model_dir)
    self.path = self.dir / "train.lock"
    self.remote = paths.is_remote(model_dir) if remote is None else remote
    self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
    self.key = str(paths.resolve(model_dir))
    self.token = uuid.uuid4().hex
    self._fd: Optional[int] = None
    self._stop = threading.Event()
    self._depth = 0
    self._owner: "ModelDirLock" = self

  def _record(self) -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                       "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "heartbeat": time.time()})

  def _busy(self, holder: dict) -> ModelDirBusy:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} (since {holder.get('since', '?')})"
    return ModelDirBusy(f"{self.dir} is being written by another training job, {who}: stop it first, or give "
                        "this run another MODEL_DIR (an eval job may read it meanwhile)")

  def _read_holder(self) -> dict:
    try:
      return json.loads(self.path.read_text() or "{}")
    except (OSError, ValueError):
      return {}

  def acquire(self) -> "ModelDirLock":
    self._owner = _HELD.get(self.key, self)
    if self._owner is not self:
      self._owner._depth += 1
      return self
    try:
      self.dir.mkdir(parents=True, exist_ok=True)
      self._acquire_remote() if self.remote else self._acquire_local()
    except OSError as e:
      raise CheckpointWriteError(f"MODEL_DIR {self.dir} is not writable ({e.strerror or e}): nothing was "
                                 "trained; give a folder this job can write") from e
    self._depth = 1
    _HELD[self.key] = self
    return self

  def _acquire_local(self) -> None:
    import fcntl
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise self._busy(self._read_holder()) from None
    os.ftruncate(fd, 0)
    os.write(fd, self._record().encode())
    os.fsync(fd)
    self._fd = fd

  def _acquire_remote(self) -> None:
    holder = self._read_holder() if self.path.exists() else {}
    if holder and time.time() - holder.get("heartbeat", 0) < self.stale_s:
      raise self._busy(holder)
    self.path.write_text(self._record())
    if self._read_holder().get("token") != self.token:   # another job wrote its lease at the same time
      raise self._busy(self._read_holder())
    threading.Thread(target=self._heartbeat, daemon=True, name="recalign-lease").start()

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        self.path.write_text(self._record())
      except OSError as e:   # a transient storage error: the next beat tries again
        logging.warning("could not renew %s: %s", self.path, e)

  def release(self) -> None:
    if self._owner is not self:
      return self._owner.release()
    self._depth -= 1
    if self._depth > 0:
      return
    _HELD.pop(self.key, None)
    if self._fd is not None:
      os.close(self._fd)     # closing drops the flock
      self._fd = None
    if self.remote:
      self._stop.set()
      with contextlib.suppress(OSError):
        if self._read_holder().get("token") == self.token:
          self.path.unlink()

  def __enter__(self) -> "ModelDirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
