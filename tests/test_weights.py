"""Loaders of the original, Diffusers and wav2vec2 layouts on tiny checkpoints written in the real formats."""

from __future__ import annotations

import ctypes
import gc
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from multitalk_worker.errors import CheckpointError, ModelMissing
from multitalk_worker.models.audio_encoder import audio_features
from multitalk_worker.models.configs import TINY
from multitalk_worker.models.image_encoder import encode_image
from multitalk_worker.models.text_encoder import encode_text
from multitalk_worker.models.vae import vae_decode, vae_encode
from multitalk_worker.tiny import build_tiny_bundle
from multitalk_worker.weights.diffusers_layout import transformer_key_to_original
from multitalk_worker.weights.loader import ModelBundle, detect_layout, load_models
from multitalk_worker.weights.manifest import verify
from tests.tiny import REFERENCE_PRECISIONS, WAV2VEC_DIR, write_all, write_original, write_wav2vec

NETWORKS = ("dit", "text_encoder", "image_encoder", "vae", "audio_encoder")


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return build_tiny_bundle(seed=3, dtype=torch.float32)


@pytest.fixture(scope="module")
def folders(bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {layout: write_all(root / layout, bundle, layout) for layout in ("original", "diffusers")}


def fresh_copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def dit_inputs(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    cfg = bundle.config.dit
    return {
        "latent": torch.randn(1, 16, 2, 4, 4, generator=g),
        "timestep": torch.tensor([731.5]),
        "context": torch.randn(1, 7, cfg.text_dim, generator=g),
        "clip_fea": torch.randn(1, 17, cfg.image_dim, generator=g),
        "y": torch.randn(1, 20, 2, 4, 4, generator=g),
        "audio": torch.randn(1, 1, 5, cfg.audio_window, cfg.audio_layers, cfg.audio_channels, generator=g),
        "person_masks": torch.ones(3, 4, 4),
    }


def outputs(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """One output of every network on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([[5, 9, 13, 1, 0, 0], [7, 1, 0, 0, 0, 0]])
    with torch.no_grad():
        dit = bundle.dit(**dit_inputs(bundle))
    return {
        "dit": dit,
        "text": torch.cat(encode_text(bundle.text_encoder, ids, (ids > 0).long())),
        "image": encode_image(bundle.image_encoder, torch.rand(1, 3, 40, 56, generator=g) * 2 - 1),
        "vae": vae_decode(
            bundle.vae, vae_encode(bundle.vae, torch.rand(1, 3, 5, 16, 16, generator=g) * 2 - 1)
        ),
        "audio": audio_features(
            bundle.audio_encoder, bundle.feature_extractor, np.sin(np.arange(9000) / 7.0)
        ),
    }


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_layout_loads_the_same_model(layout: str, bundle: ModelBundle, folders: dict[str, Path]) -> None:
    loaded = load_models(folders[layout], dtype=torch.float32)
    assert detect_layout(folders[layout]) == layout
    assert loaded.config == TINY
    for name in NETWORKS:
        want, got = getattr(bundle, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    expected, actual = outputs(bundle), outputs(loaded)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert loaded.tokenizer("a man talking").input_ids == bundle.tokenizer("a man talking").input_ids


def test_default_precisions_match_the_reference(folders: dict[str, Path]) -> None:
    """bf16 DiT (every float32 checkpoint tensor cast) and umT5, fp16 CLIP, fp32 VAE and wav2vec2."""
    loaded = load_models(folders["original"])
    reference = build_tiny_bundle(seed=3)  # same seed, default precisions
    for name, dtype in REFERENCE_PRECISIONS.items():
        state = getattr(loaded, name).state_dict()
        assert {v.dtype for v in state.values() if v.is_floating_point()} == {dtype}, name
        want = getattr(reference, name).state_dict()
        assert all(torch.equal(want[k], state[k]) for k in want), name


def test_wan_index_with_multitalk_file_beside_it(bundle: ModelBundle, tmp_path: Path) -> None:
    """Wan's own index (no audio keys) + multitalk.safetensors placed next to it also loads."""
    root = write_original(tmp_path / "wan", bundle, index="wan")
    write_wav2vec(root / WAV2VEC_DIR, bundle, safetensors=True)
    loaded = load_models(root, dtype=torch.float32)
    want = bundle.dit.state_dict()
    assert all(torch.equal(want[k], v) for k, v in loaded.dit.state_dict().items())
    assert verify(root).ok


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_verify_passes_on_complete_folders(layout: str, folders: dict[str, Path]) -> None:
    report = verify(folders[layout])
    assert report.ok, str(report)
    assert (report.layout, report.preset) == (layout, "tiny")


def test_verify_names_a_removed_shard(folders: dict[str, Path], tmp_path: Path) -> None:
    root = fresh_copy(folders["original"], tmp_path)
    (root / "diffusion_pytorch_model-00003-of-00007.safetensors").unlink()
    report = verify(root)
    assert [(p.kind, p.file) for p in report.problems] == [
        ("missing_file", "diffusion_pytorch_model-00003-of-00007.safetensors")
    ]
    with pytest.raises(ModelMissing, match="diffusion_pytorch_model-00003-of-00007.safetensors"):
        load_models(root)


def test_verify_names_a_reshaped_tensor(folders: dict[str, Path], tmp_path: Path) -> None:
    root = fresh_copy(folders["diffusers"], tmp_path)
    path = root / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["decoder.conv_in.bias"] = torch.zeros(3)
    save_file(state, str(path))
    report = verify(root)
    assert [(p.kind, p.file, p.key) for p in report.problems] == [
        ("wrong_shape", "vae/diffusion_pytorch_model.safetensors", "decoder.conv_in.bias")
    ]
    assert "expected" in str(report)


def test_verify_names_missing_files(folders: dict[str, Path], tmp_path: Path) -> None:
    root = fresh_copy(folders["original"], tmp_path)
    (root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth").unlink()
    (root / WAV2VEC_DIR / "preprocessor_config.json").unlink()
    files = {p.file for p in verify(root).problems if p.kind == "missing_file"}
    assert files == {"models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
                     f"{WAV2VEC_DIR}/preprocessor_config.json"}  # fmt: skip


def _edit_pth(path: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


@pytest.mark.parametrize(
    ("edit", "kind", "key"),
    [
        (
            lambda s: s.pop("blocks.1.attn.k.weight"),
            "missing tensor",
            "encoder.block.1.layer.0.SelfAttention.k.weight",
        ),
        (
            lambda s: s.update({"blocks.0.attn.bias": torch.zeros(2)}),
            "unexpected tensor",
            "blocks.0.attn.bias",
        ),
        (lambda s: s.update({"norm.weight": torch.ones(5)}), "wrong shape", "norm.weight"),
    ],
)
def test_bad_tensor_raises_checkpoint_error(
    edit: Callable[[dict[str, torch.Tensor]], object],
    kind: str,
    key: str,
    folders: dict[str, Path],
    tmp_path: Path,
) -> None:
    root = fresh_copy(folders["original"], tmp_path)
    _edit_pth(root / "models_t5_umt5-xxl-enc-bf16.pth", edit)
    with pytest.raises(CheckpointError, match=kind) as info:
        load_models(root)
    assert (info.value.file, info.value.key) == ("models_t5_umt5-xxl-enc-bf16.pth", key)
    assert [(p.file, p.key) for p in verify(root).problems] == [("models_t5_umt5-xxl-enc-bf16.pth", key)]


def test_bad_audio_layer_names_multitalk_file(folders: dict[str, Path], tmp_path: Path) -> None:
    root = fresh_copy(folders["diffusers"], tmp_path)
    state = load_file(root / "multitalk.safetensors")
    del state["audio_proj.norm.bias"]
    save_file(state, str(root / "multitalk.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_models(root)
    assert (info.value.file, info.value.key) == ("multitalk.safetensors", "audio_proj.norm.bias")


def test_wav2vec_unexpected_tensor_is_named(folders: dict[str, Path], tmp_path: Path) -> None:
    root = fresh_copy(folders["original"], tmp_path)
    _edit_pth(
        root / WAV2VEC_DIR / "pytorch_model.bin", lambda s: s.update({"wav2vec2.extra": torch.zeros(1)})
    )
    with pytest.raises(CheckpointError) as info:
        load_models(root)
    assert (info.value.file, info.value.key) == (f"{WAV2VEC_DIR}/pytorch_model.bin", "wav2vec2.extra")


def test_diffusers_rules_invert_diffusers_converter(bundle: ModelBundle) -> None:
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    wan_keys = [k for k in bundle.dit.state_dict() if "audio" not in k and "norm_x" not in k]
    converted = convert_wan_transformer_to_diffusers(dict.fromkeys(wan_keys))
    assert sorted(transformer_key_to_original(k) for k in converted) == sorted(wan_keys)
    assert transformer_key_to_original("blocks.0.audio_cross_attn.q_linear.weight") is None


def _release_freed_memory() -> None:
    """Collect and hand freed heap pages back to the OS, so RssAnon measures live memory."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


def _peak_during(fn: Callable[[], ModelBundle]) -> tuple[int, ModelBundle]:
    peak = [_rss_anon()]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _rss_anon()), result


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_loading_twice_does_not_grow_peak_memory(tmp_path: Path) -> None:
    """A DiT of ~34 MB (float32) loads with one model's worth of memory, and a second load peaks no higher."""
    medium = replace(
        TINY, name="medium", dit=replace(TINY.dit, dim=256, ffn_dim=1024, num_heads=4, num_layers=4)
    )
    source = build_tiny_bundle(seed=0, dtype=torch.float32, config=medium)
    root = write_all(tmp_path / "medium", source, "original")
    dit_bytes = sum(t.numel() * t.element_size() for t in source.dit.state_dict().values())
    del source
    _release_freed_memory()
    baseline = _rss_anon()
    peak1, first = _peak_during(lambda: load_models(root, config=medium, dtype=torch.float32))
    del first
    _release_freed_memory()
    after_release = _rss_anon()
    peak2, second = _peak_during(lambda: load_models(root, config=medium, dtype=torch.float32))
    mib = 2**20
    over = [(value - baseline) / mib for value in (peak1, after_release, peak2)]
    print(f"DiT {dit_bytes / mib:.1f} MiB; over baseline: peak of load 1 {over[0]:.1f} MiB, ", end="")
    print(f"after release {over[1]:.1f} MiB, peak of load 2 {over[2]:.1f} MiB")
    assert second.dit.patch_embedding.weight.shape[0] == 256
    assert peak1 - baseline < 1.6 * dit_bytes  # never two copies of the model
    assert peak2 <= peak1 + 0.1 * dit_bytes  # nothing retained from the first load


def test_weights_verify_command(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import argparse

    from multitalk_worker.weights.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["weights", "verify", str(folders["diffusers"])])
    assert args.func(args) == 0 and "OK" in capsys.readouterr().out
    root = fresh_copy(folders["diffusers"], tmp_path)
    (root / "text_encoder" / "model-00002-of-00002.safetensors").unlink()
    args = parser.parse_args(["weights", "verify", str(root), "--preset", "tiny"])
    assert args.func(args) == 1
    assert "missing_file: text_encoder/model-00002-of-00002.safetensors" in capsys.readouterr().out
