"""The built-in tiny model: seeded, real networks at the reference precisions, umT5-style tokenizer."""

from __future__ import annotations

import torch

from multitalk_worker.models.configs import TINY
from multitalk_worker.models.transformer import MultiTalkTransformer
from multitalk_worker.tiny import build_tiny_bundle, build_tiny_tokenizer
from tests.tiny import REFERENCE_PRECISIONS

NETWORKS = ("dit", "text_encoder", "image_encoder", "vae", "audio_encoder")


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a, b, c = build_tiny_bundle(0), build_tiny_bundle(0), build_tiny_bundle(1)
    for name in NETWORKS:
        sa, sb, sc = (getattr(x, name).state_dict() for x in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), name


def test_networks_are_real_and_at_reference_precisions() -> None:
    bundle = build_tiny_bundle()
    assert isinstance(bundle.dit, MultiTalkTransformer) and bundle.config == TINY
    for name, dtype in REFERENCE_PRECISIONS.items():
        model = getattr(bundle, name)
        params = list(model.parameters())
        assert {p.dtype for p in params} == {dtype}, name
        assert all(p.device.type == "cpu" and not p.requires_grad for p in params), name
        assert not model.training, name
        assert all(p.float().std() > 0 for p in params if p.numel() > 8), name  # random, not constant
    shared, embed = bundle.text_encoder.shared.weight, bundle.text_encoder.encoder.embed_tokens.weight
    assert shared.data_ptr() == embed.data_ptr()  # tied as in umT5


def test_tiny_dit_runs() -> None:
    bundle = build_tiny_bundle(dtype=torch.float32)
    cfg = bundle.config.dit
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = bundle.dit(
            torch.randn(1, 16, 2, 4, 4, generator=g),
            torch.tensor([500.0]),
            torch.randn(1, 5, cfg.text_dim, generator=g),
            torch.randn(1, 17, cfg.image_dim, generator=g),
            torch.randn(1, 20, 2, 4, 4, generator=g),
            torch.randn(1, 1, 5, cfg.audio_window, cfg.audio_layers, cfg.audio_channels, generator=g),
            torch.ones(3, 4, 4),
        )
    assert out.shape == (1, 16, 2, 4, 4) and torch.isfinite(out).all() and out.std() > 0


def test_tokenizer_has_umt5_special_ids() -> None:
    tokenizer = build_tiny_tokenizer(max_length=12)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) <= TINY.text_encoder.vocab_size
    batch = tokenizer(["A man talking", "§"], padding="max_length", truncation=True, max_length=12)
    first, second = batch.input_ids
    assert tokenizer.convert_ids_to_tokens(first[:4]) == ["▁a", "▁man", "▁talking", "</s>"]
    assert first[4:] == [0] * 8 and batch.attention_mask[0] == [1] * 4 + [0] * 8
    assert 2 in second and second[second.index(0) - 1] == 1  # unknown piece, then EOS, then padding
    long = tokenizer("a " * 40, padding="max_length", truncation=True, max_length=12).input_ids
    assert len(long) == 12 and long[-1] == 1  # truncation keeps the EOS


def test_feature_extractor_normalises_16k_audio() -> None:
    extractor = build_tiny_bundle().feature_extractor
    signal = 3.0 + 2.0 * torch.sin(torch.arange(16000) / 5.0).numpy()
    values = extractor(signal, sampling_rate=16000).input_values[0]
    assert abs(values.mean()) < 1e-5 and abs(values.std() - 1) < 1e-3
