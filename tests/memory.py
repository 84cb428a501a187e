"""Peak resident memory of a script run in a fresh Python process (Linux), for the flat-memory tests.

The script calls `peak_kb()`: the process's own high-water mark (VmHWM). `resource.ru_maxrss` would not do:
Linux carries it across fork and exec, so a child of a large pytest process reports at least the parent's RSS.
"""

from __future__ import annotations

import subprocess
import sys

PEAK_KB = """
from pathlib import Path as _Path


def peak_kb() -> int:
    return int(_Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0])
"""


def run_for_peaks(script: str, *args: str) -> list[int]:
    """Run `script` (which prints integers from `peak_kb()` on its last line) and return those integers."""
    done = subprocess.run(
        [sys.executable, "-c", PEAK_KB + script, *args], capture_output=True, text=True, check=True
    )
    return [int(value) for value in done.stdout.strip().splitlines()[-1].split()]
