"""Assemble a LongCat-Video-Avatar bundle from the published folders (spec longcat-avatar-inference.md §2.1,
§2.2, §2.7, §2.8).

K is the model folder (MULTITALK_WEIGHTS, `--weights`): `LongCat-Video-Avatar-1.5/` or
`LongCat-Video-Avatar/` (1.0). B is the base `LongCat-Video/` folder beside it, `K/../LongCat-Video`, where
the reference's demo scripts read it (`<checkpoint_dir>/../LongCat-Video`).

    B/tokenizer/        umT5 tokenizer (tokenizer.json or spiece.model)     loader.load_tokenizer
    B/text_encoder/     UMT5EncoderModel: config.json, model-0000i-of-0000N.safetensors + index, bf16
    B/vae/              AutoencoderKLWan: config.json, diffusion_pytorch_model.safetensors, bf16 (the
                        whole VAE runs in the DiT dtype, as the reference's)
    K/base_model/       1.5 DiT (one and two speakers)                      weights/longcat.load_dit
    K/avatar_single/    1.0 DiT for one speaker
    K/avatar_multi/     1.0 DiT for two speakers
    K/whisper-large-v3/ 1.5 audio encoder, float32 on the DiT's device    weights/whisper.load_whisper
    K/chinese-wav2vec2-base/  1.0 audio encoder, float32                  weights/wav2vec.load_wav2vec
    K/lora/dmd_lora.safetensors  1.5 DMD LoRA, attached at run time (off) weights/longcat_lora.attach_lora
    K/vocal_separator/Kim_Vocal_2.onnx  the vocal separator, when present pipeline/vocals.py

Not read: `B/dit/` and `B/lora/` (the base model's own DiT and LoRAs), the schedulers (the shift is the
registry's: 7 for 1.5, 12 for 1.0), `K/base_model_int8/` (the bf16 DiT is loaded).

Memory (bf16, from the spec's published sizes): the DiT 31.7 GB (15.85 B parameters), umT5-XXL about 11.4 GB
(5.7 B parameters, stored in float32 as 22.7 GB), the VAE 0.25 GB, the Whisper-large-v3 encoder 2.5 GB in
float32 (its decoder is not built), the DMD LoRA 1.26 GB in bf16 (630.8 M parameters; 2.52 GB in float32 on
disk), wav2vec2-base 0.38 GB in float32.

1.0's two DiTs (policy): the two do not fit beside each other and the encoders on one 80 GB card (27+ GB
each), so one DiT module is resident: the one of the first job's speaker count (one speaker at start). A job
for the other count re-reads the other folder's tensors into the same module, one tensor at a time (the
memory stays that of one DiT), and the seconds it took are logged; consecutive jobs with the same count pay
nothing. Both folders must describe the same architecture (their config.json equal), which is checked with
every key and shape before the first tensor is copied.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
from torch import Tensor, nn
from transformers import UMT5Config, UMT5EncoderModel, Wav2Vec2FeatureExtractor

from multitalk_worker.errors import CheckpointError, ModelMissing
from multitalk_worker.models.audio_encoder import audio_features
from multitalk_worker.models.longcat.transformer import LongCatAvatarTransformer
from multitalk_worker.models.whisper_encoder import whisper_features
from multitalk_worker.pipeline.longcat import LongCatBundle
from multitalk_worker.pipeline.longcat_audio import AUDIO_V10, AUDIO_V15, FeatureEncoder
from multitalk_worker.pipeline.vocals import load_vocal_separator, vocal_model_path
from multitalk_worker.registry import LongCatFamily, get_model
from multitalk_worker.weights import diffusers_layout
from multitalk_worker.weights.checkpoint import (
    check_component,
    empty_model,
    load_component,
    raise_first,
)
from multitalk_worker.weights.loader import load_tokenizer
from multitalk_worker.weights.longcat import dit_component, load_dit, read_config
from multitalk_worker.weights.longcat_lora import LORA_FILE, LoraSwitch, attach_lora
from multitalk_worker.weights.longcat_manifest import BASE_DIR, TEXT_ENCODER_CONFIG, VAE_CONFIG, base_folder
from multitalk_worker.weights.wav2vec import load_wav2vec
from multitalk_worker.weights.whisper import load_whisper

logger = logging.getLogger(__name__)


@contextmanager
def _part(what: str, where: Path) -> Iterator[None]:
    """Prefix a ModelMissing raised inside with what the part is and its folder."""
    try:
        yield
    except ModelMissing as err:
        raise ModelMissing(f"{what} ({where}): {err.message}") from err


def load_longcat_bundle(
    model_dir: Path,
    *,
    model: str,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    persons: int = 1,
) -> LongCatBundle:
    """Every network of LongCat version `model` from K = `model_dir` and B = K/../LongCat-Video: ModelMissing
    naming the path and what it is for a missing file, CheckpointError for bad keys or shapes. `persons`
    picks 1.0's DiT folder to start with. The LoRA, when present, is attached switched off."""
    family = _family(model)
    if not model_dir.is_dir():
        raise ModelMissing(f"model folder {model_dir} does not exist (LongCat-Video-Avatar, {model})")
    base = base_folder(model_dir)
    if not base.is_dir():
        raise ModelMissing(
            f"missing the base folder {base}: LongCat-Video-Avatar reads its tokenizer, text encoder and VAE "
            f"from {BASE_DIR}/ beside the model folder ({model_dir.name}/../{BASE_DIR}), as the "
            "reference's demo scripts do; download meituan-longcat/LongCat-Video there"
        )
    start = time.monotonic()
    folder = family.multi_dit_folder if persons > 1 else family.dit_folder
    with _part(f"LongCat-Video-Avatar DiT {folder}/", model_dir / folder):
        dit = load_dit(model_dir, folder, device=device, dtype=dtype)
    logger.info("loaded DiT %s/%s in %.1f s", model_dir.name, folder, time.monotonic() - start)
    lora = _lora(model_dir, dit) if _v15(family) else None
    tokenizer_dir = base / diffusers_layout.TOKENIZER_DIR
    with _part("umT5 tokenizer", tokenizer_dir):
        tokenizer = load_tokenizer(_present(tokenizer_dir, "umT5 tokenizer folder"))
    with _part("umT5-XXL text encoder", base / "text_encoder"):
        text_encoder = _text_encoder(base, device=device, dtype=dtype)
    with _part("Wan VAE", base / "vae"):
        vae = _vae(base, device=device, dtype=dtype)
    audio_dir = model_dir / family.audio_folder
    with _part(f"{family.audio_folder} audio encoder", audio_dir):
        audio, audio_encoder = (_whisper if _v15(family) else _wav2vec)(audio_dir, device)
    vocals = load_vocal_separator(model_dir) if vocal_model_path(model_dir).is_file() else None
    logger.info(
        "LongCat %s loaded from %s and %s in %.1f s (LoRA %s, vocal separator %s)",
        model, model_dir, base, time.monotonic() - start,
        "attached" if lora is not None else "absent", "present" if vocals is not None else "absent",
    )  # fmt: skip
    return LongCatBundle(
        dit=dit,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=vae,
        audio=audio,
        audio_config=AUDIO_V15 if _v15(family) else AUDIO_V10,
        model=model,
        weights=str(model_dir),
        vocals=vocals,
        lora=lora,
        dit_slot=DiTSlot(model_dir, folder, dtype),
        audio_encoder=audio_encoder,
    )


class DiTSlot:
    """Which DiT folder the resident DiT module holds, and the switch to another one (1.0's policy, see
    the module docstring)."""

    def __init__(self, root: Path, folder: str, dtype: torch.dtype) -> None:
        self.root, self.folder, self.dtype = root, folder, dtype
        self.swaps = 0

    def use(self, dit: LongCatAvatarTransformer, folder: str) -> float:
        """Make `dit` hold `folder`'s weights: 0.0 when it already does, else the seconds the copy took."""
        if folder == self.folder:
            return 0.0
        start = time.monotonic()
        held, self.folder = self.folder, ""  # a copy that fails midway leaves a mix: any next job reloads
        try:
            reload_dit(self.root, folder, dit, dtype=self.dtype)
        except (ModelMissing, CheckpointError):
            self.folder = held  # refused before the first copy: the DiT still holds `held`
            raise
        seconds = time.monotonic() - start
        logger.info("DiT %s -> %s in %.1f s", held, folder, seconds)
        self.folder = folder
        self.swaps += 1
        return seconds


def reload_dit(root: Path, folder: str, dit: LongCatAvatarTransformer, *, dtype: torch.dtype) -> None:
    """Copy `root/folder`'s tensors into the loaded `dit` in place, one at a time. Its config.json must be
    the resident one's; every key and shape is checked before the first copy."""
    config = read_config(root, folder)
    if config != dit.config:
        raise CheckpointError(
            "its config differs from the resident DiT's; the two DiTs must share one architecture to be "
            "swapped in place",
            file=f"{folder}/config.json",
        )
    component = dit_component(root, folder)
    try:
        raise_first(check_component(component, dit))
        state = dit.state_dict()  # tensors sharing the parameters' storage
        with torch.no_grad():
            for entry in component.plan.entries:
                target = state[entry.target]
                target.copy_(component.files[entry.file].get(entry.source).to(target.dtype))
    finally:
        component.close()


def _lora(model_dir: Path, dit: LongCatAvatarTransformer) -> LoraSwitch | None:
    path = model_dir / LORA_FILE
    return attach_lora(dit, path) if path.is_file() else None


def _present(path: Path, what: str) -> Path:
    if not path.exists():
        raise ModelMissing(f"missing {what}: {path}")
    return path


def _text_encoder(base: Path, *, device: torch.device, dtype: torch.dtype) -> UMT5EncoderModel:
    """umT5 from B/text_encoder in `dtype` (the reference: from_pretrained(torch_dtype=bf16), every weight
    bf16). Eager attention, as transformers 4.41's UMT5 (the reference's pin) has no other."""
    path = _present(base / TEXT_ENCODER_CONFIG, "umT5-XXL text encoder config")
    config = UMT5Config.from_dict(json.loads(path.read_text()))
    config._attn_implementation = "eager"  # the setter the attn_implementation keyword goes through
    with empty_model():
        model = UMT5EncoderModel(config)
    component = diffusers_layout.text_encoder_component(base)
    try:
        load_component(component, model, device=device, dtype=dtype)
    finally:
        component.close()
    return model.eval().requires_grad_(False)


def _vae(base: Path, *, device: torch.device, dtype: torch.dtype) -> AutoencoderKLWan:
    """AutoencoderKLWan from B/vae in `dtype`: the reference runs the whole VAE in bf16 (spec §2.10)."""
    _present(base / VAE_CONFIG, "Wan VAE config")
    config = cast(dict[str, Any], AutoencoderKLWan.load_config(str(base / "vae")))
    with empty_model():
        vae = cast(AutoencoderKLWan, AutoencoderKLWan.from_config(config))
    component = diffusers_layout.vae_component(base)
    try:
        load_component(component, vae, device=device, dtype=dtype)
    finally:
        component.close()
    return vae.eval().requires_grad_(False)


def _whisper(folder: Path, device: torch.device) -> tuple[FeatureEncoder, nn.Module]:
    """1.5: the Whisper encoder in float32 on `device` (the reference: the whole model in float32 on the
    GPU; we build the encoder alone, weights/whisper.py)."""
    encoder, extractor = load_whisper(
        _present(folder, "Whisper-large-v3 folder (1.5's audio encoder)"), device=device
    )

    def encode(signal: np.ndarray, frames: int) -> Tensor:
        return whisper_features(encoder, extractor, signal, frames).cpu()

    return encode, encoder


def _wav2vec(folder: Path, device: torch.device) -> tuple[FeatureEncoder, nn.Module]:
    """1.0: chinese-wav2vec2-base in float32 on `device`. The reference's feature extractor gets the folder
    path as its `feature_size` argument, so only the constructor's defaults apply (spec §2.1): so here."""
    model, _ = load_wav2vec(
        _present(folder, "chinese-wav2vec2-base folder (1.0's audio encoder)"), device=device
    )
    extractor = Wav2Vec2FeatureExtractor()

    def encode(signal: np.ndarray, frames: int) -> Tensor:
        return audio_features(model, extractor, signal, frames=frames).cpu()

    return encode, model


def _family(model: str) -> LongCatFamily:
    family = get_model(model).family
    if family is None:
        raise ModelMissing(f"model {model} is not a LongCat-Video-Avatar model")
    return family


def _v15(family: LongCatFamily) -> bool:
    return family.audio_folder.startswith("whisper")


def is_tiny_folder(model_dir: Path, model: str) -> bool:
    """Whether K holds a LongCat DiT of the built-in tiny model's sizes (tests write the published layout
    at those sizes); reads only its config.json. False for anything else, a missing folder included."""
    from multitalk_worker.tiny_longcat import TINY_DIT

    family = get_model(model).family
    if family is None or model not in TINY_DIT:
        return False
    path = model_dir / family.dit_folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    sizes = ("hidden_size", "depth", "num_heads")
    return isinstance(raw, dict) and all(raw.get(k) == TINY_DIT[model][k] for k in sizes)
