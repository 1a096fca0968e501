"""What a user sees on the console: recalign's own lines, not the start-up noise of the libraries under it.

TensorFlow and XLA write their start-up lines from C++ straight to file descriptor 2 ("oneDNN custom
operations are on", "Could not find cuda drivers", "failed call to cuInit", the absl::InitializeLog
banner), whatever TF_CPP_MIN_LOG_LEVEL says; seqio and orbax log routine warnings through absl ("not
cached so using number of input examples", "Metadata file does not exist"). `quiet_startup()` imports
both libraries and starts JAX's backends with descriptor 2 captured, re-prints every captured line that
is not known noise (so a real start-up error still shows), and filters the two absl warnings.
RECALIGN_VERBOSE=1 leaves everything as it is.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

NOISE = ("All log messages before absl::InitializeLog", "oneDNN custom operations are on",
         "Could not find cuda drivers", "failed call to cuInit", "cpu_feature_guard.cc",
         "rebuild TensorFlow with the appropriate compiler flags", "TensorFlow binary is optimized",
         "AVX2 AVX512F", "Unable to register cuDNN", "Unable to register cuBLAS", "Unable to register cuFFT",
         "computation placer already registered", "TF-TRT Warning")
LOG_NOISE = ("not cached so using number of input examples", "Metadata file does not exist")


class _LogNoise(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not any(n in record.getMessage() for n in LOG_NOISE)


def is_noise(line: str) -> bool:
  return any(n in line for n in NOISE)


def quiet_startup(start_jax: bool = True) -> None:
  """Imports TensorFlow (and JAX, starting its backends), keeping their known start-up lines off stderr."""
  if os.environ.get("RECALIGN_VERBOSE"):
    return
  logging.getLogger("absl").addFilter(_LogNoise())
  sys.stderr.flush()
  with tempfile.TemporaryFile() as captured:
    saved = os.dup(2)
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow as tf
      if start_jax:
        import jax
        jax.devices()
      tf.constant(0)      # TensorFlow looks for GPUs (and says so) at its first op
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = [x for x in captured.read().decode(errors="replace").splitlines() if x.strip() and not is_noise(x)]
  for line in kept:
    print(line, file=sys.stderr)
