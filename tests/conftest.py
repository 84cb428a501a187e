"""Shared fixtures: loopback servers (S3, https), settings for tests, the committed example inputs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from multitalk_worker.config import Settings
from tests.servers import HttpsServer, S3Server, start_https_server, start_s3_server

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


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


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    """A fresh volume root holding copies of the example inputs."""
    root = tmp_path / "volume"
    (root / "inputs").mkdir(parents=True)
    for name in ("person.png", "two_people.png", "speech_a.wav", "speech_b.wav"):
        (root / "inputs" / name).write_bytes((EXAMPLES / name).read_bytes())
    return root


@pytest.fixture
def make_settings(tmp_path: Path, volume: Path) -> Callable[..., Settings]:
    """Settings for a test: tiny model, the test volume, loopback allowed, scratch under tmp_path."""
    work = tmp_path / "work"
    work.mkdir()

    def build(**env: str) -> Settings:
        base = {
            "MULTITALK_WEIGHTS": "tiny",
            "MULTITALK_DEVICE": "cpu",
            "MULTITALK_VOLUME_ROOT": str(volume),
            "MULTITALK_WORK_DIR": str(work),
            "MULTITALK_ALLOW_LOOPBACK": "true",
            "MULTITALK_FETCH_TIMEOUT_S": "5",
            "MULTITALK_REVISION_FILE": str(tmp_path / "REVISION"),
            "MULTITALK_LOCK_FILE": str(REPO / "requirements.lock"),
        }
        return Settings.from_env({**base, **env})

    return build
