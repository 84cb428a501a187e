"""docker-compose.yml against the local API's start rules: its documented `docker compose up` starts a server
that answers /health. No Docker here: the service's command runs with the environment compose would give it
(the file's `${VAR...}` forms resolved as compose resolves them, the user's token set), the port and the
volume mapped to this machine."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from multitalk_worker.local_api.app import is_loopback
from tests.conftest import REPO

SERVICE = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["worker"]


class Unset(Exception):
    """A `${VAR:?message}` whose variable is unset or empty: compose stops with the message."""


def resolve(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation for the forms the file uses: ${VAR}, ${VAR:-default}, ${VAR:?message}."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        given = env.get(name, "")
        if op == ":?" and not given:
            raise Unset(f"{name}: {arg}")
        return given or (arg if op == ":-" else "")

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


def environment(env: dict[str, str]) -> dict[str, str]:
    return {key: resolve(str(value), env) for key, value in SERVICE["environment"].items()}


def argument(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_compose_needs_the_token_that_its_listening_address_needs() -> None:
    """The server listens beyond loopback inside the container, which needs MULTITALK_API_TOKEN: compose
    refuses to start without one (its message names where to set it), and publishes the port on the
    host's loopback only, whose Host header the default MULTITALK_ALLOWED_HOSTS accepts."""
    command = SERVICE["command"]
    assert not is_loopback(argument(command, "--host"))
    with pytest.raises(Unset, match=r"MULTITALK_API_TOKEN: set MULTITALK_API_TOKEN, in \.env"):
        environment({})
    with pytest.raises(Unset):
        environment({"MULTITALK_API_TOKEN": ""})
    assert environment({"MULTITALK_API_TOKEN": "t0ken"})["MULTITALK_API_TOKEN"] == "t0ken"
    assert SERVICE["ports"] == [f"127.0.0.1:{argument(command, '--port')}:{argument(command, '--port')}"]
    assert "MULTITALK_ALLOWED_HOSTS" not in SERVICE["environment"]
    assert ".env" in (REPO / ".gitignore").read_text().splitlines()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_compose_command_starts_a_server_that_answers_health(tmp_path: Path) -> None:
    """The service's command and environment, as `MULTITALK_WEIGHTS=tiny docker compose up` with a token in
    .env gives them (the volume's host folder and a free port in place of the container's): the server starts
    and GET /health answers 200 without the token; with an empty token (what the file gave before) the same
    command refuses to start."""
    command = list(SERVICE["command"])
    assert command[:3] == ["python", "-m", "multitalk_worker.local_api"]
    port = free_port()
    command[0] = sys.executable
    command[command.index("--port") + 1] = str(port)
    env = environment({"MULTITALK_API_TOKEN": "t0ken", "MULTITALK_WEIGHTS": "tiny"})
    assert env["MULTITALK_VOLUME_ROOT"] == "/runpod-volume"
    env["MULTITALK_VOLUME_ROOT"] = str(tmp_path)  # the volume's host side
    base = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    refused = subprocess.run(
        command,
        env={**base, **env, "MULTITALK_API_TOKEN": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2 and "needs MULTITALK_API_TOKEN" in refused.stderr
    server = subprocess.Popen(command, env={**base, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stdout.read().decode() if server.stdout else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not answer /health"
                time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=60)
