"""Ending a torchrun process: the exit status of a SystemExit, and end_process (flushed output, no
interpreter finalization)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from multitalk_worker.distributed import exit_status

ENDS_WITH_3 = """
import atexit, logging, sys
from multitalk_worker.distributed import end_process
logging.basicConfig(stream=sys.stderr, format="%(message)s")
atexit.register(lambda: print("finalized", file=sys.stderr))
logging.getLogger("test").warning("logged")
sys.stdout.write("printed")  # no newline: stays in the buffer of a piped stdout
end_process(3)
"""


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (1, 1), (7, 7), ("bad setting", 1)])
def test_exit_status_reads_a_system_exit_as_the_interpreter_does(
    code: object, status: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_status(SystemExit(code)) == status
    assert capsys.readouterr().err == ("bad setting\n" if isinstance(code, str) else "")


def test_end_process_flushes_output_and_skips_finalization() -> None:
    done = subprocess.run(
        [sys.executable, "-c", ENDS_WITH_3], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout == "printed"
    assert done.stderr == "logged\n"  # the atexit handler never ran: no interpreter finalization
