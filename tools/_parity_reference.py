"""Import the official MultiTalk or InfiniteTalk code from a checkout and run it on a CPU (parity tool only).

Which of the two a checkout is follows from its entry script (generate_multitalk.py or
generate_infinitetalk.py); both trees share the module layout patched below.

The checkout is never modified. Its CUDA-only pieces are replaced at run time, as anyone running it on a
CPU would have to:

* ``xfuser`` (sequence parallelism) and ``xformers`` become small modules in ``sys.modules``;
  ``xformers.ops.memory_efficient_attention`` is computed with torch's scaled_dot_product_attention.
* ``flash_attention`` (FlashAttention 2/3, CUDA only) is replaced, in the modules that imported it, by an
  SDPA version with the same casts (half inputs as flash-attn casts them; a float32 run stays float32,
  which flash-attn itself cannot do).
* ``torch.compile`` is the identity while the checkout is imported: ``calculate_x_ref_attn_map`` runs eagerly.
* ``torch.cuda.amp.autocast`` (a no-op without CUDA) is emulated: inside an enabled float32 region the
  inputs of matrix products, convolutions and layer norms are cast to float32 (and so is the result), as
  CUDA autocast does. InfiniteTalk's audio-projector output norm runs in such a region (its spec 3.1).
* ``torch_gc`` (CUDA cache calls) is a no-op; ``torch.cuda.current_device`` answers ``"cpu"`` while
  ``t5.py`` is imported (it is evaluated as a default argument).
* Modules the stages never call but the checkout imports at module level (``optimum.quanto``,
  ``torchvision``, ``soundfile``) are provided as minimal modules when not installed, only during the
  import; ``torchvision.transforms.Normalize`` (CLIP preprocessing) is the one piece used, computed exactly.
* The package ``__init__`` files (which import every pipeline) are skipped: ``wan``, ``wan.modules``,
  ``wan.utils``, ``src``, ``src.audio_analysis`` are registered as bare packages.
* ``get_embedding`` (the entry script) and ``to_param_dtype_fp32only`` (wan/multitalk.py) are
  compiled alone from the scripts' source: the scripts' own imports pull in TTS, distributed and video
  packages that these functions do not use.
* transformers >= 5 collects ``hidden_states`` with hooks that the reference's Wav2Vec2Model subclass
  bypasses (it overrides ``forward``); the library's ``capture_outputs`` decorator is applied to it.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

_HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- attention replacements


def _sdpa_bmhk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
    """SDPA on [B, M, H, K] tensors (the flash-attn / xformers layout)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)
    return out.transpose(1, 2)


def flash_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lens: torch.Tensor | None = None,
    k_lens: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    q_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    deterministic: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    version: int | None = None,
) -> torch.Tensor:
    """Same contract as ``wan.modules.attention.flash_attention`` ([B, L, N, C] in and out, output in q's
    dtype). Half inputs are cast like the original (q, k to v's dtype); float32 inputs stay float32."""
    if window_size != (-1, -1) or dropout_p != 0.0 or q_lens is not None:
        raise RuntimeError("parity: flash_attention_cpu supports full-window, dropout-free calls only")
    out_dtype = q.dtype
    if v.dtype in _HALF or q.dtype in _HALF or k.dtype in _HALF:
        q, k, v = (t if t.dtype in _HALF else t.to(dtype) for t in (q, k, v))
        q, k = q.to(v.dtype), k.to(v.dtype)
    if q_scale is not None:
        q = q * q_scale
    mask = None
    if k_lens is not None and bool((k_lens < k.size(1)).any()):
        keep = torch.arange(k.size(1))[None, :] < k_lens.to(torch.long)[:, None]  # [B, Lk]
        mask = keep[:, None, None, :]
    out = _sdpa_bmhk(q, k, v, attn_mask=mask, is_causal=causal, scale=softmax_scale)
    return out.type(out_dtype)


def memory_efficient_attention_cpu(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: Any = None,
    p: float = 0.0,
    scale: float | None = None,
    op: Any = None,
) -> torch.Tensor:
    """``xformers.ops.memory_efficient_attention`` for [B, M, H, K] inputs without a bias."""
    if attn_bias is not None or p != 0.0:
        raise RuntimeError("parity: memory_efficient_attention_cpu supports bias-free, dropout-free calls")
    return _sdpa_bmhk(query, key, value, scale=scale)


# --------------------------------------------------------------------------- autocast emulation

_CAST_FUNCS: frozenset[Callable[..., Any]] = frozenset(
    {
        F.linear,
        torch.matmul,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.mm,
        torch.bmm,
        torch.addmm,
        torch.baddbmm,
        torch.einsum,
        F.conv1d,
        F.conv2d,
        F.conv3d,
        F.scaled_dot_product_attention,
        F.layer_norm,  # on CUDA autocast's float32 list: float32 inputs and output in any region
    }
)
_AUTOCAST_STACK: list[tuple[bool, torch.dtype]] = []


class _CastMode(TorchFunctionMode):
    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if _AUTOCAST_STACK and _AUTOCAST_STACK[-1][0] and func in _CAST_FUNCS:
            target = _AUTOCAST_STACK[-1][1]

            def cast(x: Any) -> Any:
                if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != target:
                    return x.to(target)
                return x

            args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
        return func(*args, **kwargs)


class CudaAutocastOnCpu(contextlib.ContextDecorator):
    """``torch.cuda.amp.autocast`` for the float32 regions of the reference: matrix products and
    convolutions get float32 inputs (bf16 weights are upcast), everything else runs unchanged."""

    def __init__(self, enabled: bool = True, dtype: torch.dtype = torch.float16, cache_enabled: bool = True):
        if enabled and dtype != torch.float32:
            raise RuntimeError(f"parity: autocast to {dtype} is not emulated (only float32 regions are)")
        self.enabled, self.dtype = enabled, dtype
        self._mode: _CastMode | None = None

    def __enter__(self) -> CudaAutocastOnCpu:
        _AUTOCAST_STACK.append((self.enabled, self.dtype))
        self._mode = _CastMode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._mode is not None
        self._mode.__exit__(*exc)
        _AUTOCAST_STACK.pop()


# --------------------------------------------------------------------------- module installation


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package="__path__" in attrs)
    mod.__dict__.update(attrs)
    return mod


def _unavailable(what: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"parity: {what} is not available in the CPU parity run")

    return call


def _normalize(mean: list[float], std: list[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """torchvision.transforms.Normalize on a [B, C, H, W] tensor (sub then div, per channel)."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        m = torch.as_tensor(mean, dtype=x.dtype)[:, None, None]
        s = torch.as_tensor(std, dtype=x.dtype)[:, None, None]
        return x.sub(m).div(s)

    return apply


@contextlib.contextmanager
def _shims() -> Iterator[None]:
    """Stand-in modules, visible in sys.modules only while the checkout is imported (the reference
    modules keep their own references; nothing imported later sees them)."""
    before = dict(sys.modules)
    installed = _install_shims()
    try:
        yield
    finally:
        for name in installed:
            if name in before:
                sys.modules[name] = before[name]
            else:
                sys.modules.pop(name, None)


def _install_shims() -> list[str]:
    """Install the stand-in modules; return their names."""
    before = set(sys.modules)
    always = (
        "xfuser",
        "xfuser.core",
        "xfuser.core.distributed",
        "xformers",
        "xformers.ops",
        "xformers.ops.fmha",
        "xformers.ops.fmha.attn_bias",
    )
    sp = _unavailable("xfuser sequence parallelism")
    dist = _module(
        "xfuser.core.distributed",
        get_sequence_parallel_rank=sp,
        get_sequence_parallel_world_size=sp,
        get_sp_group=sp,
    )
    sys.modules["xfuser"] = _module("xfuser", __path__=[])
    sys.modules["xfuser.core"] = _module("xfuser.core", __path__=[], distributed=dist)
    sys.modules["xfuser.core.distributed"] = dist
    attn_bias = _module("xformers.ops.fmha.attn_bias", BlockDiagonalMask=None)
    fmha = _module("xformers.ops.fmha", __path__=[], attn_bias=attn_bias)
    ops = _module(
        "xformers.ops", __path__=[], fmha=fmha, memory_efficient_attention=memory_efficient_attention_cpu
    )
    sys.modules.update(
        {
            "xformers": _module("xformers", __path__=[], ops=ops),
            "xformers.ops": ops,
            "xformers.ops.fmha": fmha,
            "xformers.ops.fmha.attn_bias": attn_bias,
        }
    )
    _install_if_missing(
        "optimum.quanto",
        lambda: _module(
            "optimum.quanto",
            quantize=_unavailable("quanto"),
            freeze=_unavailable("quanto"),
            requantize=_unavailable("quanto"),
            qint8=None,
        ),
        parent=lambda: _module("optimum", __path__=[]),
    )
    _install_if_missing(
        "torchvision",
        lambda: _module("torchvision", __path__=[], transforms=_torchvision_transforms()),
        child=("torchvision.transforms", _torchvision_transforms),
    )
    _install_if_missing("soundfile", lambda: _module("soundfile", write=_unavailable("soundfile")))
    optional = ("optimum", "torchvision", "soundfile")
    return list(always) + [n for n in sys.modules if n not in before and n.split(".")[0] in optional]


def _torchvision_transforms() -> types.ModuleType:
    if "torchvision.transforms" in sys.modules:
        return sys.modules["torchvision.transforms"]
    mode = types.SimpleNamespace(BICUBIC="bicubic", BILINEAR="bilinear", NEAREST="nearest")
    return _module(
        "torchvision.transforms",
        Compose=lambda ts: types.SimpleNamespace(transforms=list(ts)),
        Resize=lambda *a, **k: _unavailable("torchvision Resize"),
        ToTensor=lambda *a, **k: _unavailable("torchvision ToTensor"),
        Normalize=lambda mean, std: _normalize(mean, std),
        InterpolationMode=mode,
    )


def _install_if_missing(
    name: str,
    build: Callable[[], types.ModuleType],
    parent: Callable[[], types.ModuleType] | None = None,
    child: tuple[str, Callable[[], types.ModuleType]] | None = None,
) -> None:
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass
    if parent is not None:
        sys.modules.setdefault(name.rsplit(".", 1)[0], parent())
    if child is not None:
        sys.modules[child[0]] = child[1]()
    sys.modules[name] = build()


def _namespace_package(name: str, path: Path) -> None:
    """Register `name` as a package rooted at `path` without executing its __init__.py (the checkout's
    package __init__ files import every pipeline and their GPU dependencies)."""
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(path)]
    pkg.__package__ = name
    sys.modules[name] = pkg


@contextlib.contextmanager
def _import_time_patches() -> Iterator[None]:
    compile_, current_device, autocast = torch.compile, torch.cuda.current_device, torch.cuda.amp.autocast

    def no_compile(fn: Any = None, **kwargs: Any) -> Any:
        return fn if fn is not None else (lambda f: f)

    torch.compile = no_compile  # type: ignore[assignment]
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.amp.autocast = CudaAutocastOnCpu  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        torch.compile = compile_
        torch.cuda.current_device = current_device
        torch.cuda.amp.autocast = autocast  # type: ignore[misc]


@contextlib.contextmanager
def reference_runtime() -> Iterator[None]:
    """Active while reference code runs: CUDA autocast regions become the CPU emulation."""
    autocast = torch.cuda.amp.autocast
    torch.cuda.amp.autocast = CudaAutocastOnCpu  # type: ignore[assignment,misc]
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        torch.cuda.amp.autocast = autocast  # type: ignore[misc]


def _function_from_source(path: Path, name: str, namespace: dict[str, Any]) -> Callable[..., Any]:
    """Compile one top-level function of a script without running the script's imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    code = compile(ast.Module(body=[node], type_ignores=[]), filename=str(path), mode="exec")
    exec(code, namespace)  # noqa: S102 - the reference function, compiled from the checkout
    return namespace[name]


@dataclass
class Reference:
    """The reference modules, imported from the checkout."""

    root: Path
    model: str  # "multitalk" | "infinitetalk"
    script: Path  # the entry script (generate_multitalk.py / generate_infinitetalk.py)
    multitalk_model: types.ModuleType
    multitalk_utils: types.ModuleType
    t5: types.ModuleType
    clip: types.ModuleType
    vae: types.ModuleType
    wav2vec2: types.ModuleType
    get_embedding: Callable[..., Any]
    to_param_dtype_fp32only: Callable[..., Any]


SCRIPTS = {"multitalk": "generate_multitalk.py", "infinitetalk": "generate_infinitetalk.py"}


def load_reference(root: Path, model: str = "multitalk") -> Reference:
    """The reference modules of a `model` checkout (MeiGen-AI/MultiTalk or MeiGen-AI/InfiniteTalk)."""
    root = root.resolve()
    script = root / SCRIPTS[model]
    if not (root / "wan" / "modules" / "multitalk_model.py").is_file() or not script.is_file():
        raise SystemExit(
            f"{root} is not a {model} checkout (wan/modules/multitalk_model.py or {script.name} missing)"
        )
    # Import the libraries (and let them cache which optional packages exist) before any stand-in module
    # is visible, so that nothing outside the reference ever sees a stand-in.
    import diffusers  # noqa: F401
    from transformers import Wav2Vec2FeatureExtractor  # noqa: F401
    from transformers.utils import import_utils

    for check in ("is_soundfile_available", "is_torchvision_available"):
        getattr(import_utils, check, lambda: None)()

    for name, rel in (
        ("wan", "wan"),
        ("wan.modules", "wan/modules"),
        ("wan.utils", "wan/utils"),
        ("src", "src"),
        ("src.audio_analysis", "src/audio_analysis"),
    ):
        _namespace_package(name, root / rel)
    with _shims(), _import_time_patches(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mods = {
            key: importlib.import_module(mod)
            for key, mod in (
                ("multitalk_model", "wan.modules.multitalk_model"),
                ("multitalk_utils", "wan.utils.multitalk_utils"),
                ("attention", "wan.modules.attention"),
                ("t5", "wan.modules.t5"),
                ("clip", "wan.modules.clip"),
                ("vae", "wan.modules.vae"),
                ("wav2vec2", "src.audio_analysis.wav2vec2"),
            )
        }
    mods["multitalk_model"].flash_attention = flash_attention_cpu
    mods["clip"].flash_attention = flash_attention_cpu
    mods["attention"].flash_attention = flash_attention_cpu
    mods["multitalk_utils"].torch_gc = lambda: None
    _restore_hidden_state_capture(mods["wav2vec2"].Wav2Vec2Model)
    from einops import rearrange

    get_embedding = _function_from_source(
        script, "get_embedding", {"np": np, "torch": torch, "rearrange": rearrange}
    )
    cast = _function_from_source(root / "wan" / "multitalk.py", "to_param_dtype_fp32only", {"torch": torch})
    return Reference(
        root=root,
        model=model,
        script=script,
        to_param_dtype_fp32only=cast,
        multitalk_model=mods["multitalk_model"],
        multitalk_utils=mods["multitalk_utils"],
        t5=mods["t5"],
        clip=mods["clip"],
        vae=mods["vae"],
        wav2vec2=mods["wav2vec2"],
        get_embedding=get_embedding,
    )


def _restore_hidden_state_capture(model_cls: type) -> None:
    """transformers >= 5 returns `hidden_states` through hooks installed by the `capture_outputs` decorator of
    Wav2Vec2Model.forward; the reference subclass overrides forward (written for transformers 4, whose
    encoder returned them itself), so the decorator is applied to the subclass's forward as well."""
    try:
        from transformers.utils.output_capturing import capture_outputs
    except ImportError:  # transformers 4: the encoder returns hidden states itself
        return
    model_cls.forward = capture_outputs(tie_last_hidden_states=False)(model_cls.forward)


def partial_module_fn(module: types.ModuleType, name: str, **fixed: Any) -> Callable[[], None]:
    """Make `module.name` a partial with `fixed` keyword arguments; returns the undo function."""
    original = getattr(module, name)
    setattr(module, name, functools.partial(original, **fixed))
    return lambda: setattr(module, name, original)
