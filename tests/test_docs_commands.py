"""The README's and docs' commands on the built-in tiny model run as written.

Every shell command in README.md, docs/*.md and examples/README.md that uses the tiny model
(`--weights tiny` or `MULTITALK_WEIGHTS=tiny`; fenced bash blocks, indented blocks and inline code) runs in a
folder laid out like the checkout (examples/ there), with the virtual environment the tests run in as `.venv`
and on PATH (the docs' bare `multitalk-worker` assumes an activated one). Each must exit 0 and write the video
it names. Commands that start a server run until stopped: they are listed in SERVERS and not run here
(tests/test_server.py, tests/test_compose.py and tests/test_web.py start the server on the tiny model).
Commands with real weights or a GPU are not selected.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "examples" / "README.md"]
TINY = re.compile(r"--weights tiny|MULTITALK_WEIGHTS=tiny")
# Long-running servers: not run here (named reason above).
SERVERS = ("multitalk_worker.local_api",)


def shell_commands(text: str) -> list[str]:
    """Commands in fenced bash blocks, 4-space indented blocks and inline code, continuation lines joined,
    comment lines and trailing comments dropped."""
    blocks = re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    blocks += [
        "\n".join(line[4:] for line in b.splitlines()) for b in re.findall(r"(?:^ {4}.*\n)+", text, re.M)
    ]
    commands = []
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    prose = re.sub(r"\n\s*", " ", re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL))
    inline = re.findall(r"(?<!`)`([^`]+)`(?!`)", prose)
    return commands + [c for c in inline if TINY.search(c) and " " in c and not c.startswith("--")]


def tiny_commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for command in shell_commands(doc.read_text()):
            if TINY.search(command):
                found.append((doc.relative_to(REPO).as_posix(), command))
    return found


def outputs(command: str) -> list[str]:
    words = shlex.split(command)
    named = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--out"]
    if "--test_input" in command and "tiny_job.json" in command:
        named.append("out/tiny.mp4")  # examples/tiny_job.json's volume delivery
    if "handler.py" in command and "--test_input" not in command:
        named.append("out/test_input.mp4")  # test_input.json's
    return named


def test_the_docs_tiny_commands_are_found() -> None:
    """The extraction finds the commands this test is about (a change of layout must not silence it)."""
    commands = [c for _, c in tiny_commands()]
    assert any("--video examples/source.mp4" in c for c in commands), "the README's dubbing command"
    assert any("--test_input" in c for c in commands), "docs/deploy.md's local worker run"
    assert sum(c.startswith(".venv/bin/multitalk-worker generate") for c in commands) >= 3
    assert all(outputs(c) or any(s in c for s in SERVERS) for c in commands), "a command that writes nothing"


def run_as_written(command: str, folder: Path) -> subprocess.CompletedProcess[str]:
    bin_dir = Path(sys.executable).parent
    # one thread each: two commands run side by side on two cores (two threads each made the tiny LongCat
    # VAE's 93-frame decodes many times slower, test_longcat_pipeline's one_thread says by how much)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )


def test_the_docs_tiny_commands_run_as_written(tmp_path: Path) -> None:
    # copies, not links: the worker refuses a path input that resolves outside MULTITALK_VOLUME_ROOT
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    for name in ("handler.py", "test_input.json"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))  # the environment the tests run in
    (tmp_path / "out").mkdir()  # scripts/demo.sh, the README's first command, makes it
    runnable = [(doc, c) for doc, c in tiny_commands() if not any(s in c for s in SERVERS)]
    assert runnable
    with ThreadPoolExecutor(max_workers=2) as pool:  # two cores: the CLI's imports dominate each run
        results = list(pool.map(lambda item: run_as_written(item[1], tmp_path), runnable))
    failures = []
    for (doc, command), result in zip(runnable, results, strict=True):
        if result.returncode != 0:
            failures.append(f"{doc}: {command}\n  exit {result.returncode}: {result.stderr.strip()[-600:]}")
            continue
        for name in outputs(command):
            path = Path(name) if name.startswith("/") else tmp_path / name
            if not path.is_file() or path.stat().st_size == 0:
                failures.append(f"{doc}: {command}\n  wrote no {name}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_the_docs_name_no_missing_example_file(doc: Path) -> None:
    """Every examples/... path a doc names exists (the README's dubbing command once named source.mp4)."""
    text = doc.read_text()
    missing = sorted({m for m in re.findall(r"examples/[\w./-]*\w", text) if not (REPO / m).exists()})
    assert missing == []
