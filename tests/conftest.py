"""Shared fixtures: loopback servers (S3, https), settings for tests, the committed example inputs, the CLI
in this process."""

from __future__ import annotations

import logging
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from multitalk_worker.config import Settings
from multitalk_worker.pipeline.request import GenerationResult
from tests.servers import HttpsServer, S3Server, start_https_server, start_s3_server

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@pytest.fixture(autouse=True)
def restore_root_logging() -> Iterator[None]:
    """The doors' configure_logging (called in-process by some tests) replaces the root handlers with one on
    the sys.stderr of that moment, pytest's capture, which is closed after the test. Left in place, a record
    logged later hits the closed stream: huggingface_hub closes its HTTP client at interpreter exit, and
    httpcore logs `close.started` and `close.complete` at DEBUG, printed as two "Logging error" tracebacks at
    the end of the suite. Each test's root handlers and level are put back after it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = start_s3_server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpsServer]:
    server = start_https_server(tmp_path_factory.mktemp("tls"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def capped_clip() -> GenerationResult:
    """tests/test_pipeline.py's `capped_request()` (one 25-frame clip, seed 7, 2 steps) on the resident tiny
    model, made once: test_pipeline (same seed, same video) and test_offload (the offloaded pipeline makes
    the same video) compare their runs with it."""
    from multitalk_worker.pipeline.pipeline import TalkingVideoPipeline
    from tests.test_pipeline import capped_request

    return TalkingVideoPipeline.from_pretrained("tiny", device="cpu")(capped_request())


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    """A fresh volume root holding copies of the example inputs."""
    root = tmp_path / "volume"
    (root / "inputs").mkdir(parents=True)
    for name in ("person.png", "two_people.png", "speech_a.wav", "speech_b.wav"):
        (root / "inputs" / name).write_bytes((EXAMPLES / name).read_bytes())
    return root


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """torch on one thread for a module: the tiny models' convolutions (the LongCat VAE's 93-frame decodes)
    only pay the threads' synchronisation on a shared 2-core machine (7.7 s against 93 s, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_env(work: Path, volume: Path, **env: str) -> dict[str, str]:
    """The MULTITALK_ variables of a test worker: tiny model on the CPU, `volume` as the volume root,
    scratch and the revision file under `work`; `env` adds or overrides."""
    return {
        "MULTITALK_WEIGHTS": "tiny",
        "MULTITALK_DEVICE": "cpu",
        "MULTITALK_VOLUME_ROOT": str(volume),
        "MULTITALK_WORK_DIR": str(work),
        "MULTITALK_REVISION_FILE": str(work / "REVISION"),
        "MULTITALK_LOCK_FILE": str(REPO / "requirements.lock"),
        **env,
    }


def tiny_settings(work: Path, volume: Path, **env: str) -> Settings:
    """Settings for a test (tiny_env), loopback allowed (the test servers) with a short fetch timeout."""
    test = {"MULTITALK_ALLOW_LOOPBACK": "true", "MULTITALK_FETCH_TIMEOUT_S": "5"}
    return Settings.from_env(tiny_env(work, volume, **(test | env)))


@pytest.fixture
def make_settings(tmp_path: Path, volume: Path) -> Callable[..., Settings]:
    """tiny_settings for a test: the test volume, scratch under tmp_path."""
    work = tmp_path / "work"
    work.mkdir()

    def build(**env: str) -> Settings:
        return tiny_settings(work, volume, **{"MULTITALK_REVISION_FILE": str(tmp_path / "REVISION"), **env})

    return build


Cli = Callable[..., subprocess.CompletedProcess[str]]


# warnings a fresh interpreter's default filters do not print
HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


@pytest.fixture
def cli(capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> Cli:
    """cli(*args): the CLI's `main(args)` in this process, returned as tests/test_cli.py's `run_cli` returns
    a process (no interpreter start and imports: about 10 s a run on a loaded 2-core machine). Its stderr
    is what the process would print there: what reached file descriptor 2 (Python's and native libraries'
    writes), every log record at WARNING or above (the level of the CLI's stderr handler; under pytest the
    records go to caplog instead) and every warning a fresh interpreter would print."""

    from multitalk_worker.cli import main as cli_main  # its imports take seconds: only where used

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        capfd.readouterr()
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            status = cli_main([str(arg) for arg in args])
        captured = capfd.readouterr()
        logged = [
            f"{r.levelname} {r.name}: {r.getMessage()}"
            for r in caplog.records
            if r.levelno >= logging.WARNING
        ]
        warned = [
            f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}"
            for w in caught
            if not issubclass(w.category, HIDDEN_WARNINGS)
        ]
        stderr = "".join(f"{line}\n" for line in [*captured.err.splitlines(), *logged, *warned])
        return subprocess.CompletedProcess([str(arg) for arg in args], status, captured.out, stderr)

    return run
