"""Ray is optional: without it neuronserve imports, the in-process pieces work, and the Ray
features fail with the extra to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HIDE_RAY = """
import sys
class HideRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError("No module named 'ray'")
sys.meta_path.insert(0, HideRay())
"""


def run(code: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", HIDE_RAY + code, *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_imports_and_clear_errors_without_ray(tmp_path):
    code = """
import neuronserve, neuronserve.cli
from neuronserve.distributed import INSTALL_HINT, ray_available, require_ray
from neuronserve.distributed import asgi, autoscale, batch, routing, spec
assert not ray_available()
try:
    require_ray()
except ModuleNotFoundError as exc:
    assert "pip install -e '.[distributed]'" in str(exc)
else:
    raise AssertionError("require_ray passed without Ray")
from neuronserve.cli import main
sys.exit(main(sys.argv[1:]))
"""
    out = run(code, "serve", "--replicas", "2")
    assert out.returncode == 2, out.stderr
    assert "pip install -e '.[distributed]'" in out.stderr
    src = tmp_path / "in.jsonl"
    src.write_text('{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x"}}\n')
    out = run(code, "run-batch", "-i", str(src), "-o", str(tmp_path / "o.jsonl"), "--executor", "ray")
    assert out.returncode == 2 and "distributed" in out.stderr, out.stderr
