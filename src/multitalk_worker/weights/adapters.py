"""Audio adapters: the tensors a model adds to the Wan base, read from one file chosen in the registry.

Every model of the registry uses the same module tree, so every adapter file holds the same keys (spec MT 8.2,
IT 2.3): per block `blocks.N.audio_cross_attn.{q_linear,kv_linear,proj}.{weight,bias}` and
`blocks.N.norm_x.{weight,bias}`, and `audio_proj.{proj1,proj1_vf,proj2,proj3,norm}.{weight,bias}`: 8·L + 10
tensors (330 for the 14B DiT). The rules, one place each:

* the audio tensors come always and only from the chosen adapter file (`registry.Adapter.file`, relative to
  the model folder root in both layouts), loaded strictly: a missing key, a key that is not an audio key of
  this DiT, or a wrong shape is a CheckpointError naming the file and the key;
* index entries that point at any adapter file of the registry (MeiGen's MultiTalk index maps the audio keys
  to multitalk.safetensors) are not read as base shards, so MeiGen's index serves every model;
* an audio key that also sits in a base shard is not used: the adapter's replaces it, as in the reference,
  which reads the shards, then the adapter file, into one dict where a later file overwrites (spec IT 2.2
  step 3). The published Wan shards hold no audio key, so this only happens with a merged or repackaged
  base; it is said (a verify note, a load warning), not refused, because the result is the reference's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from multitalk_worker.errors import CheckpointError
from multitalk_worker.models.configs import MultiTalkConfig
from multitalk_worker.models.transformer import MultiTalkTransformer
from multitalk_worker.registry import MODELS, Adapter, all_adapters, get_model
from multitalk_worker.weights.checkpoint import (
    Component,
    Convert,
    Plan,
    Problem,
    Shape,
    TensorFile,
    check_plan,
    empty_model,
    expected_shapes,
    open_files,
    plan_files,
    raise_first,
    read_state,
)

logger = logging.getLogger(__name__)

KeyTargets = list[tuple[str, Shape, Convert | None]]
_BLOCK_AUDIO_KEY = re.compile(r"blocks\.\d+\.(audio_cross_attn|norm_x)\.")


def is_audio_key(key: str) -> bool:
    """True for an adapter key: audio_proj.*, blocks.N.audio_cross_attn.*, blocks.N.norm_x.*."""
    return key.startswith("audio_proj.") or _BLOCK_AUDIO_KEY.match(key) is not None


def adapter_files() -> frozenset[str]:
    """Every adapter file the registry names (never read as a base shard)."""
    return frozenset(all_adapters())


def resolve_adapter(model: str, adapter: str | None = None, *, persons: int = 1) -> Adapter:
    """The registry's adapter `adapter` of `model`, or by default the one meant for `persons` speakers."""
    return get_model(model).adapter(adapter, persons=persons)


def audio_shapes(config: MultiTalkConfig) -> dict[str, Shape]:
    """The adapter tensors the DiT of `config` expects, by key (built on the meta device)."""
    with empty_model():
        dit = MultiTalkTransformer(config.dit)
    return {key: shape for key, shape in expected_shapes(dit).items() if is_audio_key(key)}


def _adapter_keymap(key: str, shape: Shape) -> KeyTargets | None:
    return [(key, shape, None)] if is_audio_key(key) else None


def plan_adapter(root: Path, file: str, plan: Plan) -> dict[str, TensorFile]:
    """Open the adapter `file` (relative to root) and plan its tensors into `plan`; a missing file is one
    problem, and then no audio key is reported missing on its own."""
    if not (root / file).is_file():
        known = all_adapters().get(file)
        what = f"{known.what}, published in {known.hub_repo}" if known else "audio adapter"
        plan.problems.append(Problem("missing_file", file, None, f"{what} (looked for {root / file})"))
        plan.unavailable_if.append(is_audio_key)
        return {}
    files = open_files(root, [file], plan)
    if file not in files:  # unreadable: reported once, as a bad file
        plan.unavailable_if.append(is_audio_key)
    plan_files(files, _adapter_keymap, plan, unexpected="not an audio-adapter key")
    return files


def adapter_component(root: Path, file: str) -> Component:
    """One adapter file alone, as a component (for verify and for swapping adapters)."""
    plan = Plan()
    files = plan_adapter(root, file, plan)
    return Component("dit", files, plan, lambda _key: file)


def with_adapter(base: Component, root: Path, file: str) -> Component:
    """The DiT: `base` (its audio keys already dropped) plus the adapter `file`."""
    files = {**base.files, **plan_adapter(root, file, base.plan)}
    base.plan.notes += skipped_notes(base.plan, (file,))
    base_home = base.home

    def home(key: str) -> str:
        return file if is_audio_key(key) else base_home(key)

    return Component("dit", files, base.plan, home)


def skipped_notes(plan: Plan, used: tuple[str, ...]) -> list[str]:
    """A note for each adapter file the DiT index points at that is not one of the `used` adapters."""
    return [
        f"the DiT index maps {count} keys to {file}; not read: the audio layers come from {', '.join(used)}"
        for file, count in plan.skipped.items()
        if file not in used
    ]


def plan_base(files: Mapping[str, TensorFile], rename: Callable[[str], str | None], plan: Plan) -> None:
    """Plan the Wan base shards: non-audio keys through `rename` (None = not a model key), audio keys
    dropped (the adapter replaces them; a note says so)."""
    shadowed: list[str] = []

    def keymap(key: str, shape: Shape) -> KeyTargets | None:
        if is_audio_key(key):
            shadowed.append(key)
            return []
        target = rename(key)
        return None if target is None else [(target, shape, None)]

    plan_files(files, keymap, plan)
    if shadowed:
        note = (
            f"{len(shadowed)} audio-adapter tensors in the base shards (first: {shadowed[0]}) are not used: "
            "the adapter file's replace them, as in the reference (a later file overwrites)"
        )
        logger.warning("%s", note)
        plan.notes.append(note)


def check_adapter(root: str | Path, adapter: Adapter, config: MultiTalkConfig) -> list[Problem]:
    """Every problem of one adapter file against the DiT of `config` (headers only)."""
    component = adapter_component(Path(root), adapter.file)
    try:
        return check_plan(component.plan, audio_shapes(config), component.home)
    finally:
        component.close()


def load_adapter_state(
    root: str | Path,
    adapter: Adapter,
    config: MultiTalkConfig,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """The adapter file's tensors (8·L + 10 of them) as a state dict in `dtype` on `device`, checked
    strictly against the DiT of `config` first (a CheckpointError or ModelMissing names file and key)."""
    component = adapter_component(Path(root), adapter.file)
    try:
        raise_first(check_plan(component.plan, audio_shapes(config), component.home))
        return read_state(component, device=torch.device(device), dtype=dtype)
    finally:
        component.close()


def available_adapters(root: str | Path, model: str | None = None) -> list[Adapter]:
    """The registry's adapters (of `model`, or of every model) whose file is in the folder, in registry
    order. Presence only: `weights verify` checks the contents."""
    specs = [get_model(model)] if model is not None else list(MODELS.values())
    return [a for spec in specs for a in spec.adapters if (Path(root) / a.file).is_file()]


@torch.no_grad()
def apply_adapter_state(dit: MultiTalkTransformer, state: Mapping[str, torch.Tensor]) -> None:
    """Copy an adapter state into a loaded DiT in place (each parameter keeps its dtype and device). The
    keys and shapes must be exactly the DiT's audio tensors."""
    params = {k: v for k, v in dit.state_dict().items() if is_audio_key(k)}
    missing, extra = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or extra:
        key = (missing or extra)[0]
        what = "missing tensor" if missing else "unexpected tensor"
        raise CheckpointError(f"adapter state: {what} ({len(missing)} missing, {len(extra)} extra)", key=key)
    for key, value in state.items():
        if tuple(value.shape) != tuple(params[key].shape):
            raise CheckpointError(
                f"adapter state: shape {list(value.shape)}, expected {list(params[key].shape)}", key=key
            )
    for key, value in state.items():
        params[key].copy_(value)
