"""Prompt cleaning and tokenisation for the umT5 text encoder (spec 4)."""

from __future__ import annotations

import html
from collections.abc import Sequence

import ftfy
import regex
import torch
from transformers import PreTrainedTokenizerBase

# The reference's default negative prompt (spec 1.3), used for every "no text" pass.
DEFAULT_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
    "picture, messy background, three legs, many people in the background, walking backwards"
)
TEXT_LEN = 512

_WHITESPACE = regex.compile(r"\s+")  # the `regex` module, as the reference: its \s is Unicode White_Space


def clean_prompt(text: str) -> str:
    """ftfy fix, HTML-unescape twice, strip, collapse whitespace runs to one space, strip."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int = TEXT_LEN
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and tokenise a batch, padded/truncated to `max_length` with EOS appended.

    Returns (input_ids, attention_mask), both int64 [B, max_length].
    """
    batch = tokenizer(
        [clean_prompt(t) for t in texts],
        padding="max_length",
        truncation=True,
        max_length=max_length,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return batch.input_ids, batch.attention_mask
