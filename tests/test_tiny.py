"""The built-in tiny model: seeded, real networks at the reference precisions, umT5-style tokenizer."""

from __future__ import annotations

import hashlib

import pytest
import torch

from multitalk_worker.errors import InvalidInput
from multitalk_worker.models.configs import TINY
from multitalk_worker.models.transformer import MultiTalkTransformer
from multitalk_worker.tiny import adapter_seed, build_tiny_bundle, build_tiny_tokenizer, tiny_adapter_state
from multitalk_worker.weights.adapters import is_audio_key
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


def _digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def test_multitalk_tiny_weights_are_pinned() -> None:
    """The multitalk tiny model of seed 0 (the demo's; the tiny pipeline tests compare it) is the one this
    module has always drawn: sha256 of every tensor, computed before InfiniteTalk's adapters were added."""
    bundle = build_tiny_bundle(0)
    assert (bundle.model, bundle.adapter) == ("multitalk", "multitalk")
    assert {name: _digest(getattr(bundle, name)) for name in NETWORKS} == {
        "dit": "283d8a3a151a96b7",
        "text_encoder": "93f7b58d69151629",
        "image_encoder": "3e7f992dd4d13d9f",
        "vae": "8f12335c28797dcc",
        "audio_encoder": "5b859bd3ea3516b5",
    }


def test_infinitetalk_tiny_models_differ_only_in_the_adapter() -> None:
    multitalk = build_tiny_bundle(4, dtype=torch.float32)
    single = build_tiny_bundle(4, dtype=torch.float32, model="infinitetalk")  # one speaker: single
    multi = build_tiny_bundle(4, dtype=torch.float32, model="infinitetalk", persons=2)
    assert [(b.model, b.adapter) for b in (single, multi)] == [
        ("infinitetalk", "single"),
        ("infinitetalk", "multi"),
    ]
    for name in NETWORKS[1:]:
        want = getattr(multitalk, name).state_dict()
        for other in (single, multi):
            assert all(torch.equal(want[k], v) for k, v in getattr(other, name).state_dict().items()), name
    states = [b.dit.state_dict() for b in (multitalk, single, multi)]
    for key in states[0]:
        if is_audio_key(key):
            assert not torch.equal(states[0][key], states[1][key]), key
            assert not torch.equal(states[1][key], states[2][key]), key
        else:
            assert torch.equal(states[0][key], states[1][key]) and torch.equal(states[0][key], states[2][key])
    assert sum(is_audio_key(k) for k in states[0]) == 8 * TINY.dit.num_layers + 10


def test_tiny_adapter_state_is_the_bundle_adapter() -> None:
    for name, model in (("multitalk", "multitalk"), ("single", "infinitetalk"), ("multi", "infinitetalk")):
        state = tiny_adapter_state(5, name)
        dit = build_tiny_bundle(5, dtype=torch.float32, model=model, adapter=name).dit.state_dict()
        assert state.keys() == {k for k in dit if is_audio_key(k)}
        assert all(torch.equal(v, dit[k]) and v.dtype == torch.float32 for k, v in state.items()), name
        assert all(torch.equal(v, v.to(torch.bfloat16).float()) for v in state.values())  # exact in bf16
    assert not torch.equal(tiny_adapter_state(5, "single")["audio_proj.norm.weight"],
                           tiny_adapter_state(6, "single")["audio_proj.norm.weight"])  # fmt: skip
    assert adapter_seed(0, "single") == int.from_bytes(hashlib.sha256(b"0/single").digest()[:8], "little") & (
        2**63 - 1
    )
    with pytest.raises(InvalidInput, match="no adapter 'multi'"):
        build_tiny_bundle(0, adapter="multi")  # multitalk has one adapter
