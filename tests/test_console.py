"""The console shows recalign's lines, not the libraries' start-up noise -- and still shows real errors."""

import os
import subprocess
import sys

from conftest import REPO, write_tiny_tsv


def test_cli_start_up_keeps_library_noise_off_stderr_but_not_real_lines(tmp_path):
  script = ("import os, sys\n"
            "from recalign.console import quiet_startup\n"
            "import ctypes\n"
            "quiet_startup()\n"
            "import jax.numpy as jnp, tensorflow as tf\n"
            "print('sum', float(jnp.ones(3).sum()), int(tf.constant(2)))\n")
  env = {k: v for k, v in os.environ.items() if k not in ("RECALIGN_VERBOSE", "TF_CPP_MIN_LOG_LEVEL")}
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert out.returncode == 0 and "sum 3.0 2" in out.stdout
  for noise in ("oneDNN custom operations", "Could not find cuda drivers", "cuInit", "absl::InitializeLog"):
    assert noise not in out.stderr, out.stderr
  loud = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300,
                        env={**env, "RECALIGN_VERBOSE": "1"})
  assert "oneDNN custom operations" in loud.stderr     # the noise is real, and only hidden when asked


def test_captured_lines_that_are_not_noise_are_printed_again(capfd, monkeypatch):
  from recalign import console
  import jax
  monkeypatch.delenv("RECALIGN_VERBOSE", raising=False)
  line = b"oneDNN custom operations are on\nreal problem: disk full\n"
  monkeypatch.setattr(jax, "devices", lambda: os.write(2, line))
  console.quiet_startup()
  err = capfd.readouterr().err
  assert "real problem: disk full" in err and "oneDNN" not in err


def test_prepare_and_ids_commands_show_their_own_lines_only(tmp_path):
  """`recalign prepare` and `recalign ids` start TensorFlow (the TFDS copy) but not JAX: still no start-up noise."""
  env = {k: v for k, v in os.environ.items() if k not in ("RECALIGN_VERBOSE", "TF_CPP_MIN_LOG_LEVEL")}
  data = tmp_path / "tiny"
  for argv in (["prepare", "--source", str(write_tiny_tsv(tmp_path / "src")), "--out", str(data), "--kcore", "0"],
               ["ids", str(data), "--scheme", "collaborative", "--codebook", "2"]):
    out = subprocess.run([sys.executable, "-m", "recalign.cli", *argv], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and not any(n in out.stderr for n in ("oneDNN", "cuda drivers", "cpu_feature_guard",
                                                                       "absl::InitializeLog")), out.stderr
