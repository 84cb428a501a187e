"""Batching guidance passes into one DiT call (spec 6.3: valid, changes GEMM shapes only).

Passes can share a batch when their audio has the same person count: `cond` and `drop_text` of a
two-person run (P = 2) form one batch of 2, `uncond` / `drop_audio` (one silent person, P = 1) run alone;
in a one-person run every pass has P = 1 and all of them form one batch. Text contexts of different
lengths are zero-padded to `text_len`, which is what the model does to each of them anyway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from multitalk_worker.models.runtime import REFERENCE_RUNTIME, DiTRuntime
from multitalk_worker.models.transformer import MultiTalkTransformer


def group_passes(audio_persons: Mapping[str, int]) -> list[tuple[str, ...]]:
    """Pass labels grouped by person count, in first-seen order: {"cond": 2, "drop_text": 2, "uncond": 1}
    -> [("cond", "drop_text"), ("uncond",)]."""
    groups: dict[int, list[str]] = {}
    for label, persons in audio_persons.items():
        groups.setdefault(persons, []).append(label)
    return [tuple(labels) for labels in groups.values()]


def stack_pass_inputs(
    contexts: Sequence[Tensor], audios: Sequence[Tensor], text_len: int
) -> tuple[Tensor, Tensor]:
    """Contexts [1, Lc_i, text_dim] -> [N, text_len, text_dim], zero-padded; audios [1, P, ...] -> [N, P, ...]
    (one row per pass, in order)."""
    padded = [F.pad(c, (0, 0, 0, text_len - c.shape[1])) for c in contexts]
    return torch.cat(padded, dim=0), torch.cat(list(audios), dim=0)


def predict_passes(
    model: MultiTalkTransformer,
    latent: Tensor,
    timestep: Tensor,
    clip_fea: Tensor,
    y: Tensor,
    person_masks: Tensor,
    passes: Mapping[str, tuple[Tensor, Tensor]],
    *,
    runtime: DiTRuntime = REFERENCE_RUNTIME,
) -> dict[str, Tensor]:
    """Every guidance pass of one step, batched where the person counts agree.

    latent [1, 16, T, h, w]; timestep [1]; clip_fea [1, N_img, image_dim]; y [1, 20, T, h, w]; passes: label
    -> (context [1, Lc, text_dim], audio [1, P, F, W, layers, channels]). Returns label -> [1, 16, T, h, w].
    """
    preds: dict[str, Tensor] = {}
    for labels in group_passes({label: audio.shape[1] for label, (_, audio) in passes.items()}):
        n = len(labels)
        context, audio = stack_pass_inputs(
            [passes[lb][0] for lb in labels], [passes[lb][1] for lb in labels], model.config.text_len
        )
        out = model(
            latent.expand(n, -1, -1, -1, -1),
            timestep.expand(n),
            context,
            clip_fea.expand(n, -1, -1),
            y.expand(n, -1, -1, -1, -1),
            audio,
            person_masks,
            runtime=runtime,
        )
        preds.update({label: out[i : i + 1] for i, label in enumerate(labels)})
    return preds
