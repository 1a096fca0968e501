"""The README's Python snippet runs as written (from a scratch folder, data from ../shared)."""
import re
import subprocess
import sys

from conftest import REPO, SHARED, shared


def test_readme_registration_snippet_runs(tmp_path):
  shared("amazon-beauty")
  text = (REPO / "README.md").read_text()
  code = re.search(r"## Registering a data set.*?```python\n(.*?)```", text, re.S).group(1)
  code = code.replace("../shared/data/amazon-beauty", str(SHARED / "amazon-beauty"))
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  tokens = [int(t) for t in re.findall(r"\d+", out.stdout.strip().splitlines()[-1])]
  assert len(tokens) == 20 and all(0 <= t < 8200 for t in tokens)
  assert (tmp_path / "data" / "beauty" / "vocab" / "spm.model").exists()
