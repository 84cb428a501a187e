"""Log lines of the worker carry their level and logger name although the runpod SDK, imported first,
has installed a root handler of its own (a plain basicConfig would then do nothing)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = """
import logging
import runpod  # installs its root handler (runpod/serverless/utils/rp_upload.py)
from multitalk_worker.logs import configure_logging
configure_logging("INFO")
logging.getLogger("multitalk_worker.worker").info("hello from the worker")
logging.getLogger("transformers.modeling_utils").warning("a load report")
"""


def test_worker_log_lines_carry_level_and_logger_name() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "hello from the worker" in line]
    assert len(lines) == 1 and lines[0].endswith("INFO multitalk_worker.worker: hello from the worker"), lines
    assert "a load report" not in done.stderr  # transformers' reports are quiet unless DEBUG
