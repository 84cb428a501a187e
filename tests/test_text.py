"""Prompt cleaning, tokenisation and the default negative prompt (spec 1.3, 4)."""

from __future__ import annotations

import hashlib

import pytest

from multitalk_worker.pipeline.text import DEFAULT_NEGATIVE_PROMPT, clean_prompt, tokenize
from multitalk_worker.tiny import build_tiny_tokenizer


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  a  man\n\ttalking  ", "a man talking"),
        ("fish &amp;amp; chips", "fish & chips"),  # unescaped twice
        ("caf\u00c3\u00a9 scene", "caf\u00e9 scene"),  # ftfy repairs mojibake
        ("a\u00a0b\u2003c", "a b c"),  # Unicode whitespace collapses
        ("", ""),
    ],
)
def test_clean_prompt(raw: str, clean: str) -> None:
    assert clean_prompt(raw) == clean


def test_default_negative_prompt_is_the_reference_string() -> None:
    assert DEFAULT_NEGATIVE_PROMPT.startswith("bright tones, overexposed, static, blurred details")
    assert DEFAULT_NEGATIVE_PROMPT.endswith("many people in the background, walking backwards")
    digest = hashlib.sha256(DEFAULT_NEGATIVE_PROMPT.encode()).hexdigest()
    assert digest == "411bdbdd98002bf986513c4a8315de7311114cf36140c519842d00492f25fd2c"


def test_tokenize_pads_to_max_length_with_eos() -> None:
    tokenizer = build_tiny_tokenizer(max_length=16)
    ids, mask = tokenize(tokenizer, ["a  man talking", "the face " * 20], max_length=16)
    assert ids.shape == mask.shape == (2, 16)
    length = int(mask[0].sum())
    assert ids[0, length - 1] == 1  # EOS </s>
    assert (ids[0, length:] == 0).all() and (mask[0, length:] == 0).all()  # pad id 0
    assert mask[1].all() and ids[1, -1] == 1  # truncated, EOS kept
    same, _ = tokenize(tokenizer, ["a man talking"], max_length=16)
    assert same[0].tolist() == ids[0].tolist()  # cleaning collapsed the double space
