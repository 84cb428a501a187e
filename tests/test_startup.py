"""Startup checks: imports, locked versions, media round trip, weights, GPU; the build check; the runpod
fitness checks stopping a worker whose weights are missing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from multitalk_worker.config import Settings
from multitalk_worker.service.resident import PipelineHolder
from multitalk_worker.startup import (
    check_fp8,
    check_gpu,
    check_imports,
    check_media,
    check_versions,
    check_weights,
    gpu_memory_needed_gib,
    health_report,
    locked_versions,
    worker_version,
)
from tests.conftest import REPO


def test_imports() -> None:
    result = check_imports()
    assert result.ok, result.detail
    assert "package modules" in result.detail


def test_versions_match_the_lock() -> None:
    result = check_versions(REPO / "requirements.lock")
    assert result.ok, result.detail
    assert "numpy" in result.detail and "torch" in result.detail


def test_versions_mismatch_and_missing_lock(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    text = (REPO / "requirements.lock").read_text()
    lock.write_text(
        "\n".join("numpy==0.0.1" if line.startswith("numpy==") else line for line in text.splitlines())
    )
    result = check_versions(lock)
    assert not result.ok and "numpy" in result.detail and "0.0.1 locked" in result.detail
    missing = check_versions(tmp_path / "none.lock")
    assert not missing.ok and "MULTITALK_LOCK_FILE" in missing.detail


def test_locked_versions_parsing(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.write_text("# comment\nNumpy==2.4.6\nsome_pkg==1.0 ; python_version>'3'\n\nflag-only\n")
    assert locked_versions(lock) == {"numpy": "2.4.6", "some-pkg": "1.0"}


def test_media_round_trip() -> None:
    result = check_media()
    assert result.ok, result.detail


def test_weights_and_gpu(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    assert check_weights(make_settings(), full=True).ok
    missing = check_weights(make_settings(MULTITALK_WEIGHTS=str(tmp_path / "none")), full=True)
    assert not missing.ok and "does not exist" in missing.detail
    empty = tmp_path / "empty"
    empty.mkdir()
    incomplete = check_weights(make_settings(MULTITALK_WEIGHTS=str(empty)), full=True)
    assert not incomplete.ok and "problem" in incomplete.detail
    assert check_gpu(make_settings()).ok  # tiny model on the CPU
    assert not check_gpu(make_settings(MULTITALK_WEIGHTS=str(empty))).ok  # the real model needs a GPU


def test_gpu_memory_asked_for_each_mode(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    real = {"MULTITALK_WEIGHTS": str(tmp_path / "weights")}
    assert gpu_memory_needed_gib(make_settings(**real)) == 72.0  # 720p (the default), every network resident
    assert gpu_memory_needed_gib(make_settings(**real, MULTITALK_MAX_RESOLUTION="480p")) == 60.0
    for resolution, peak in (("480p", 11.3), ("720p", 16.4)):  # low-memory mode's measured peaks
        offload = make_settings(**real, MULTITALK_OFFLOAD="true", MULTITALK_MAX_RESOLUTION=resolution)
        assert peak < gpu_memory_needed_gib(offload) < 23.6  # an RTX 4090 reports 23.6-24.0 GiB
    assert gpu_memory_needed_gib(make_settings(**real, MULTITALK_MIN_GPU_MEMORY_GIB="12.5")) == 12.5
    assert gpu_memory_needed_gib(make_settings()) == 0.0  # the tiny model


def test_revision_file(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    assert worker_version(make_settings())["revision"] == "unknown"
    (tmp_path / "REVISION").write_text("abc123\n")
    assert worker_version(make_settings()) == {"version": "0.1.0", "revision": "abc123", "schema": "1"}


def test_build_check_command() -> None:
    env = {**os.environ, "MULTITALK_LOCK_FILE": str(REPO / "requirements.lock")}
    out = subprocess.run(
        [sys.executable, "-m", "multitalk_worker.startup", "--build"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [c["name"] for c in report["checks"]] == ["imports", "versions", "media"]


def runpod_start(tmp_path: Path, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m multitalk_worker.worker` as RunPod starts it (RUNPOD_WEBHOOK_GET_JOB set: the fitness
    checks run before any job), with `env` on top; the queue it would poll does not answer."""
    environ = {
        **os.environ,
        "MULTITALK_LOCK_FILE": str(REPO / "requirements.lock"),
        "RUNPOD_WEBHOOK_GET_JOB": "http://127.0.0.1:9/job-take/$ID",
        "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
        "RUNPOD_SKIP_GPU_CHECK": "true",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "multitalk_worker.worker"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )


def test_missing_weights_stop_the_runpod_worker(tmp_path: Path) -> None:
    """Missing weights end the process with status 1 and name the problem."""
    out = runpod_start(tmp_path, 180, MULTITALK_WEIGHTS=str(tmp_path / "no-weights"))
    assert out.returncode == 1
    assert "check_weights" in out.stdout + out.stderr and "does not exist" in out.stdout + out.stderr


def test_fp8_is_checked_at_start_only_when_asked(make_settings: Callable[..., Settings]) -> None:
    """MULTITALK_FP8=true on a machine that cannot run the tier (here: no CUDA device, and torchao absent
    outside the image) fails its check with one line naming each missing piece; without fp8 there is no
    such check."""
    settings = make_settings(MULTITALK_FP8="true")
    result = check_fp8(settings)
    assert not result.ok and "\n" not in result.detail
    assert "no CUDA device" in result.detail and "unset MULTITALK_FP8" in result.detail
    torchao = importlib.util.find_spec("torchao") is not None
    assert ("torchao is not installed" in result.detail) is not torchao
    assert "fp8" not in {
        c["name"] for c in health_report(make_settings(), PipelineHolder(make_settings()))["checks"]
    }
    assert "fp8" in {c["name"] for c in health_report(settings, PipelineHolder(settings))["checks"]}


def test_fp8_that_cannot_run_stops_the_runpod_worker(tmp_path: Path) -> None:
    """A worker asked for fp8 without a Hopper GPU ends with status 1 and the check's line."""
    out = runpod_start(tmp_path, 300, MULTITALK_WEIGHTS="tiny", MULTITALK_DEVICE="cpu", MULTITALK_FP8="true")
    assert out.returncode == 1
    lines = [line for line in (out.stdout + out.stderr).splitlines() if "MULTITALK_FP8=true needs" in line]
    assert lines and "check_fp8" in out.stdout + out.stderr
