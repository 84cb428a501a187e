"""Cost follows the job, not the input (issue 11): peak host memory of the amplification inputs, measured.

Each input of the issue runs as a validate_only job through `JobService.run` (fetch, header checks and the
shared input checks: the same decoding the job's generation does) in a child process, which reports its
peak RSS increase (tools/input_memory.py). Before the bounds these cost 350 MiB to 3.2 GiB.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.input_memory import amplification_cases, measure, write_inputs

BOUND_MIB = 64.0  # every case; they measure 0-4 MiB here (docs/api.md "Cost")
EXPECTED = {
    "5 s wav, cap 0.2 s": "ok",
    "10 min mp3, cap 0.2 s": "ok",
    "180 s 96 kHz 5.1 FLAC, no declared length, cap 0.2 s": "ok",
    "180 s 96 kHz 5.1 FLAC, no declared length, uncapped": "DURATION_TOO_LONG",
    "WAV declaring 1 Hz": "INVALID_INPUT",
    "12000x12000 PNG": "INVALID_INPUT",
}


@pytest.fixture(scope="module")
def peaks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    folder: Path = tmp_path_factory.mktemp("amplification")
    write_inputs(folder)
    return {row["name"]: row for row in measure(folder, amplification_cases())}


def test_amplification_inputs_stay_cheap(peaks: dict[str, dict[str, object]]) -> None:
    assert {name: row["result"] for name, row in peaks.items()} == EXPECTED
    for name, row in peaks.items():
        assert float(row["peak_mib"]) < BOUND_MIB, (name, row)  # type: ignore[arg-type]


def test_a_capped_job_costs_the_same_whatever_the_input_length(peaks: dict[str, dict[str, object]]) -> None:
    """The 10-minute mp3 capped at 0.2 s decodes only the clip's few seconds, as a 5 s file does."""
    long = float(peaks["10 min mp3, cap 0.2 s"]["peak_mib"])  # type: ignore[arg-type]
    short = float(peaks["5 s wav, cap 0.2 s"]["peak_mib"])  # type: ignore[arg-type]
    assert long < short + 16.0, (long, short)
