"""`weights verify` and `weights download` for LongCat-Video-Avatar (weights/longcat_manifest.py): tiny model
and base folders in the published file names, every fault named by its file, the download from a loopback
server that serves files as the Hub does (tests/servers.py HubServer), never the Hub; the start-up weights
check."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from multitalk_worker.cli import main as cli_main
from multitalk_worker.config import Settings
from multitalk_worker.errors import InputFetchFailed, InvalidInput
from multitalk_worker.startup import check_weights, served_models
from multitalk_worker.weights.download import download, ensure_weights
from multitalk_worker.weights.longcat_manifest import (
    BASE_DIR,
    BASE_REPO,
    LONGCAT_MANIFESTS,
    LORA_FILE,
    VOCAL_FILE,
    verify_longcat,
)
from multitalk_worker.weights.manifest import VerifyReport, verify
from tests.servers import HubServer, start_hub_server
from tests.tiny_longcat_folders import write_longcat_folders

V15, V10 = "longcat-avatar", "longcat-avatar-1.0"
# files of the published repositories that the pipeline does not read (spec §2.1, §2.11)
UNREAD_MODEL_FILES = {
    "README.md": b"# LongCat-Video-Avatar",
    "scheduler/scheduler_config.json": b'{"shift": 7.0}',
    "whisper-large-v3/pytorch_model.bin": bytes(3000),
    "whisper-large-v3/flax_model.msgpack": bytes(3000),
    "whisper-large-v3/tokenizer.json": b"{}",
    "base_model_int8/config.json": b"{}",
    "base_model_int8/quantized_model-00001-of-00004.safetensors": bytes(3000),
    "chinese-wav2vec2-base/chinese-wav2vec2-base-fairseq-ckpt.pt": bytes(3000),
    "assets/demo.mp4": bytes(5000),
}
UNREAD_BASE_FILES = {
    "dit/config.json": b"{}",
    "dit/diffusion_pytorch_model-00001-of-00006.safetensors": bytes(3000),
    "lora/refinement_lora.safetensors": bytes(3000),
    "scheduler/scheduler_config.json": b'{"shift": 12.0}',
}


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path (not huggingface_hub's .cache/ download metadata)."""
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in paths
        if p.relative_to(folder).parts[0] != ".cache"
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(K, B) of each version, written once; tests that break a file work on a copy."""
    root = tmp_path_factory.mktemp("longcat")
    return {model: write_longcat_folders(root / model, model, seed=2) for model in (V15, V10)}


def _copy(folders: dict[str, tuple[Path, Path]], model: str, tmp_path: Path) -> tuple[Path, Path]:
    model_dir, base = folders[model]
    shutil.copytree(model_dir, tmp_path / model_dir.name)
    shutil.copytree(base, tmp_path / base.name)
    return tmp_path / model_dir.name, tmp_path / base.name


def _problems(report: VerifyReport) -> set[tuple[str, str, str | None]]:
    return {(p.kind, p.file, p.key) for p in report.problems}


def test_complete_folders_verify(
    folders: dict[str, tuple[Path, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    for model, (model_dir, _) in folders.items():
        report = verify(model_dir, model=model)
        assert report.ok, str(report)
        assert report.model == model and report.preset == (
            "longcat-distill" if model == V15 else "longcat-1.0"
        )
    model_dir, _ = folders[V15]
    assert cli_main(["weights", "verify", str(model_dir), "--model", V15]) == 0
    assert capsys.readouterr().out.rstrip().endswith("OK")
    assert cli_main(["weights", "verify", str(model_dir), "--model", V15, "--adapter", "single"]) != 0
    assert "--wav2vec and --adapter name Wan files" in capsys.readouterr().err
    with pytest.raises(InvalidInput, match="has no preset 'fast'"):
        verify_longcat(model_dir, V15, preset="fast")


def test_each_broken_file_is_named(folders: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """A missing DiT shard, a wrongly shaped umT5 tensor, a missing VAE, a LoRA module of the wrong shape:
    each is reported with its file (B's relative to K) and key, the rest of the folder still checked."""
    model_dir, base = _copy(folders, V15, tmp_path)
    (model_dir / "base_model/diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    shard = base / "text_encoder/model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    key = sorted(tensors)[0]
    tensors[key] = torch.zeros(3, 5)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    shutil.rmtree(base / "vae")
    lora = load_file(str(model_dir / LORA_FILE))
    down = next(k for k in lora if k.endswith("attn___lorahyphen___qkv.lora_down.weight"))
    lora[down] = torch.zeros(lora[down].shape[0], 7)
    save_file(lora, str(model_dir / LORA_FILE))

    report = verify(model_dir, model=V15)
    problems = _problems(report)
    assert ("missing_file", "base_model/diffusion_pytorch_model-00002-of-00002.safetensors", None) in problems
    assert ("wrong_shape", f"../{BASE_DIR}/text_encoder/model-00001-of-00002.safetensors", key) in problems
    assert ("missing_file", f"../{BASE_DIR}/vae/diffusion_pytorch_model.safetensors", None) in problems
    assert ("missing_file", f"../{BASE_DIR}/vae/config.json", None) in problems
    assert ("wrong_shape", LORA_FILE, down.removesuffix(".lora_down.weight")) in problems
    assert not any(p.file.startswith("whisper") for p in report.problems)  # the rest is fine
    assert len(report.problems) == len(problems)  # each reported once


def test_missing_lora_fails_the_distilled_preset_only(
    folders: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    model_dir, _ = _copy(folders, V15, tmp_path)
    (model_dir / LORA_FILE).unlink()
    shutil.rmtree(model_dir / "vocal_separator")
    distilled = verify(model_dir, model=V15)
    assert [(p.kind, p.file) for p in distilled.problems] == [("missing_file", LORA_FILE)]
    assert (
        "preset longcat-distill needs it (presets longcat-1.5 run without it)" in distilled.problems[0].detail
    )
    steps50 = verify_longcat(model_dir, V15, preset="longcat-1.5")
    assert steps50.ok, str(steps50)
    assert f"no {LORA_FILE}: presets longcat-distill unavailable" in steps50.notes
    assert any(n.startswith(f"no {VOCAL_FILE}") for n in steps50.notes)  # the vocal stage is optional


def test_version_1_0_faults(folders: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    model_dir, base = _copy(folders, V10, tmp_path)
    shutil.rmtree(model_dir / "avatar_multi")
    (model_dir / "chinese-wav2vec2-base/pytorch_model.bin").unlink()
    shutil.rmtree(base)
    problems = {(p.kind, p.file) for p in verify(model_dir, model=V10).problems}
    assert ("missing_file", "avatar_multi/config.json") in problems
    assert ("missing_file", "avatar_multi/diffusion_pytorch_model.safetensors.index.json") in problems
    assert ("missing_file", "chinese-wav2vec2-base/pytorch_model.bin") in problems
    assert ("missing_file", f"../{BASE_DIR}/text_encoder/config.json") in problems
    assert ("missing_file", f"../{BASE_DIR}/tokenizer/tokenizer_config.json") in problems
    assert not any(f.startswith("avatar_single") for _, f in problems)
    # a folder with a file missing gets no list of its tensors besides
    assert {kind for kind, _ in problems} == {"missing_file"}


@pytest.fixture(scope="module")
def hub(folders: dict[str, tuple[Path, Path]]) -> Iterator[HubServer]:
    """LongCat-Video-Avatar-1.5's and LongCat-Video's repositories as published: the tiny folders plus files
    the pipeline does not read."""
    model_dir, base = folders[V15]
    repos = {
        LONGCAT_MANIFESTS[V15].repo: {**_files(model_dir), **UNREAD_MODEL_FILES},
        BASE_REPO: {**_files(base), **UNREAD_BASE_FILES},
    }
    server = start_hub_server(repos)
    yield server
    server.stop()


def test_download_fetches_exactly_the_read_files(
    folders: dict[str, tuple[Path, Path]], hub: HubServer, tmp_path: Path
) -> None:
    model_dir, base = folders[V15]
    target = tmp_path / "volume" / model_dir.name
    hub.requests.clear()
    report = download(target, model=V15, endpoint=hub.endpoint)
    assert report.verify is not None and report.verify.ok, str(report)
    repo = LONGCAT_MANIFESTS[V15].repo
    expected = {f"{repo}/{name}" for name in _files(model_dir)} | {f"{BASE_REPO}/{n}" for n in _files(base)}
    assert sorted(hub.downloads()) == sorted(expected)
    assert _files(target) | {
        f"../{BASE_DIR}/{n}": d for n, d in _files(target.parent / BASE_DIR).items()
    } == (_files(model_dir) | {f"../{BASE_DIR}/{n}": d for n, d in _files(base).items()})
    assert f"../{BASE_DIR}/vae/config.json" in report.fetched

    (target / "whisper-large-v3/model.safetensors").write_bytes(b"cut")  # an interrupted copy
    hub.requests.clear()
    again = download(target, model=V15, endpoint=hub.endpoint)
    assert again.refetched == ["whisper-large-v3/model.safetensors"] and again.fetched == []
    assert hub.downloads() == [f"{repo}/whisper-large-v3/model.safetensors"]
    assert again.verify is not None and again.verify.ok


def test_fetch_at_first_start_for_longcat(
    hub: HubServer, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    target = tmp_path / "LongCat-Video-Avatar-1.5"
    settings = make_settings(
        MULTITALK_WEIGHTS=str(target), MULTITALK_MODEL=V15, MULTITALK_FETCH_WEIGHTS="true"
    )
    ensure_weights(settings, endpoint=hub.endpoint)
    assert (target / "base_model/config.json").is_file()
    assert (tmp_path / BASE_DIR / "vae/diffusion_pytorch_model.safetensors").is_file()
    check = check_weights(settings, full=True)
    assert check.ok and "model longcat-avatar" in check.detail, check.detail
    shutil.rmtree(tmp_path / BASE_DIR / "text_encoder")
    broken = check_weights(settings, full=True)
    assert not broken.ok and f"../{BASE_DIR}/text_encoder/config.json" in broken.detail
    listed = served_models(settings)
    assert [(m["model"], m["sources"], m["adapters"], m["fps"], m["default"]) for m in listed] == [
        (V15, ["image", "video"], [], 25, True)
    ]


def test_missing_repository_or_network(
    hub: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """1.0's repository is not on this Hub: the error names it; with no Hub at all, `weights download`
    ends with one line naming the endpoint."""
    with pytest.raises(InputFetchFailed, match=f"from {LONGCAT_MANIFESTS[V10].repo} failed"):
        download(tmp_path / "v10", model=V10, endpoint=hub.endpoint)
    with socket.socket() as probe:  # a free port, closed again: connecting to it is refused
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", endpoint)
    code = cli_main(["weights", "download", str(tmp_path / "none"), "--model", V15])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error [") and f"cannot reach {endpoint}" in lines[0]
