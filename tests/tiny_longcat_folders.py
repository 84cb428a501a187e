"""Tiny LongCat-Video-Avatar folders in the published file names (spec longcat-avatar-inference.md §2.1,
§2.11): the model folder K and the base folder B = K/../LongCat-Video, every file the pipeline reads.

    K (1.5)  base_model/ (tests/tiny_longcat.write_longcat_dit), lora/dmd_lora.safetensors,
             whisper-large-v3/ (tools/_parity_longcat_audio_ours.write_tiny_whisper: config.json,
             preprocessor_config.json, fp16 model.safetensors), vocal_separator/Kim_Vocal_2.onnx (a tiny ONNX
             graph with Kim_Vocal_2's input name and shape)
    K (1.0)  avatar_single/, avatar_multi/, chinese-wav2vec2-base/ (the parity fixture's tiny folder),
             vocal_separator/Kim_Vocal_2.onnx
    B        tokenizer/ (save_pretrained), text_encoder/ (config.json, model-0000i-of-00002.safetensors
             + index), vae/ (config.json, diffusion_pytorch_model.safetensors), float32 as published

The umT5 and VAE are the tiny LongCat bundle's (their widths match the tiny DiT's caption and input channels).
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

from multitalk_worker.tiny_longcat import build_tiny_longcat_bundle
from tests.conftest import REPO
from tests.tiny_longcat import TINY_10, TINY_15, write_base_folder, write_dmd_lora, write_longcat_dit

WAV2VEC_FIXTURE = REPO / "tests/fixtures/parity/wav2vec/chinese-wav2vec2-base"
TEXT_SHARDS = 2


def _audio_tools() -> ModuleType:
    """tools/_parity_longcat_audio_ours.py, imported by path as tests/test_longcat_audio.py does."""
    if str(REPO / "tools") not in sys.path:
        sys.path.insert(0, str(REPO / "tools"))
    return importlib.import_module("_parity_longcat_audio_ours")


def write_base(folder: Path, seed: int = 0) -> Path:
    """B: the tiny bundle's umT5, tokenizer and VAE (tests/tiny_longcat.write_base_folder)."""
    return write_base_folder(folder, build_tiny_longcat_bundle("longcat-avatar", seed=seed))


def write_model(folder: Path, model: str, seed: int = 0) -> Path:
    """K of registry model `model` ("longcat-avatar" or "longcat-avatar-1.0")."""
    tools = _audio_tools()
    if model == "longcat-avatar":
        write_longcat_dit(folder / "base_model", TINY_15, seed)
        write_dmd_lora(folder / "lora" / "dmd_lora.safetensors", TINY_15, seed)
        tools.write_tiny_whisper(folder / "whisper-large-v3", seed=seed)
    else:
        write_longcat_dit(folder / "avatar_single", TINY_10, seed)
        write_longcat_dit(folder / "avatar_multi", TINY_10, seed + 1)
        shutil.copytree(WAV2VEC_FIXTURE, folder / "chinese-wav2vec2-base")
    (folder / "vocal_separator").mkdir(parents=True)
    tools.write_tiny_mdx(folder / "vocal_separator" / "Kim_Vocal_2.onnx", seed=seed)
    return folder


def write_longcat_folders(parent: Path, model: str, seed: int = 0) -> tuple[Path, Path]:
    """(K, B) under `parent`: `LongCat-Video-Avatar-1.5/` or `LongCat-Video-Avatar/`, and `LongCat-Video/`."""
    name = "LongCat-Video-Avatar-1.5" if model == "longcat-avatar" else "LongCat-Video-Avatar"
    with torch.no_grad():
        return write_model(parent / name, model, seed), write_base(parent / "LongCat-Video", seed)
