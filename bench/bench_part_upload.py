"""The cost of showing the part so far with S3 delivery (issue #22): a three-clip job on the tiny model (two
speakers one after the other, 186 frames at 64x32, 2 steps) delivered to the tests' loopback S3 server
(moto, tests/servers.py), with MULTITALK_S3_PART off and on, twice, after one warm-up job (the first job
of a process pays for the imports and the load). Prints each part's remux + upload seconds (the publisher's
log, service/part.py), the job's `part_s` and `deliver_s`, and its wall time.

    PYTHONPATH=src:. python bench/bench_part_upload.py
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from multitalk_worker.service import JobService
from tests.conftest import EXAMPLES, tiny_settings
from tests.servers import start_s3_server

JOB = {
    "image": "inputs/two_people.png",
    "speakers": [{"audio": "inputs/speech_a.wav"}, {"audio": "inputs/speech_b.wav"}],
    "audio_mode": "sequential",
    "prompt": "two people talk",
    "resolution": "tiny",
    "advanced": {"steps": 2, "seed": 3},
    "output": {"delivery": "s3"},
}


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main() -> None:
    server = start_s3_server()
    lines = _Lines()
    publisher_log = logging.getLogger("multitalk_worker.service.part")
    publisher_log.addHandler(lines)
    publisher_log.setLevel(logging.INFO)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work, volume = Path(tmp) / "work", Path(tmp) / "volume"
            (volume / "inputs").mkdir(parents=True)
            work.mkdir()
            for name in ("two_people.png", "speech_a.wav", "speech_b.wav"):
                shutil.copy(EXAMPLES / name, volume / "inputs" / name)
            for part in ("warm-up", "false", "true", "false", "true"):
                lines.lines.clear()
                on = "false" if part == "warm-up" else part
                settings = tiny_settings(work, volume, MULTITALK_S3_PART=on, **server.env())
                start = time.monotonic()
                outcome = JobService(settings).run({"id": f"part-{on}", "input": JOB})
                wall = time.monotonic() - start
                if outcome.output is None:
                    sys.exit(f"job failed: {outcome.error}")
                timings = outcome.output["timings"]
                print(
                    f"MULTITALK_S3_PART={part}: {outcome.output['frames']} frames, "
                    f"{outcome.output['bytes']} bytes, part_s {timings.get('part_s', 0):.3f}, "
                    f"deliver_s {timings['deliver_s']:.3f}, wall {wall:.1f} s"
                )
                for line in lines.lines:
                    print("   ", line)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
