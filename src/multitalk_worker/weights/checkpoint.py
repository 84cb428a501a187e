"""Checkpoint files read lazily, key plans, and loading into models built on the meta device.

A *plan* says, for every tensor a model expects, which file and key it comes from and how it is converted
(renamed, split, reshaped). The same plan serves `verify` (shapes only, read from safetensors headers or a
memory-mapped .pth) and loading (one tensor at a time, converted straight to the target device and dtype,
then assigned into a meta-built model), so a 14B model never exists twice in memory.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn

from multitalk_worker.errors import CheckpointError, ModelMissing

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]
Convert = Callable[[torch.Tensor], torch.Tensor]
ProblemKind = Literal["missing_file", "bad_file", "missing_tensor", "unexpected_tensor", "wrong_shape"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint folder."""

    kind: ProblemKind
    file: str
    key: str | None = None
    detail: str = ""

    def __str__(self) -> str:
        where = f"{self.file}" + (f" [{self.key}]" if self.key else "")
        return f"{self.kind}: {where}" + (f": {self.detail}" if self.detail else "")

    def to_error(self) -> CheckpointError | ModelMissing:
        if self.kind == "missing_file":
            return ModelMissing(
                f"missing checkpoint file {self.file}" + (f": {self.detail}" if self.detail else "")
            )
        return CheckpointError(
            f"{self.kind.replace('_', ' ')}: {self.detail}".rstrip(": "), file=self.file, key=self.key
        )


def raise_first(problems: list[Problem]) -> None:
    """Raise the first problem as its typed error, mentioning how many more there are."""
    if not problems:
        return
    error = problems[0].to_error()
    if len(problems) > 1:
        error.args = (f"{error.args[0]} (and {len(problems) - 1} more problems; run `weights verify`)",)
        error.message = error.args[0]
    raise error


class TensorFile:
    """One checkpoint file (safetensors or torch .pth), opened lazily.

    safetensors: only the header is parsed until a tensor is read. .pth: memory-mapped with
    `weights_only=True`, so shapes come without reading the data.
    """

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name  # path relative to the checkpoint root, for messages
        if not path.is_file():
            raise ModelMissing(f"missing checkpoint file {name} (looked for {path})")
        self._safetensors = path.suffix == ".safetensors"
        self._handle: safe_open | None = None
        self._pth: Mapping[str, torch.Tensor] | None = None

    def _open(self) -> None:
        if self._handle is not None or self._pth is not None:
            return
        try:
            if self._safetensors:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            else:
                self._pth = _load_pth(self.path)
        except (OSError, RuntimeError, ValueError, EOFError) as err:
            raise CheckpointError(f"cannot read checkpoint: {err}", file=self.name) from err

    def shapes(self) -> dict[str, Shape]:
        self._open()
        if self._handle is not None:
            return {k: tuple(self._handle.get_slice(k).get_shape()) for k in self._handle.keys()}
        assert self._pth is not None
        return {k: tuple(v.shape) for k, v in self._pth.items()}

    def get(self, key: str) -> torch.Tensor:
        self._open()
        if self._handle is not None:
            return self._handle.get_tensor(key)
        assert self._pth is not None
        return self._pth[key]

    def close(self) -> None:
        self._handle = None
        self._pth = None


def _load_pth(path: Path) -> Mapping[str, torch.Tensor]:
    """A torch-saved state dict, memory-mapped when the file is in the zip format."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        logger.warning("%s is not in the zip format; reading it whole", path.name)
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("expected a flat state dict of tensors")
    return state


@dataclass(frozen=True)
class Entry:
    """One model tensor: where it comes from and how it is converted."""

    target: str
    file: str
    source: str
    shape: Shape  # shape after conversion
    convert: Convert | None = None


@dataclass
class Plan:
    """Every tensor of one model, plus the checkpoint keys that are known to be unused."""

    entries: list[Entry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    ignored: int = 0
    unavailable: set[str] = field(default_factory=set)  # keys of files already reported missing
    # model keys whose file is already reported missing, by rule (when the file's key list is unknown)
    unavailable_if: list[Callable[[str], bool]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # index entries not read, per file named
    notes: list[str] = field(default_factory=list)  # loadable, but worth saying (verify prints them)

    def is_unavailable(self, key: str) -> bool:
        return key in self.unavailable or any(rule(key) for rule in self.unavailable_if)


@dataclass
class Component:
    """The checkpoint side of one model: its open files, its plan, and where a missing key belongs."""

    name: str
    files: dict[str, TensorFile]
    plan: Plan
    home: Callable[[str], str]  # model key -> the file that should hold it (for messages)
    tied: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        for tensor_file in self.files.values():
            tensor_file.close()


def open_files(root: Path, names: list[str], plan: Plan) -> dict[str, TensorFile]:
    """Open each of `names` (relative to root); a missing or unreadable one becomes a problem of `plan`."""
    files: dict[str, TensorFile] = {}
    for name in names:
        try:
            files[name] = TensorFile(root / name, name)
            files[name].shapes()
        except ModelMissing as err:
            plan.problems.append(Problem("missing_file", name, None, str(err.message)))
            files.pop(name, None)
        except CheckpointError as err:
            plan.problems.append(Problem("bad_file", name, None, str(err.message)))
            files.pop(name, None)
    return files


KeyMap = Callable[[str, Shape], "list[tuple[str, Shape, Convert | None]] | None"]
"""Maps one checkpoint key and shape to model targets; [] = known-unused key, None = unexpected key."""


def plan_files(
    files: Mapping[str, TensorFile],
    keymap: KeyMap,
    plan: Plan | None = None,
    *,
    unexpected: str = "not part of the model",
) -> Plan:
    """Apply `keymap` to every tensor of `files` (name -> file); `unexpected` says why a key is refused."""
    plan = plan or Plan()
    for name, tensor_file in files.items():
        for key, shape in tensor_file.shapes().items():
            targets = keymap(key, shape)
            if targets is None:
                plan.problems.append(Problem("unexpected_tensor", name, key, unexpected))
            elif not targets:
                plan.ignored += 1
            for target, target_shape, convert in targets or []:
                plan.entries.append(Entry(target, name, key, target_shape, convert))
    return plan


def single_file_component(
    name: str, root: Path, file: str, keymap: KeyMap, tied: Mapping[str, str] | None = None
) -> Component:
    """A component whose tensors all come from one file (relative to root), named in every message."""
    plan = Plan()
    files = open_files(root, [file], plan)
    plan_files(files, keymap, plan)
    return Component(name, files, plan, lambda _key: file, dict(tied or {}))


def check_plan(plan: Plan, expected: Mapping[str, Shape], home: Callable[[str], str]) -> list[Problem]:
    """Missing, duplicated and wrongly shaped tensors of `plan` against the model's expected shapes."""
    problems = list(plan.problems)
    seen: dict[str, Entry] = {}
    for entry in plan.entries:
        if entry.target in seen:
            first = seen[entry.target]
            problems.append(
                Problem(
                    "unexpected_tensor",
                    entry.file,
                    entry.source,
                    f"duplicate of {first.file} [{first.source}]",
                )
            )
            continue
        seen[entry.target] = entry
        want = expected.get(entry.target)
        if want is None:
            problems.append(Problem("unexpected_tensor", entry.file, entry.source, "not part of the model"))
        elif tuple(want) != entry.shape:
            problems.append(
                Problem(
                    "wrong_shape",
                    entry.file,
                    entry.source,
                    f"shape {list(entry.shape)}, expected {list(want)}",
                )
            )
    for target in expected:
        if target not in seen and not plan.is_unavailable(target):
            problems.append(Problem("missing_tensor", home(target), target, "required by the model"))
    return problems


@contextmanager
def empty_model() -> Iterator[None]:
    """Build modules with parameters on the meta device (no memory); buffers are created for real."""
    with init_empty_weights(include_buffers=False):
        yield


def expected_shapes(model: nn.Module) -> dict[str, Shape]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_component(component: Component, model: nn.Module) -> list[Problem]:
    """Every problem of `component` against a (meta-built) model."""
    expected = expected_shapes(model)
    for key in component.tied:
        expected.pop(key, None)
    return check_plan(component.plan, expected, component.home)


def load_component(
    component: Component, model: nn.Module, *, device: torch.device, dtype: torch.dtype
) -> None:
    """Check `component` against `model`, then read, convert and assign every tensor.

    Floating-point tensors are cast to `dtype`; tensors are moved to `device` one at a time. `tied` keys
    share the tensor of the key they name (e.g. umT5's embed_tokens -> shared).
    """
    raise_first(check_component(component, model))
    state = read_state(component, device=device, dtype=dtype)
    for key, source in component.tied.items():
        state[key] = state[source]
    assign_state(model, state, device=device)


def read_state(component: Component, *, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every planned tensor of a checked `component`, converted, one at a time, to `device` and `dtype`."""
    state: dict[str, torch.Tensor] = {}
    for entry in component.plan.entries:
        tensor = component.files[entry.file].get(entry.source)
        if entry.convert is not None:
            tensor = entry.convert(tensor)
        state[entry.target] = _to_target(tensor, device, dtype)
        del tensor
    return state


def _to_target(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A fresh copy on `device`; floating-point tensors in `dtype`, others in their own dtype."""
    target_dtype = dtype if tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=device, dtype=target_dtype, copy=True)


def assign_state(model: nn.Module, state: dict[str, torch.Tensor], *, device: torch.device) -> None:
    """Assign `state` (already on `device`, complete) into a meta-built model; eval mode, no grads."""
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device)  # buffers that were built for real (not from the checkpoint)
    model.eval().requires_grad_(False)


def read_index(path: Path, name: str) -> dict[str, str]:
    """`weight_map` of a safetensors index json (tensor key -> shard file name)."""
    if not path.is_file():
        raise ModelMissing(f"missing checkpoint file {name} (looked for {path})")
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"not a safetensors index json: {err}", file=name) from err
    if not isinstance(weight_map, dict):
        raise CheckpointError("weight_map is not an object", file=name)
    return {str(k): str(v) for k, v in weight_map.items()}


def open_sharded(
    root: Path, index_name: str, plan: Plan, skip: Collection[str] = ()
) -> dict[str, TensorFile]:
    """Open the shards an index json names (paths relative to root); check that every key the index lists
    is in the shard it names. Entries naming a file in `skip` are not read (counted in `plan.skipped`)."""
    folder = str(Path(index_name).parent)
    prefix = "" if folder == "." else folder + "/"
    weight_map = {k: prefix + v for k, v in read_index(root / index_name, index_name).items()}
    for shard in weight_map.values():
        if shard in skip:
            plan.skipped[shard] = plan.skipped.get(shard, 0) + 1
    weight_map = {k: v for k, v in weight_map.items() if v not in skip}
    names = sorted(set(weight_map.values()))
    files = open_files(root, names, plan)
    plan.unavailable |= {key for key, shard in weight_map.items() if shard not in files}
    shapes = {name: f.shapes() for name, f in files.items()}
    for key, shard in weight_map.items():
        if shard in shapes and key not in shapes[shard]:
            plan.problems.append(
                Problem("missing_tensor", shard, key, "listed in the index but not in the shard")
            )
    return files


def identity_keymap(key: str, shape: Shape) -> list[tuple[str, Shape, Convert | None]]:
    return [(key, shape, None)]


def open_unindexed_shards(root: Path, stem: str, plan: Plan) -> tuple[dict[str, TensorFile], bool]:
    """With no index json: the shards `<stem>-0000i-of-0000N.safetensors` in root, i = 1..N, N read from
    the names found (the InfiniteTalk reference hard-codes Wan's seven and reads no index, spec IT 2.1).
    Returns the open files and whether all N were there; each missing one is a problem naming it, and
    shards of two different counts (two checkpoints mixed) are refused."""
    pattern = re.compile(re.escape(stem) + r"-(\d{5})-of-(\d{5})\.safetensors")
    counts = sorted(
        {int(m[2]) for p in root.glob(f"{stem}-*-of-*.safetensors") if (m := pattern.fullmatch(p.name))}
    )
    where = f"{stem}-*-of-*.safetensors"
    if len(counts) != 1:
        detail = (
            f"shards of {len(counts)} different counts ({', '.join(map(str, counts))}) and no index json"
            if counts
            else "no index json and no shards"
        )
        plan.problems.append(Problem("missing_file" if not counts else "bad_file", where, None, detail))
        return {}, False
    names = [f"{stem}-{i:05d}-of-{counts[0]:05d}.safetensors" for i in range(1, counts[0] + 1)]
    files = open_files(root, names, plan)
    return files, len(files) == len(names)
