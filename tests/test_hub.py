"""The image and the Hub listing, checked without a Docker engine: the Dockerfile's declared CUDA line against
the CUDA lock and .runpod/*.json, the build context against what the Dockerfile copies, hub.json's typed
inputs and presets against the worker's settings, the revision script on real git folders, the root handler.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from multitalk_worker.config import ENV_VARS, Settings
from multitalk_worker.startup import locked_versions
from tests.conftest import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
HUB = json.loads((REPO / ".runpod" / "hub.json").read_text())
HUB_TESTS = json.loads((REPO / ".runpod" / "tests.json").read_text())
SETTINGS = {var.name: var for var in ENV_VARS}


def torch_cuda_line() -> str:
    match = re.search(r"^ARG TORCH_CUDA=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert match, "the Dockerfile declares no TORCH_CUDA"
    return match.group(1)


def test_the_declared_cuda_line_is_the_locked_one_and_the_hubs() -> None:
    line = torch_cuda_line()
    cuda = locked_versions(REPO / "requirements-cuda.lock")
    assert cuda["nvidia-cuda-runtime"].startswith(line + "."), "CUDA runtime wheel of another line"
    assert cuda["cuda-toolkit"].startswith(line + ".")
    assert HUB["config"]["allowedCudaVersions"] == [line]
    assert HUB_TESTS["config"]["allowedCudaVersions"] == [line]
    assert "torch.version.cuda == sys.argv[1]" in DOCKERFILE and '"${TORCH_CUDA}"' in DOCKERFILE


def test_the_image_installs_the_runtime_and_cuda_locks_only_and_stays_offline() -> None:
    assert "install_locked.sh python requirements.lock requirements-cuda.lock" in DOCKERFILE
    assert "pip install --no-cache-dir --no-deps --require-hashes -r requirements-gpu.lock" in DOCKERFILE
    assert "requirements-dev.lock" not in DOCKERFILE
    assert re.search(r"^\s+HF_HUB_OFFLINE=1 \\$", DOCKERFILE, re.MULTILINE)
    assert "--build-arg" not in re.sub(r"^#.*$", "", DOCKERFILE, flags=re.MULTILINE)
    assert re.search(r'^ARG GIT_REVISION=""$', DOCKERFILE, re.MULTILINE), "the build must need no argument"


def test_the_build_context_holds_every_file_the_dockerfile_copies() -> None:
    """.dockerignore excludes everything but a list; each COPY source (other than the optional .git globs)
    must be on it, or the build fails where it cannot be tried here."""
    allowed = [
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    sources = []
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY "):
            words = line.split()[1:-1]
            sources += [word for word in words if not word.startswith(("--", ".gi[t]"))]
    assert sources, "no COPY found"
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file"
        assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} not in the context"
    assert "requirements-dev.lock" not in allowed and "tests" not in allowed


def test_hub_inputs_are_typed_like_the_settings() -> None:
    for entry in HUB["config"]["env"]:
        var, field = SETTINGS[entry["key"]], entry["input"]
        if var.kind == "bool":
            assert field["type"] == "boolean", entry["key"]
            assert (field["trueValue"], field["falseValue"]) == ("true", "false")
            assert field["default"] is (var.default == "true")
        elif var.kind == "choice":
            assert [option["value"] for option in field["options"]] == list(var.choices), entry["key"]
            assert field["default"] == var.default
        elif var.kind in ("int", "float") and var.default is not None:
            assert field["type"] == "number", entry["key"]
            assert field["default"] == float(var.default)
        else:
            assert field["type"] == "string", entry["key"]
            assert field["default"] == (var.default or ""), entry["key"]


def hub_defaults() -> dict[str, str]:
    """The environment a Hub deployment gets with no preset: each input's default as its env text."""
    out = {}
    for entry in HUB["config"]["env"]:
        field = entry["input"]
        value = field["default"]
        if field["type"] == "boolean":
            value = field["trueValue"] if value else field["falseValue"]
        out[entry["key"]] = str(value)
    return out


def test_hub_presets_are_valid_settings() -> None:
    """Each preset sets declared inputs only, to values the worker's settings accept; one preset per mode."""
    keys = {entry["key"] for entry in HUB["config"]["env"]}
    modes = set()
    for preset in HUB["config"]["presets"]:
        assert set(preset["defaults"]) <= keys, preset["name"]
        env = hub_defaults()
        for key, value in preset["defaults"].items():
            env[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
        settings = Settings.from_env(env)
        modes.add((settings.engine, settings.offload))
        if settings.offload:
            # the check must pass on a 24 GB card, which reports a little under 24 GiB; the measured
            # offload peak at 720p is 16.4 GiB (bench/RESULTS.md run H5)
            assert settings.min_gpu_memory_gib is not None and 16.4 < settings.min_gpu_memory_gib < 23
    assert modes == {("fast", False), ("reference", False), ("fast", True)}


def test_hub_gpu_pools_are_the_80_gb_class() -> None:
    """The default deployment keeps every network resident: 53-58.5 GiB measured at 480p, 69.7 GiB at 720p."""
    assert set(HUB["config"]["gpuIds"].split(",")) == {"ADA_80_PRO", "AMPERE_80", "HOPPER_141"}


def run_revision(folder: Path, given: str = "") -> str:
    out = subprocess.run(
        ["sh", str(REPO / "scripts" / "image_revision.sh"), str(folder), given],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env |= {"GIT_COMMITTER_EMAIL": "t@t", "HOME": str(repo), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_image_revision_from_a_git_folder(tmp_path: Path) -> None:
    """GIT_REVISION wins; else HEAD's commit through a loose ref, packed-refs, a detached HEAD or the
    Dockerfile's flattened copy of .git/refs; else unknown."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "f").write_text("x")
    git(repo, "add", "f")
    git(repo, "commit", "-q", "-m", "one")
    head = git(repo, "rev-parse", "HEAD")
    assert run_revision(repo / ".git") == head  # loose ref
    assert run_revision(repo / ".git", "v1.2.3-abc") == "v1.2.3-abc"
    flat = tmp_path / "flat"  # COPY .git/HEAD .git/packed-refs .git/refs /tmp/revision/
    shutil.copytree(repo / ".git" / "refs", flat)
    shutil.copy(repo / ".git" / "HEAD", flat / "HEAD")
    assert run_revision(flat) == head
    git(repo, "pack-refs", "--all")
    assert not (repo / ".git" / "refs" / "heads" / "main").exists()
    assert run_revision(repo / ".git") == head  # packed-refs
    git(repo, "checkout", "-q", "--detach")
    assert run_revision(repo / ".git") == head  # a release checkout
    assert run_revision(tmp_path / "no-git") == "unknown"
    (flat / "HEAD").write_text("ref: refs/heads/gone\n")
    assert run_revision(flat) == "unknown"


def test_the_root_handler_starts_the_worker() -> None:
    import handler
    from multitalk_worker import worker

    assert handler.main is worker.main
