"""Run a script as a Hub user without rapid_hf would: no rapid_hf importable, no token, no network.

Shared by the remote-code tests (`test_hub.py`, `test_remote_families.py`): each writes its checks as a script
body, `run_as_remote_user` prepends `PREAMBLE`, runs it in a fresh interpreter and returns the JSON report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

PREAMBLE = r'''
import json, sys
sys.modules["rapid_hf"] = None  # a user without rapid_hf: importing it, even from remote code, fails
spec = json.load(open(sys.argv[1]))
report = {}
try:
    import rapid_hf  # noqa: F401
    report["rapid_hf_importable"] = True
except ImportError:
    report["rapid_hf_importable"] = False
'''


def hub_env(root: Path) -> dict[str, str]:
    """Environment of a user with no token, no rapid_hf on the path and no network."""
    drop = {"PYTHONPATH", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH"}
    env = {key: value for key, value in os.environ.items() if key not in drop}
    env.update(HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return env


def run_as_remote_user(root: Path, body: str, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Run `PREAMBLE + body` on `{"cases": cases, "report": ...}` in a fresh process; its `report` dict, as JSON."""
    spec = root / "spec.json"
    spec.write_text(json.dumps({"cases": cases, "report": str(root / "report.json")}), encoding="utf-8")
    (root / "load_remote.py").write_text(PREAMBLE + body)
    completed = subprocess.run([sys.executable, str(root / "load_remote.py"), str(spec)], env=hub_env(root),
                               cwd=root, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads((root / "report.json").read_text())
