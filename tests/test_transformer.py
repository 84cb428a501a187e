from __future__ import annotations

import dataclasses

import pytest
import torch

from multitalk_worker.models.audio_attention import reference_attention_map
from multitalk_worker.models.configs import TINY, DiTConfig
from multitalk_worker.models.transformer import MultiTalkTransformer, sinusoidal_embedding

CFG = TINY.dit


def _expected_keys(num_layers: int) -> set[str]:
    """Original checkpoint key names (spec 8.1 Wan I2V + 8.2 multitalk.safetensors), written out."""
    wb = ("weight", "bias")
    keys = {f"patch_embedding.{p}" for p in wb}
    keys |= {f"text_embedding.{i}.{p}" for i in (0, 2) for p in wb}
    keys |= {f"time_embedding.{i}.{p}" for i in (0, 2) for p in wb}
    keys |= {f"time_projection.1.{p}" for p in wb}
    keys |= {f"img_emb.proj.{i}.{p}" for i in (0, 1, 3, 4) for p in wb}
    keys |= {"head.head.weight", "head.head.bias", "head.modulation"}
    keys |= {f"audio_proj.{m}.{p}" for m in ("proj1", "proj1_vf", "proj2", "proj3", "norm") for p in wb}
    for n in range(num_layers):
        b = f"blocks.{n}."
        keys |= {f"{b}self_attn.{m}.{p}" for m in ("q", "k", "v", "o") for p in wb}
        keys |= {f"{b}self_attn.norm_q.weight", f"{b}self_attn.norm_k.weight"}
        keys |= {f"{b}cross_attn.{m}.{p}" for m in ("q", "k", "v", "o", "k_img", "v_img") for p in wb}
        keys |= {f"{b}cross_attn.{m}.weight" for m in ("norm_q", "norm_k", "norm_k_img")}
        keys |= {f"{b}norm3.{p}" for p in wb} | {f"{b}norm_x.{p}" for p in wb}
        keys |= {f"{b}ffn.{i}.{p}" for i in (0, 2) for p in wb}
        keys.add(f"{b}modulation")
        keys |= {f"{b}audio_cross_attn.{m}.{p}" for m in ("q_linear", "kv_linear", "proj") for p in wb}
    return keys


def _model(seed: int = 0, config: DiTConfig = CFG) -> MultiTalkTransformer:
    torch.manual_seed(seed)
    model = MultiTalkTransformer(config).eval()
    with torch.no_grad():  # non-trivial norm weights so that wrong rounding/affine paths show up
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
    return model


def _masks(h: int, w: int) -> torch.Tensor:
    """Person 1 left half, person 2 right half (below two background rows), background elsewhere."""
    masks = torch.zeros(3, h, w)
    masks[0, 2:, : w // 2] = 1
    masks[1, 2:, w // 2 :] = 1
    masks[2] = 1 - masks[0] - masks[1]
    return masks


def _inputs(batch: int, persons: int, frames: int = 2, h: int = 8, w: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    video_frames = 4 * (frames - 1) + 1
    return {
        "latent": torch.randn(batch, 16, frames, h, w, generator=g),
        "timestep": torch.rand(batch, generator=g) * 1000,
        "context": torch.randn(batch, 5, CFG.text_dim, generator=g),
        "clip_fea": torch.randn(batch, 3, CFG.image_dim, generator=g),
        "y": torch.randn(batch, 20, frames, h, w, generator=g),
        "audio": torch.randn(
            batch, persons, video_frames, 5, CFG.audio_layers, CFG.audio_channels, generator=g
        ),
        "person_masks": _masks(h, w),
    }


def test_state_dict_keys_are_the_original_checkpoint_keys() -> None:
    model = MultiTalkTransformer(CFG)
    assert set(model.state_dict()) == _expected_keys(CFG.num_layers)
    assert list(model.buffers()) == []


def test_full_size_shapes_and_parameter_count() -> None:
    with torch.device("meta"):
        model = MultiTalkTransformer(DiTConfig())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(shapes) == _expected_keys(40)
    assert shapes["patch_embedding.weight"] == (5120, 36, 1, 2, 2)
    assert shapes["time_projection.1.weight"] == (30720, 5120)
    assert shapes["head.head.weight"] == (64, 5120)
    assert shapes["head.modulation"] == (1, 2, 5120)
    assert shapes["blocks.39.modulation"] == (1, 6, 5120)
    assert shapes["blocks.0.ffn.0.weight"] == (13824, 5120)
    assert shapes["blocks.0.audio_cross_attn.kv_linear.weight"] == (10240, 768)
    assert shapes["img_emb.proj.0.weight"] == (1280,) and shapes["img_emb.proj.3.weight"] == (5120, 1280)
    # spec 5.1: Wan base 16 394 878 784 + MultiTalk 2 487 168 000 parameters
    assert sum(p.numel() for p in model.parameters()) == 18_882_046_784


def test_strict_load_reproduces_outputs() -> None:
    source, target = _model(0), _model(1)
    target.load_state_dict(source.state_dict(), strict=True)
    inputs = _inputs(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(target(**inputs), source(**inputs), rtol=0, atol=0)


@pytest.mark.parametrize("persons", [1, 2])
def test_batch_of_two_equals_two_single_calls(persons: int) -> None:
    model = _model()
    inputs = _inputs(2, persons)
    with torch.no_grad():
        out = model(**inputs)
        singles = [
            model(**{k: (v if k == "person_masks" else v[i : i + 1]) for k, v in inputs.items()})
            for i in range(2)
        ]
    assert out.shape == (2, 16, 2, 8, 8) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.cat(singles), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("persons", [1, 2])
def test_bf16_model_returns_float32_close_to_float32_model(persons: int) -> None:
    model = _model()
    inputs = _inputs(1, persons)
    with torch.no_grad():
        ref = model(**inputs)
        out = model.to(torch.bfloat16)(**inputs)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_person_masks_matter_only_for_two_persons() -> None:
    model = _model()
    flipped = _masks(8, 8)[[1, 0, 2]]
    with torch.no_grad():
        for persons, should_change in ((1, False), (2, True)):
            inputs = _inputs(1, persons)
            a = model(**inputs)
            b = model(**{**inputs, "person_masks": flipped})
            assert (not torch.equal(a, b)) == should_change


def test_text_context_is_zero_padded_before_the_text_mlp() -> None:
    model = _model()
    inputs = _inputs(1, 1)
    padded = torch.cat([inputs["context"], torch.zeros(1, CFG.text_len - 5, CFG.text_dim)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), model(**{**inputs, "context": padded}), rtol=0, atol=0)
    with pytest.raises(ValueError, match="text_len"):
        model(**{**inputs, "context": torch.randn(1, CFG.text_len + 1, CFG.text_dim)})


def test_bad_shapes_raise_value_error() -> None:
    model = _model()
    inputs = _inputs(1, 1)
    with pytest.raises(ValueError, match="audio"):
        model(**{**inputs, "audio": inputs["audio"][:, :, :4]})
    with pytest.raises(ValueError, match="persons"):
        model(**{**inputs, "audio": inputs["audio"].expand(1, 3, -1, -1, -1, -1)})
    with pytest.raises(ValueError, match="person_masks"):
        model(**{**inputs, "person_masks": torch.ones(3, 4, 4)})


def test_sinusoidal_embedding_layout() -> None:
    emb = sinusoidal_embedding(torch.tensor([0.0, 500.0]), 16)
    assert emb.dtype == torch.float32 and emb.shape == (2, 16)
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(8), torch.zeros(8)]))
    # first frequency is 1: cos(500), sin(500)
    assert emb[1, 0].item() == pytest.approx(
        torch.cos(torch.tensor(500.0, dtype=torch.float64)).item(), abs=1e-6
    )
    assert emb[1, 8].item() == pytest.approx(
        torch.sin(torch.tensor(500.0, dtype=torch.float64)).item(), abs=1e-6
    )


def test_composition_matches_forward() -> None:
    model = _model()
    inputs = _inputs(1, 2)
    with torch.no_grad():
        block_inputs = model.embed(**inputs)
        e, e0 = model.time_embed(inputs["timestep"])
        torch.testing.assert_close(block_inputs.e0, e0, rtol=0, atol=0)
        assert e.dtype == e0.dtype == torch.float32 and e0.shape == (1, 6, CFG.dim)
        x = model.run_blocks(block_inputs.tokens, block_inputs)
        out = model.project_out(x, block_inputs.e, block_inputs.grid)
        torch.testing.assert_close(out, model(**inputs), rtol=0, atol=0)


# ---------------------------------------------------------------- reference attention map


def _direct_ref_map(q: torch.Tensor, k: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean over heads of the attention mass on each mask's frame-0 tokens, divided by its token count."""
    frame_tokens = masks.shape[1]
    q64, k64, m64 = q[0].double(), k[0, :frame_tokens].double(), masks.double()
    logits = torch.einsum("lhd,shd->hls", q64, k64) / q.shape[-1] ** 0.5
    probs = logits.softmax(dim=-1)  # [H, L, S]
    mass = torch.einsum("hls,cs->hcl", probs, m64) / m64.sum(dim=1)[None, :, None]
    return mass.mean(dim=0)  # [C, L]


def test_reference_map_matches_direct_formula() -> None:
    g = torch.Generator().manual_seed(0)
    frame_tokens, length, heads, dim = 6, 18, 4, 8
    q = torch.randn(1, length, heads, dim, generator=g) * 2
    k = torch.randn(1, length, heads, dim, generator=g) * 2
    masks = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.float32)
    out = reference_attention_map(q, k, masks, head_groups=2)
    assert out.shape == (1, 3, length)
    torch.testing.assert_close(out[0].double(), _direct_ref_map(q, k, masks), rtol=1e-5, atol=1e-6)
    # only the keys of latent frame 0 matter, and chunking the queries changes nothing
    k2 = k.clone()
    k2[:, frame_tokens:] = torch.randn(1, length - frame_tokens, heads, dim, generator=g)
    torch.testing.assert_close(reference_attention_map(q, k2, masks, head_groups=2), out, rtol=0, atol=0)
    torch.testing.assert_close(reference_attention_map(q, k, masks, head_groups=4, query_chunk=5), out)


# ---------------------------------------------------------------- audio routing (behaviour)


def _routing_model() -> MultiTalkTransformer:
    """One block whose self-attention q/k are constant vectors in the width RoPE pair (so every token
    attends to its own column of frame 0) and whose audio q/k are constant in a low-frequency L-RoPE pair
    (so attention to audio tokens falls off with position distance). Everything else is random."""
    model = _model(3, dataclasses.replace(CFG, num_layers=1))
    head_dim = CFG.head_dim
    block = model.blocks[0]
    with torch.no_grad():
        for lin, norm in (
            (block.self_attn.q, block.self_attn.norm_q),
            (block.self_attn.k, block.self_attn.norm_k),
        ):
            lin.weight.zero_()
            lin.bias.zero_()
            lin.bias[12::head_dim] = 1.0  # pair 6 = first width pair (frequency 1)
            norm.weight.fill_(3.0)
        audio = block.audio_cross_attn
        audio.q_linear.weight.zero_()
        audio.q_linear.bias.zero_()
        audio.q_linear.bias[4::head_dim] = 10.0  # pair 2: frequency 0.1
        audio.kv_linear.weight[: CFG.dim].zero_()
        audio.kv_linear.bias[: CFG.dim] = audio.q_linear.bias
    return model


def test_two_person_audio_is_routed_to_each_persons_region() -> None:
    model = _routing_model()
    inputs = _inputs(1, 2, frames=2)
    changed = inputs["audio"].clone()
    changed[:, 1] = torch.randn(changed[:, 1].shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        delta = (model(**{**inputs, "audio": changed}) - model(**inputs)).abs()
    left, right = delta[..., :4].mean(), delta[..., 4:].mean()  # person 1 left, person 2 right
    assert right > 1e-2
    assert right > 100 * left


def test_audio_attention_is_per_latent_frame() -> None:
    model = _model(4, dataclasses.replace(CFG, num_layers=1))
    inputs = _inputs(1, 1, frames=3)
    changed = inputs["audio"].clone()
    changed[:, :, 5:9] = torch.randn(changed[:, :, 5:9].shape)  # video frames 5..8 = latent frame 2
    with torch.no_grad():
        delta = (model(**{**inputs, "audio": changed}) - model(**inputs)).abs()
    assert delta[:, :, :2].max() < 1e-6
    assert delta[:, :, 2].mean() > 1e-3
