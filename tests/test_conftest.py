"""The suite's own hygiene: a test that reconfigures logging leaves no handler on a closed stream."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

# A test as the doors' tests are: huggingface_hub's client keeps a connection open (HTTP/1.1, loopback), then
# the root logger goes to DEBUG on the stderr of the moment (pytest's capture), as configure_logging does.
LATE_LOGGING_TEST = """
import http.server, logging, sys, threading

def test_late_logging() -> None:
    from huggingface_hub.utils._http import get_session

    http.server.SimpleHTTPRequestHandler.protocol_version = "HTTP/1.1"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    get_session().get(f"http://127.0.0.1:{server.server_address[1]}/", timeout=10)
    logging.basicConfig(level="DEBUG", stream=sys.stderr, force=True)
"""


def test_no_logging_error_at_exit_after_a_test_reconfigures_logging(tmp_path: Path) -> None:
    """huggingface_hub closes its client at interpreter exit and httpcore logs that at DEBUG: with the
    suite's fixtures (tests/conftest.py) the records find a working handler, so the run ends without
    "Logging error" tracebacks; without them (`-p no:` cannot unload a conftest, so run it bare) they appear,
    which shows the test can fail."""
    (tmp_path / "test_late.py").write_text(LATE_LOGGING_TEST)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_late.py")]
    bare = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    with_fixtures = subprocess.run(
        [*command, "-p", "tests.conftest"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert bare.returncode == 0 and "Logging error" in bare.stdout + bare.stderr
    assert with_fixtures.returncode == 0, with_fixtures.stdout + with_fixtures.stderr
    assert "Logging error" not in with_fixtures.stdout + with_fixtures.stderr
