"""`weights download` against a loopback server that serves tiny repositories the way the Hub serves files
(tests/servers.py HubServer; huggingface_hub reaches it through HF_ENDPOINT or `endpoint`), never the Hub."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from multitalk_worker.cli import main as cli_main
from multitalk_worker.config import Settings
from multitalk_worker.errors import InvalidInput, ModelMissing
from multitalk_worker.registry import INFINITETALK, MULTITALK
from multitalk_worker.tiny import build_tiny_bundle, tiny_adapter_state
from multitalk_worker.weights.download import BASE_REPOS, WAV2VEC_REPO, download, ensure_weights
from multitalk_worker.weights.wav2vec import WAV2VEC_DIR
from tests.conftest import REPO
from tests.servers import HubServer, start_hub_server
from tests.tiny import write_all

WAN = BASE_REPOS["original"]
MEIGEN_MULTITALK = MULTITALK.adapters[0].hub_repo
ADAPTER_REPOS = {
    adapter.file: adapter.hub_repo for spec in (MULTITALK, INFINITETALK) for adapter in spec.adapters
}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """The repositories cut from a tiny original-layout folder as they are published: Wan's (with Wan's own
    index), MeiGen-MultiTalk (multitalk.safetensors), InfiniteTalk (single/ and multi/), wav2vec2's; plus
    files that no manifest lists."""
    adapters = {a.file: tiny_adapter_state(3, a.name) for a in INFINITETALK.adapters}
    bundle = build_tiny_bundle(seed=3, dtype=torch.float32)
    folder = write_all(tmp_path_factory.mktemp("tiny") / "model", bundle, index="wan", adapters=adapters)
    repos: dict[str, dict[str, bytes]] = {WAN: {"README.md": b"# Wan", "examples/big.bin": bytes(100_000)}}
    repos[WAV2VEC_REPO] = {"README.md": b"# wav2vec2"}
    for repo in ADAPTER_REPOS.values():
        repos[repo] = {"assets/demo.mp4": bytes(50_000)}
    for name, data in _files(folder).items():
        if name.startswith(WAV2VEC_DIR + "/"):
            repos[WAV2VEC_REPO][name.removeprefix(WAV2VEC_DIR + "/")] = data
        else:
            repos[ADAPTER_REPOS.get(name, WAN)][name] = data
    server = start_hub_server(repos)
    yield server
    server.stop()


def test_download_fetches_the_manifest_only_and_refetches_a_truncated_file(
    hub: HubServer, tmp_path: Path
) -> None:
    target = tmp_path / "weights"
    hub.requests.clear()
    report = download(target, endpoint=hub.endpoint)
    assert report.verify is not None and report.verify.ok, str(report)
    fetched = set(hub.downloads())
    assert f"{MEIGEN_MULTITALK}/multitalk.safetensors" in fetched
    assert f"{WAN}/diffusion_pytorch_model.safetensors.index.json" in fetched
    assert not any("infinitetalk" in name for name in fetched)  # another model's adapter files
    assert not any(name.endswith(("README.md", "big.bin", "demo.mp4")) for name in fetched)
    assert (target / WAV2VEC_DIR / "config.json").is_file()
    assert report.refetched == [] and len(report.fetched) == len(fetched)

    vae = target / "Wan2.1_VAE.pth"
    whole = vae.read_bytes()
    vae.write_bytes(whole[: len(whole) // 2])  # an interrupted copy
    hub.requests.clear()
    again = download(target, endpoint=hub.endpoint)
    assert again.refetched == ["Wan2.1_VAE.pth"] and again.fetched == []
    assert hub.downloads() == [f"{WAN}/Wan2.1_VAE.pth"]
    assert vae.read_bytes() == whole and again.verify is not None and again.verify.ok


def test_cli_download_honours_hf_endpoint(hub: HubServer, tmp_path: Path) -> None:
    target = tmp_path / "weights"
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "multitalk_worker.cli", "weights", "download", str(target)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 fetched again" in done.stdout and done.stdout.rstrip().endswith("OK")


def test_infinitetalk_fetches_its_two_adapter_files(hub: HubServer, tmp_path: Path) -> None:
    hub.requests.clear()
    report = download(tmp_path / "it", model="infinitetalk", endpoint=hub.endpoint)
    assert report.verify is not None and report.verify.ok, str(report)
    fetched = set(hub.downloads())
    repo = INFINITETALK.adapters[0].hub_repo
    assert {f"{repo}/single/infinitetalk.safetensors", f"{repo}/multi/infinitetalk.safetensors"} <= fetched
    assert f"{MEIGEN_MULTITALK}/multitalk.safetensors" not in fetched


def test_unknown_model_or_layout_is_a_typed_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):  # argparse offers the registry's models only
        cli_main(["weights", "download", str(tmp_path / "w"), "--model", "nope"])
    with pytest.raises(InvalidInput, match="unknown model 'nope'"):
        download(tmp_path / "w", model="nope")
    with pytest.raises(InvalidInput, match="layout 'flat' is not accepted"):
        download(tmp_path / "w", layout="flat")
    assert not (tmp_path / "w").exists()


def test_worker_fetches_missing_weights_at_start_when_asked(
    hub: HubServer, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    target = tmp_path / "volume-weights"
    off = make_settings(MULTITALK_WEIGHTS=str(target))
    ensure_weights(off, endpoint=hub.endpoint)  # not asked: nothing happens
    assert not target.exists()
    on = make_settings(MULTITALK_WEIGHTS=str(target), MULTITALK_FETCH_WEIGHTS="true")
    ensure_weights(on, endpoint=hub.endpoint)
    assert (target / "multitalk.safetensors").is_file()
    good = hub.repos[WAN].pop("Wan2.1_VAE.pth")  # the Hub no longer has a file the folder lacks
    try:
        (target / "Wan2.1_VAE.pth").unlink()
        with pytest.raises(ModelMissing, match="has none of Wan2.1_VAE.pth"):
            ensure_weights(on, endpoint=hub.endpoint)
    finally:
        hub.repos[WAN]["Wan2.1_VAE.pth"] = good


def test_cli_download_without_a_network_says_so_in_one_line(tmp_path: Path) -> None:
    """A Hub that cannot be reached (here: a loopback port where nothing listens, so the connection is
    refused) ends `weights download` with one line naming the endpoint, not the HTTP client's traceback."""
    with socket.socket() as probe:  # a free port, closed again: connecting to it is refused
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "multitalk_worker.cli", "weights", "download", str(tmp_path / "weights")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("error [") and f"cannot reach {endpoint}" in lines[0]
