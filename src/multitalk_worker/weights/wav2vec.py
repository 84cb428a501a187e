"""The `TencentGameMate/chinese-wav2vec2-base` folder (spec 8.3).

    config.json, preprocessor_config.json, and pytorch_model.bin (a Wav2Vec2ForPreTraining save: backbone
    keys under `wav2vec2.`, plus the pre-training heads) or model.safetensors.

The folder's own config.json defines the network. Tensors are checked against it first (so a bad file is
reported with its file and key), then transformers loads the folder, stripping the `wav2vec2.` prefix and
renaming the legacy weight-norm keys itself.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import cast

import torch
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from multitalk_worker.errors import CheckpointError, ModelMissing
from multitalk_worker.weights.checkpoint import (
    Component,
    Problem,
    Shape,
    check_component,
    empty_model,
    raise_first,
    single_file_component,
)
from multitalk_worker.weights.original import KeyTargets

logger = logging.getLogger(__name__)

WAV2VEC_DIR = "chinese-wav2vec2-base"
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PRETRAINING_HEADS = ("quantizer.", "project_q.", "project_hid.")


def weights_file(folder: Path) -> str:
    """The weights file transformers will read: model.safetensors if present, else pytorch_model.bin."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return name
    raise ModelMissing(f"missing wav2vec2 weights: none of {', '.join(WEIGHT_FILES)} in {folder}")


def wav2vec_keymap(key: str, shape: Shape) -> KeyTargets | None:
    """A Wav2Vec2ForPreTraining / Wav2Vec2Model key -> Wav2Vec2Model key; pre-training heads are unused."""
    if key.startswith(PRETRAINING_HEADS):
        return []
    target = key.removeprefix("wav2vec2.")
    target = re.sub(r"\.weight_g$", ".parametrizations.weight.original0", target)
    target = re.sub(r"\.weight_v$", ".parametrizations.weight.original1", target)
    return [(target, shape, None)]


def read_config(folder: Path) -> Wav2Vec2Config:
    if not (folder / CONFIG_FILE).is_file():
        raise ModelMissing(f"missing wav2vec2 file {CONFIG_FILE} in {folder}")
    return Wav2Vec2Config.from_pretrained(folder, local_files_only=True)


def wav2vec_component(folder: Path) -> Component:
    """The tensors of the folder's weights file, named `<folder name>/<file>` in messages."""
    file_name = f"{folder.name}/{weights_file(folder)}"
    return single_file_component("audio_encoder", folder.parent, file_name, wav2vec_keymap)


def check_wav2vec(folder: Path) -> list[Problem]:
    """Problems of the folder's tensors against the network its config.json describes."""
    config = read_config(folder)
    with empty_model():
        model = Wav2Vec2Model(config)
    component = wav2vec_component(folder)
    try:
        return check_component(component, model)
    finally:
        component.close()


def load_wav2vec(folder: Path, *, device: torch.device) -> tuple[Wav2Vec2Model, Wav2Vec2FeatureExtractor]:
    """Check, then load the audio encoder (float32, eval) and its feature extractor from `folder`."""
    if not (folder / PREPROCESSOR_FILE).is_file():
        raise ModelMissing(f"missing wav2vec2 file {PREPROCESSOR_FILE} in {folder}")
    raise_first(check_wav2vec(folder))
    loaded = Wav2Vec2Model.from_pretrained(
        folder, local_files_only=True, dtype=torch.float32, output_loading_info=True
    )
    # from_pretrained's annotation omits the (model, info) pair that output_loading_info=True returns
    model, info = cast(tuple[Wav2Vec2Model, dict[str, list[str]]], loaded)
    if info.get("missing_keys") or info.get("mismatched_keys"):
        key = sorted(info.get("missing_keys") or info["mismatched_keys"])[0]
        raise CheckpointError("transformers could not load every tensor", file=str(folder), key=str(key))
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder, local_files_only=True)
    cast(torch.nn.Module, model).to(device)  # transformers' `to` is typed as an unbound function
    return model.eval().requires_grad_(False), extractor
