"""LongCat-Video-Avatar DiT folders as published on the Hugging Face Hub (spec §2.1, §2.2, §2.11).

    LongCat-Video-Avatar-1.5/base_model/       config.json, diffusion_pytorch_model-0000{1..6}-of-00006
                                               .safetensors, diffusion_pytorch_model.safetensors.index.json
    LongCat-Video-Avatar-1.5/base_model_int8/  config.json, quantization_config.json, 4 shards
                                               quantized_model-*.safetensors + index (not loaded, see below)
    LongCat-Video-Avatar/avatar_single/, avatar_multi/   v1.0: the same layout as base_model/

Keys are the model's own (no renaming): every tensor of the index is read strictly through one `Plan`,
the same one `dit_problems` (for `weights verify`) checks, so missing, unexpected and wrongly shaped keys are
named by file and key before anything is read.

INT8 (`base_model_int8/`): the files are plain safetensors (int8 `<linear>.weight_int8`, float32
`<linear>.weight_scale`, bf16 biases and the rest), so safetensors reads them; using them needs a linear that
rebuilds its weight per call as cast(q)·cast(scale) in the input's dtype (spec §2.6), which this module does
not provide yet: `INT8_FOLDER` is refused with that reason rather than dequantized once, which would be a
different numeric path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from multitalk_worker.errors import CheckpointError, ModelMissing
from multitalk_worker.models.longcat.config import LongCatAvatarConfig
from multitalk_worker.models.longcat.transformer import LongCatAvatarTransformer
from multitalk_worker.weights.checkpoint import (
    Component,
    Plan,
    Problem,
    check_component,
    empty_model,
    identity_keymap,
    load_component,
    open_sharded,
    plan_files,
)

INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_FILE = "config.json"
INT8_FOLDER = "base_model_int8"
# The DiT folders of each version, relative to its model folder (spec §2.1).
DIT_FOLDERS: dict[str, tuple[str, ...]] = {
    "1.5": ("base_model",),
    "1.0": ("avatar_single", "avatar_multi"),
}


def read_config(root: Path, folder: str) -> LongCatAvatarConfig:
    """`folder/config.json` under root; ModelMissing when absent, CheckpointError when not understood."""
    path = root / folder / CONFIG_FILE
    if not path.is_file():
        raise ModelMissing(f"missing checkpoint file {folder}/{CONFIG_FILE} (looked for {path})")
    return LongCatAvatarConfig.from_json(path, name=f"{folder}/{CONFIG_FILE}")


def dit_component(root: Path, folder: str) -> Component:
    """The DiT tensors of `folder` (sharded safetensors through its index), keys as stored."""
    if folder == INT8_FOLDER:
        raise CheckpointError(
            "the INT8 DiT (base_model_int8/) is readable safetensors but needs a per-call dequantizing "
            "linear (spec 2.6) that is not implemented; use base_model/",
            file=folder,
        )
    plan = Plan()
    index = f"{folder}/{INDEX_FILE}"
    files = open_sharded(root, index, plan)
    plan_files(files, identity_keymap, plan)
    return Component("dit", files, plan, lambda _key: index)


def build_empty(config: LongCatAvatarConfig) -> LongCatAvatarTransformer:
    """The DiT with its parameters on the meta device (no memory)."""
    with empty_model():
        return LongCatAvatarTransformer(config)


@dataclass(frozen=True)
class DiTCheck:
    """What `weights verify` reports for one DiT folder."""

    folder: str
    config: LongCatAvatarConfig | None
    problems: list[Problem]


def dit_problems(root: Path, folder: str) -> DiTCheck:
    """Every problem of `folder` (config, index, shards, keys, shapes) without reading a tensor."""
    try:
        config = read_config(root, folder)
    except (ModelMissing, CheckpointError) as err:
        kind = "missing_file" if isinstance(err, ModelMissing) else "bad_file"
        return DiTCheck(folder, None, [Problem(kind, f"{folder}/{CONFIG_FILE}", None, str(err.message))])
    component = dit_component(root, folder)
    try:
        return DiTCheck(folder, config, check_component(component, build_empty(config)))
    finally:
        component.close()


def load_dit(
    root: Path, folder: str, *, device: torch.device, dtype: torch.dtype = torch.bfloat16
) -> LongCatAvatarTransformer:
    """The DiT of `root/folder`, strictly: raises the first problem as ModelMissing/CheckpointError (naming
    file and key) before reading any tensor. `dtype` is the rounding dtype of the run (bf16 as published)."""
    config = read_config(root, folder)
    component = dit_component(root, folder)
    model = build_empty(config)
    try:
        load_component(component, model, device=device, dtype=dtype)
    finally:
        component.close()
    return model
