"""The documentation's examples, run as written against a live server so they cannot rot.

Blocks marked `<!-- doc-test -->` in the README, ML_FEATURES.md and DEPLOYMENT.md run in order:
bash blocks as one script per document (variables carry over), with every curl call's HTTP
status collected; python blocks each as a script. Every call must succeed (2xx)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
DOCUMENTED_URL = "http://127.0.0.1:5000"
MARKED_BLOCK = re.compile(r"<!-- doc-test -->\s*\n```(bash|python)\n(.*?)```", re.S)
CURL_WITH_STATUS = "curl() { command curl -w '%{stderr}__STATUS__ %{http_code} %{url_effective}\\n' \"$@\"; }\n"


def marked_blocks(document: str, language: str) -> list[str]:
    text = (ROOT / document).read_text()
    return [body for lang, body in MARKED_BLOCK.findall(text) if lang == language]


def run_environment(server, state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUADRA_")}
    env.update({"QUADRA_STATE_DIR": str(state_dir), "QUADRA_API_KEY": server.admin_key})
    return env


@pytest.mark.parametrize("document", ["README.md", "ML_FEATURES.md", "DEPLOYMENT.md"])
def test_documented_commands_work(start_server, state_dir: Path, document: str) -> None:
    blocks = marked_blocks(document, "bash")
    if not blocks:
        pytest.skip(f"{document} has no runnable shell examples")
    server = start_server(state_dir)
    script = "set -euo pipefail\n" + CURL_WITH_STATUS + "\n".join(blocks).replace(DOCUMENTED_URL, server.url)
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, env=run_environment(server, state_dir),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{document} examples failed:\n{result.stdout}\n{result.stderr}"
    statuses = [line.split()[1:] for line in result.stderr.splitlines() if line.startswith("__STATUS__")]
    failed = [(code, url) for code, url in statuses if not code.startswith("2")]
    assert statuses and not failed, f"{document}: calls that did not succeed: {failed}\n{result.stdout[-3000:]}"
    assert "Traceback" not in result.stdout + result.stderr


def test_documented_python_snippets_work(start_server, state_dir: Path, tmp_path: Path) -> None:
    """Each snippet runs as a script in a folder of its own whose ./dashboard_state is the
    running service's state folder (as in a project folder), with the project importable."""
    server = start_server(state_dir)
    snippets = marked_blocks("ML_FEATURES.md", "python")
    assert snippets
    env = {**run_environment(server, state_dir), "PYTHONPATH": str(ROOT)}
    for index, snippet in enumerate(snippets):
        folder = tmp_path / f"snippet-{index}"
        folder.mkdir()
        (folder / "dashboard_state").symlink_to(state_dir, target_is_directory=True)
        result = subprocess.run([sys.executable, "-c", snippet], cwd=folder, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"snippet failed:\n{snippet}\n{result.stderr}"
