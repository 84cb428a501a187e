"""The `whisper-large-v3/` folder of LongCat-Video-Avatar-1.5 (spec longcat-avatar-inference.md §2.1, §2.8,
§2.11): a copy of openai/whisper-large-v3.

    config.json              WhisperConfig (128 mel bins, 32 encoder layers of width 1280)
    preprocessor_config.json WhisperFeatureExtractor settings (n_fft 400, hop 160, 30 s windows)
    model.safetensors        WhisperForConditionalGeneration, float16: `model.encoder.*`, `model.decoder.*`

Only the encoder is used. The reference loads the whole encoder-decoder in float32 (about 6.2 GB) and calls
its `.encoder`; we build transformers' `WhisperEncoder` alone and load the `model.encoder.*` tensors
(upcast to float32, as `from_pretrained` upcasts them): the same numbers at 40 % of the memory. Tensors are
checked against the folder's config first, so a bad file is reported with its file and key. A folder saved
from `WhisperModel` (keys `encoder.*`) is read too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from multitalk_worker.errors import ModelMissing
from multitalk_worker.weights.checkpoint import (
    Component,
    Problem,
    Shape,
    check_component,
    empty_model,
    load_component,
    single_file_component,
)
from multitalk_worker.weights.original import KeyTargets

WHISPER_DIR = "whisper-large-v3"
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHTS_FILE = "model.safetensors"
ENCODER_PREFIXES = ("model.encoder.", "encoder.")
UNUSED_PREFIXES = ("model.decoder.", "decoder.", "proj_out.")


def whisper_keymap(key: str, shape: Shape) -> KeyTargets | None:
    """A WhisperForConditionalGeneration / WhisperModel key -> WhisperEncoder key; decoder keys unused."""
    for prefix in ENCODER_PREFIXES:
        if key.startswith(prefix):
            return [(key.removeprefix(prefix), shape, None)]
    if key.startswith(UNUSED_PREFIXES):
        return []
    return None


def read_config(folder: Path) -> WhisperConfig:
    if not (folder / CONFIG_FILE).is_file():
        raise ModelMissing(f"missing Whisper file {CONFIG_FILE} in {folder}")
    return WhisperConfig.from_pretrained(folder, local_files_only=True)


def whisper_component(folder: Path) -> Component:
    """The tensors of the folder's model.safetensors, named `<folder name>/model.safetensors`."""
    return single_file_component(
        "audio_encoder", folder.parent, f"{folder.name}/{WEIGHTS_FILE}", whisper_keymap
    )


def check_whisper(folder: Path) -> list[Problem]:
    """Problems of the folder's tensors against the encoder its config.json describes."""
    with empty_model():
        encoder = WhisperEncoder(read_config(folder))
    component = whisper_component(folder)
    try:
        return check_component(component, encoder)
    finally:
        component.close()


def load_whisper(folder: Path, *, device: torch.device) -> tuple[WhisperEncoder, WhisperFeatureExtractor]:
    """The Whisper encoder (float32, eval) and its feature extractor from `folder`, strictly: every encoder
    tensor present with its shape, no unknown key."""
    if not (folder / PREPROCESSOR_FILE).is_file():
        raise ModelMissing(f"missing Whisper file {PREPROCESSOR_FILE} in {folder}")
    config = read_config(folder)
    with empty_model():
        encoder = WhisperEncoder(config)
    component = whisper_component(folder)
    try:
        load_component(component, encoder, device=device, dtype=torch.float32)
    finally:
        component.close()
    extractor = WhisperFeatureExtractor.from_pretrained(folder, local_files_only=True)
    return encoder, extractor
