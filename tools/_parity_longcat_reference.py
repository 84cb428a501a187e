"""Import LongCat-Video's Avatar DiT from a checkout and run it on a CPU (parity tool only).

The checkout is never modified; what it needs of a CUDA machine is replaced at run time:

* ``flash_attn`` (imported inside the attention functions) is a module in ``sys.modules`` whose
  ``flash_attn_func`` and ``flash_attn_varlen_func`` compute exact attention with torch's SDPA in the inputs'
  dtype (float32 here, which flash-attn itself cannot do); the published configs select FlashAttention-2.
* ``longcat_video.block_sparse_attention.bsa_interface`` (Triton kernels, off in every published config) is a
  module whose ``flash_attn_bsa_3d`` raises if called.
* ``longcat_video.audio_process`` is registered as a bare package, so that ``torch_utils`` is imported without
  the package ``__init__`` (the wav2vec2/Whisper wrappers, not used by the DiT); ``torchvision``, imported by
  ``torch_utils`` for video writing, is an empty module when not installed.
* ``torch.compile`` is the identity while the checkout is imported: ``calculate_x_ref_attn_map`` runs eagerly
  (spec §3.10 on compiled vs eager); its ``torch_gc`` (CUDA cache calls) is a no-op.
* ``torch.amp.autocast('cuda', dtype=float32)``, a no-op on a CPU, is emulated in the two modules that use it
  (``amp`` there is replaced by a shim whose ``autocast`` is tools/_parity_reference.py's
  ``CudaAutocastOnCpu``): inside a float32 region the inputs of linears, matrix products and layer norms are
  cast to float32 as CUDA autocast does, so a bf16 model keeps its float32 islands (adaLN, timestep MLP,
  final layer) on a CPU too.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

PACKAGE = "longcat_video"
DIT_MODULE = "longcat_video.modules.avatar.longcat_video_dit_avatar"


def _sdpa_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    **_: Any,
) -> torch.Tensor:
    """flash-attn's [B, S, H, D] contract, exact attention."""
    return _sdpa_bshd(q, k, v, softmax_scale)


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None = None,
    **_: Any,
) -> torch.Tensor:
    """flash-attn's packed [total, H, D] contract: item i's queries over item i's keys."""
    outs = []
    for i in range(len(cu_seqlens_q) - 1):
        qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ks, ke = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        outs.append(_sdpa_bshd(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], softmax_scale)[0])
    return torch.cat(outs)


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # libraries probe modules with find_spec
    module.__dict__.update(attrs)
    return module


def _bsa_unavailable(*_: Any, **__: Any) -> None:
    raise RuntimeError("block-sparse attention is off in every published LongCat-Video-Avatar config")


@contextlib.contextmanager
def _patched_import() -> Iterator[None]:
    """torch.compile as the identity and stand-ins for modules the DiT does not use, during the import."""
    importlib.import_module("diffusers.models.modeling_utils")  # it probes torchvision: before the stand-in
    saved_compile = torch.compile
    added = []
    if importlib.util.find_spec("torchvision") is None:
        sys.modules["torchvision"] = _module("torchvision")
        added.append("torchvision")
    torch.compile = lambda fn=None, *a, **k: fn if fn is not None else (lambda f: f)  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = saved_compile
        for name in added:
            sys.modules.pop(name, None)


def load_reference_dit(checkout: Path) -> types.ModuleType:
    """The checkout's `longcat_video_dit_avatar` module, imported with the replacements above."""
    checkout = checkout.resolve()
    if not (checkout / PACKAGE / "modules" / "avatar" / "longcat_video_dit_avatar.py").is_file():
        raise SystemExit(f"{checkout} is not a LongCat-Video checkout (no {PACKAGE}/modules/avatar/)")
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    sys.modules.setdefault("flash_attn", _module("flash_attn", flash_attn_func=flash_attn_func,
                                                  flash_attn_varlen_func=flash_attn_varlen_func))  # fmt: skip
    bare = f"{PACKAGE}.audio_process"
    if bare not in sys.modules:
        package = _module(bare)
        package.__path__ = [str(checkout / PACKAGE / "audio_process")]
        sys.modules[bare] = package
    bsa = f"{PACKAGE}.block_sparse_attention.bsa_interface"
    sys.modules.setdefault(bsa, _module(bsa, flash_attn_bsa_3d=_bsa_unavailable))
    with _patched_import():
        dit = importlib.import_module(DIT_MODULE)
        torch_utils = importlib.import_module(f"{PACKAGE}.audio_process.torch_utils")
    torch_utils.torch_gc = lambda: None
    amp = _module("parity_amp", autocast=_cuda_autocast)
    for name in (DIT_MODULE, f"{PACKAGE}.modules.blocks"):
        sys.modules[name].amp = amp
    return dit


def _cuda_autocast(
    device_type: str = "cuda", dtype: torch.dtype = torch.float16, enabled: bool = True
) -> Any:
    from _parity_reference import CudaAutocastOnCpu

    if device_type != "cuda":
        raise RuntimeError(f"parity: autocast on {device_type!r} is not emulated")
    return CudaAutocastOnCpu(enabled=enabled, dtype=dtype)
