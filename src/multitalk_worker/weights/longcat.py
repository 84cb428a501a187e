"""LongCat-Video-Avatar DiT folders as published on the Hugging Face Hub (spec §2.1, §2.2, §2.11).

    LongCat-Video-Avatar-1.5/base_model/       config.json, diffusion_pytorch_model-0000{1..6}-of-00006
                                               .safetensors, diffusion_pytorch_model.safetensors.index.json
    LongCat-Video-Avatar-1.5/base_model_int8/  config.json, quantization_config.json, 4 shards
                                               quantized_model-*.safetensors + index (not loaded, see below)
    LongCat-Video-Avatar/avatar_single/, avatar_multi/   v1.0: the same layout as base_model/

Keys are the model's own (no renaming): every tensor of the index is read strictly through one `Plan`,
the same one `dit_problems` (for `weights verify`) checks, so missing, unexpected and wrongly shaped keys are
named by file and key before anything is read.

INT8 (`base_model_int8/`, spec §2.6): plain safetensors (int8 `<linear>.weight_int8`, float32
`<linear>.weight_scale`, bf16 biases and the other tensors), read with safetensors through the same Plan;
the quantized linears become `models.longcat.int8.Int8Linear`, whose buffers keep their stored dtypes (the
weight is rebuilt per call in the input's dtype, as the reference does); every other tensor takes `dtype`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from multitalk_worker.errors import CheckpointError, ModelMissing
from multitalk_worker.models.longcat.config import LongCatAvatarConfig
from multitalk_worker.models.longcat.int8 import Int8Linear, swap_in_int8
from multitalk_worker.models.longcat.transformer import LongCatAvatarTransformer
from multitalk_worker.weights.checkpoint import (
    Component,
    Plan,
    Problem,
    assign_state,
    check_component,
    empty_model,
    identity_keymap,
    load_component,
    open_sharded,
    plan_files,
    raise_first,
)

INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
INT8_INDEX_FILE = "quantized_model.safetensors.index.json"
CONFIG_FILE = "config.json"
INT8_FOLDER = "base_model_int8"
# The DiT folders of each version, relative to its model folder (spec §2.1): required ones, then optional
# ones (the 1.5 INT8 DiT is an alternative to base_model/, used with the reference's --use_int8).
DIT_FOLDERS: dict[str, tuple[str, ...]] = {
    "1.5": ("base_model",),
    "1.0": ("avatar_single", "avatar_multi"),
}
OPTIONAL_DIT_FOLDERS: dict[str, tuple[str, ...]] = {"1.5": (INT8_FOLDER,), "1.0": ()}


def read_config(root: Path, folder: str) -> LongCatAvatarConfig:
    """`folder/config.json` under root; ModelMissing when absent, CheckpointError when not understood."""
    path = root / folder / CONFIG_FILE
    if not path.is_file():
        raise ModelMissing(f"missing checkpoint file {folder}/{CONFIG_FILE} (looked for {path})")
    return LongCatAvatarConfig.from_json(path, name=f"{folder}/{CONFIG_FILE}")


def dit_component(root: Path, folder: str) -> Component:
    """The DiT tensors of `folder` (sharded safetensors through its index), keys as stored."""
    plan = Plan()
    index = f"{folder}/{INT8_INDEX_FILE if folder == INT8_FOLDER else INDEX_FILE}"
    files = open_sharded(root, index, plan)
    plan_files(files, identity_keymap, plan)
    return Component("dit", files, plan, lambda _key: index)


def build_empty(config: LongCatAvatarConfig, *, int8: bool = False) -> LongCatAvatarTransformer:
    """The DiT with its parameters on the meta device (no memory); with `int8`, its quantized linears as
    Int8Linear shells (spec §2.6)."""
    with empty_model():
        model = LongCatAvatarTransformer(config)
    if int8:
        swap_in_int8(model)
    return model


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
        model = build_empty(config, int8=folder == INT8_FOLDER)
        return DiTCheck(folder, config, check_component(component, model))
    finally:
        component.close()


def verify_dits(root: Path, version: str) -> list[DiTCheck]:
    """`weights verify` for the DiTs of one version ("1.5" or "1.0"): each required folder, and each
    optional folder that is present. Raises ValueError for an unknown version."""
    if version not in DIT_FOLDERS:
        raise ValueError(
            f"unknown LongCat-Video-Avatar version {version!r}; accepted: {', '.join(DIT_FOLDERS)}"
        )
    present = [f for f in OPTIONAL_DIT_FOLDERS[version] if (root / f).is_dir()]
    return [dit_problems(root, folder) for folder in (*DIT_FOLDERS[version], *present)]


def load_dit(
    root: Path, folder: str, *, device: torch.device, dtype: torch.dtype = torch.bfloat16
) -> LongCatAvatarTransformer:
    """The DiT of `root/folder`, strictly: raises the first problem as ModelMissing/CheckpointError (naming
    file and key) before reading any tensor. `dtype` is the rounding dtype of the run (bf16 as published)."""
    config = read_config(root, folder)
    int8 = folder == INT8_FOLDER
    component = dit_component(root, folder)
    model = build_empty(config, int8=int8)
    try:
        if int8:
            _load_int8(component, model, device=device, dtype=dtype)
        else:
            load_component(component, model, device=device, dtype=dtype)
    finally:
        component.close()
    return model


def _load_int8(
    component: Component, model: LongCatAvatarTransformer, *, device: torch.device, dtype: torch.dtype
) -> None:
    """Checked like any component; Int8Linear buffers keep their stored dtypes, other tensors take `dtype`."""
    raise_first(check_component(component, model))
    stored = {
        f"{name}.{buffer}"
        for name, module in model.named_modules()
        if isinstance(module, Int8Linear)
        for buffer in ("weight_int8", "weight_scale", "bias")
    }
    state = {}
    for entry in component.plan.entries:
        tensor = component.files[entry.file].get(entry.source)
        keep = entry.target in stored or not tensor.is_floating_point()
        state[entry.target] = tensor.to(device=device, dtype=tensor.dtype if keep else dtype, copy=True)
    assign_state(model, state, device=device)
