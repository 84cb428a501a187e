"""Reference side of the parity tool: tiny seeded weights written in the original file layouts, inputs,
and the outputs of the official code (imported from a checkout by `_parity_reference`).

Every builder writes its weights under a folder and returns the inputs and the reference outputs as
flat dicts of tensors. The reference loads the weights through its own loading code wherever that code
can load a tiny model (T5, CLIP, VAE, wav2vec2); the DiT is built from its constructor because the tiny
image/audio widths need the projector modules swapped (see `build_reference_dit`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _parity_ours import PARITY, cast_dit_inputs
from _parity_reference import Reference, partial_module_fn, reference_runtime
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from multitalk_worker.models.configs import DiTConfig

Tensors = dict[str, Tensor]

# File names of the original checkpoints (spec 1.3, 8.1, 8.2, 8.3).
DIT_WAN_FILE = "diffusion_pytorch_model.safetensors"
DIT_AUDIO_FILE = "multitalk.safetensors"
DIT_INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VAE_FILE = "Wan2.1_VAE.pth"
WAV2VEC_DIR = "chinese-wav2vec2-base"

# DiT case geometry: T latent frames of h x w (non-square so that height/width mix-ups show).
DIT_FRAMES, DIT_H, DIT_W = 3, 8, 12
DIT_TEXT_TOKENS = 11  # < text_len, so the zero padding to text_len is exercised
IMAGE_TOKENS = 257  # hard-coded in the reference cross-attention


# --------------------------------------------------------------------------- seeded weights


def _draw(name: str, shape: torch.Size, gen: torch.Generator, tables: set[str]) -> Tensor:
    """Random values with activations of order one: fan-in scaled matrices, norm gains around 1."""
    randn = torch.randn(shape, generator=gen, dtype=torch.float64)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "modulation" or name.endswith(".modulation"):
        return (randn / math.sqrt(shape[-1])).float()
    if leaf in ("gamma", "original0") or (len(shape) == 1 and "norm" in name and leaf == "weight"):
        return (1.0 + 0.1 * randn).float()
    if leaf == "bias" or len(shape) <= 1:
        return (0.1 * randn).float()
    if name in tables:
        return randn.float()  # token / position tables (nn.Embedding)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return (randn / math.sqrt(fan_in)).float()


def seed_weights(module: nn.Module, seed: int, gains: dict[str, float] | None = None) -> Tensors:
    """Overwrite every floating parameter/buffer of `module` with seeded values; return its state dict.
    `gains` multiplies the tensors whose key ends with a given suffix."""
    gen = torch.Generator().manual_seed(seed)
    tables = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, nn.Embedding)}
    state = module.state_dict()
    new = {
        k: (_draw(k, v.shape, gen, tables).to(v.dtype) if v.is_floating_point() else v)
        for k, v in sorted(state.items())
    }
    for suffix, gain in (gains or {}).items():
        new = {k: (v * gain if k.endswith(suffix) else v) for k, v in new.items()}
    module.load_state_dict(new, strict=True)
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- DiT


def build_reference_dit(ref: Reference, cfg: DiTConfig) -> nn.Module:
    """The reference WanModel for `cfg`. Its constructor hard-codes the CLIP width (1280) and the wav2vec
    size (12 layers x 768) of the projector modules; other sizes swap in the reference's own MLPProj and
    AudioProjModel built with those sizes."""
    mm = ref.multitalk_model
    stride = cfg.audio_vf_window - cfg.audio_window + 1
    model = mm.WanModel(
        model_type="i2v",
        patch_size=cfg.patch_size,
        text_len=cfg.text_len,
        in_dim=cfg.in_dim,
        dim=cfg.dim,
        ffn_dim=cfg.ffn_dim,
        freq_dim=cfg.freq_dim,
        text_dim=cfg.text_dim,
        out_dim=cfg.out_dim,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        eps=cfg.eps,
        audio_window=cfg.audio_window,
        intermediate_dim=cfg.audio_hidden,
        output_dim=cfg.audio_dim,
        context_tokens=cfg.audio_tokens,
        vae_scale=stride,
        norm_input_visual=True,
        norm_output_audio=True,
        weight_init=False,
    )
    if cfg.image_dim != 1280:
        model.img_emb = mm.MLPProj(cfg.image_dim, cfg.dim)
    if (cfg.audio_layers, cfg.audio_channels) != (12, 768):
        model.audio_proj = mm.AudioProjModel(
            seq_len=cfg.audio_window,
            seq_len_vf=cfg.audio_vf_window,
            blocks=cfg.audio_layers,
            channels=cfg.audio_channels,
            intermediate_dim=cfg.audio_hidden,
            output_dim=cfg.audio_dim,
            context_tokens=cfg.audio_tokens,
            norm_output_audio=True,
        )
    model.disable_teacache()
    return model.eval().requires_grad_(False)


def write_dit_weights(folder: Path, state: Tensors, cfg: DiTConfig) -> None:
    """Wan keys to `diffusion_pytorch_model.safetensors`, MultiTalk keys to `multitalk.safetensors`, and the
    MultiTalk index mapping every key to its file (the layout of spec 8.2), plus Wan's config.json."""
    folder.mkdir(parents=True, exist_ok=True)

    def is_audio(key: str) -> bool:
        return key.startswith("audio_proj.") or ".audio_cross_attn." in key or ".norm_x." in key

    wan = {k: v for k, v in state.items() if not is_audio(k)}
    audio = {k: v for k, v in state.items() if is_audio(k)}
    save_file(wan, str(folder / DIT_WAN_FILE), metadata={"format": "pt"})
    save_file(audio, str(folder / DIT_AUDIO_FILE), metadata={"format": "pt"})
    total = sum(v.numel() * v.element_size() for v in state.values())
    weight_map = {k: DIT_WAN_FILE for k in sorted(wan)} | {k: DIT_AUDIO_FILE for k in sorted(audio)}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / DIT_INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    write_wan_config(folder, cfg)


def write_wan_config(folder: Path, cfg: DiTConfig) -> None:
    """Wan's config.json for `cfg` (the keys of the real file, spec 8.1)."""
    config = {
        "_class_name": "WanModel",
        "dim": cfg.dim,
        "eps": cfg.eps,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "in_dim": cfg.in_dim,
        "model_type": "i2v",
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "out_dim": cfg.out_dim,
        "text_len": cfg.text_len,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")


def read_dit_weights(folder: Path) -> Tensors:
    return load_file(str(folder / DIT_WAN_FILE)) | load_file(str(folder / DIT_AUDIO_FILE))


def dit_inputs(cfg: DiTConfig, persons: int, seed: int) -> Tensors:
    """One CFG branch's inputs in the shapes the reference pipeline passes (batch 1, float32 here)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    frames = (cfg.audio_vf_window - cfg.audio_window + 1) * (DIT_FRAMES - 1) + 1
    mask = torch.zeros(1, 4, DIT_FRAMES, DIT_H, DIT_W)
    mask[:, :, 0] = 1.0
    y = torch.cat([mask, torch.randn(1, 16, DIT_FRAMES, DIT_H, DIT_W, generator=gen)], dim=1)
    masks = torch.zeros(3, DIT_H, DIT_W)
    if persons == 1:
        masks[:] = 1.0
    else:  # two boxes (rows 1..6, left/right halves) and the background
        half = DIT_W // 2
        masks[0, 1:7, 1 : half - 1] = 1.0
        masks[1, 1:7, half + 1 : DIT_W - 1] = 1.0
        masks[2] = ((masks[0] + masks[1]) == 0).float()
    return {
        "latent": torch.randn(1, cfg.out_dim, DIT_FRAMES, DIT_H, DIT_W, generator=gen),
        "timestep": torch.rand(1, generator=gen) * 1000.0,
        "context": torch.randn(1, DIT_TEXT_TOKENS, cfg.text_dim, generator=gen),
        "clip_fea": torch.randn(1, IMAGE_TOKENS, cfg.image_dim, generator=gen),
        "y": y,
        "audio": torch.randn(
            1, persons, frames, cfg.audio_window, cfg.audio_layers, cfg.audio_channels, generator=gen
        ),
        "person_masks": masks,
    }


def run_reference_dit(
    ref: Reference, folder: Path, cfg: DiTConfig, inputs: Tensors, dtype: torch.dtype
) -> Tensor:
    model = build_reference_dit(ref, cfg)
    model.load_state_dict(read_dit_weights(folder), strict=True)
    if dtype != torch.float32:
        ref.to_param_dtype_fp32only(model, dtype)  # the pipeline's own cast (spec 5.2)
    return reference_forward(model, cfg, inputs, dtype)


def reference_forward(model: nn.Module, cfg: DiTConfig, inputs: Tensors, dtype: torch.dtype) -> Tensor:
    """One forward of a loaded reference WanModel on `inputs` cast to the pipeline's dtypes."""
    x = cast_dit_inputs(inputs, dtype)
    grid = (
        x["latent"].shape[2],
        x["latent"].shape[3] // cfg.patch_size[1],
        x["latent"].shape[4] // cfg.patch_size[2],
    )
    with reference_runtime():
        out = model(
            [x["latent"][0]],
            t=x["timestep"],
            context=[x["context"][0]],
            seq_len=math.prod(grid),
            clip_fea=x["clip_fea"],
            y=x["y"],
            audio=x["audio"][0],
            ref_target_masks=x["person_masks"],
        )
    return out.float()


def run_reference_audio_proj(ref: Reference, folder: Path, cfg: DiTConfig, audio: Tensor) -> Tensor:
    """The reference projector on windows routed as in WanModel.forward (first frame / 8-frame groups)."""
    model = build_reference_dit(ref, cfg)
    model.load_state_dict(read_dit_weights(folder), strict=True)
    return reference_audio_proj(model, cfg, audio)


def reference_audio_proj(model: nn.Module, cfg: DiTConfig, audio: Tensor) -> Tensor:
    """`audio_proj` of a loaded reference WanModel on audio [1, P, F, W, layers, C] (float32 result)."""
    from einops import rearrange

    stride, mid = cfg.audio_vf_window - cfg.audio_window + 1, cfg.audio_window // 2
    a = audio[0]  # [P, F, W, layers, C]
    first = a[:, :1]
    later = rearrange(a[:, 1:], "b (n_t n) w s c -> b n_t n w s c", n=stride)
    head = rearrange(later[:, :, :1, : mid + 1], "b n_t n w s c -> b n_t (n w) s c")
    tail = rearrange(later[:, :, -1:, mid:], "b n_t n w s c -> b n_t (n w) s c")
    middle = rearrange(later[:, :, 1:-1, mid : mid + 1], "b n_t n w s c -> b n_t (n w) s c")
    with reference_runtime():
        return model.audio_proj(first, torch.cat([head, middle, tail], dim=2)).float()


# --------------------------------------------------------------------------- T5


def t5_reference_kwargs() -> dict[str, Any]:
    c = PARITY.text_encoder
    return {
        "vocab_size": c.vocab_size,
        "dim": c.d_model,
        "dim_attn": c.num_heads * c.d_kv,
        "dim_ffn": c.d_ff,
        "num_heads": c.num_heads,
        "encoder_layers": c.num_layers,
        "decoder_layers": c.num_layers,
        "num_buckets": c.relative_attention_num_buckets,
        "shared_pos": False,
        "dropout": 0.1,
    }


def t5_case(ref: Reference, folder: Path, seed: int) -> tuple[Tensors, Tensors, Tensors]:
    """Two padded prompts through T5EncoderModel.__call__ (its own .pth loading and per-row cut), in
    float32 and in bfloat16 (the pipeline's T5 dtype). Returns inputs, float32 and bfloat16 outputs."""
    c = PARITY.text_encoder
    t5 = ref.t5
    with reference_runtime():
        model = t5.umt5_xxl(encoder_only=True, return_tokenizer=False, **t5_reference_kwargs())
    # T5 has no 1/sqrt(d) logit scale; its init folds it into q (std (dim * dim_attn)^-1/2), as here.
    gains = {"attn.q.weight": (c.num_heads * c.d_kv) ** -0.5}
    state = {
        k: v.to(torch.bfloat16) for k, v in seed_weights(model, seed + 10, gains).items()
    }  # file is bf16
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / T5_FILE)

    gen = torch.Generator().manual_seed(2000 + seed)
    lengths = [9, c.text_len]  # one padded row, one full row (EOS included)
    ids = torch.zeros(2, c.text_len, dtype=torch.long)
    mask = torch.zeros(2, c.text_len, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, : n - 1] = torch.randint(2, c.vocab_size, (n - 1,), generator=gen)
        ids[row, n - 1] = 1  # </s>
        mask[row, :n] = 1

    class _Tokens:  # stands for the umT5 tokenizer: returns the fixed ids and mask
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __call__(self, texts: Any, return_mask: bool = True, add_special_tokens: bool = True) -> Any:
            return ids, mask

    undo = [
        partial_module_fn(t5, "umt5_xxl", **t5_reference_kwargs()),
        _swap(t5, "HuggingfaceTokenizer", _Tokens),
    ]
    outs = []
    try:
        for dtype in (torch.float32, torch.bfloat16):
            with reference_runtime():
                encoder = t5.T5EncoderModel(
                    text_len=c.text_len,
                    dtype=dtype,
                    device=torch.device("cpu"),
                    checkpoint_path=str(folder / T5_FILE),
                    tokenizer_path="unused",
                )
                out = encoder(["a", "b"], torch.device("cpu"))
            outs.append({f"context_{i}": o.float() for i, o in enumerate(out)})
    finally:
        for u in undo:
            u()
    return {"input_ids": ids, "attention_mask": mask}, outs[0], outs[1]


def _swap(module: Any, name: str, value: Any) -> Any:
    original = getattr(module, name)
    setattr(module, name, value)
    return lambda: setattr(module, name, original)


# --------------------------------------------------------------------------- CLIP


def clip_reference_kwargs() -> dict[str, Any]:
    c = PARITY.image_encoder
    return {
        "embed_dim": c.projection_dim,
        "image_size": c.image_size,
        "patch_size": c.patch_size,
        "vision_dim": c.hidden_size,
        "vision_mlp_ratio": c.intermediate_size / c.hidden_size,
        "vision_heads": c.num_attention_heads,
        "vision_layers": c.num_hidden_layers,
        "vocab_size": 64,
        "max_text_len": 16,
        "text_dim": 16,
        "text_heads": 2,
        "text_layers": 1,
    }


def clip_case(ref: Reference, folder: Path, seed: int) -> tuple[Tensors, Tensors]:
    """CLIPModel.visual on a non-square frame in [-1, 1] (its own preprocessing and 31-of-32 blocks)."""
    clip = ref.clip
    model = clip.clip_xlm_roberta_vit_h_14(**clip_reference_kwargs())
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(seed_weights(model, seed + 20), folder / CLIP_FILE)
    gen = torch.Generator().manual_seed(3000 + seed)
    image = (torch.rand(1, 3, 1, 48, 80, generator=gen) * 2 - 1).float()  # [B, C, 1, H, W]

    class _NoTokenizer:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

    undo = [
        partial_module_fn(clip, "clip_xlm_roberta_vit_h_14", **clip_reference_kwargs()),
        _swap(clip, "HuggingfaceTokenizer", _NoTokenizer),
    ]
    try:
        with reference_runtime():
            encoder = clip.CLIPModel(
                dtype=torch.float32,
                device="cpu",
                checkpoint_path=str(folder / CLIP_FILE),
                tokenizer_path="unused",
            )
            out = encoder.visual(image.clone())
    finally:
        for u in undo:
            u()
    return {"image": image[:, :, 0]}, {"clip_fea": out.float()}


# --------------------------------------------------------------------------- VAE


def vae_case(ref: Reference, folder: Path, seed: int) -> tuple[Tensors, Tensors]:
    """WanVAE.encode of a 9-frame clip (chunks 1, 4, 4) and WanVAE.decode of that latent."""
    vae = ref.vae
    c = PARITY.vae
    kwargs = {"dim": c.base_dim, "dim_mult": list(c.dim_mult), "num_res_blocks": c.num_res_blocks}
    kwargs["temperal_downsample"] = list(c.temperal_downsample)
    model = vae.WanVAE_(z_dim=c.z_dim, attn_scales=[], dropout=0.0, **kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(seed_weights(model, seed + 30), folder / VAE_FILE)
    gen = torch.Generator().manual_seed(4000 + seed)
    video = (torch.rand(3, 9, 16, 24, generator=gen) * 2 - 1).float()
    undo = partial_module_fn(vae, "_video_vae", **kwargs)
    try:
        with reference_runtime():
            wrapper = vae.WanVAE(
                z_dim=c.z_dim, vae_pth=str(folder / VAE_FILE), dtype=torch.float32, device="cpu"
            )
            latent = wrapper.encode([video])[0]
            decoded = wrapper.decode([latent])[0]
    finally:
        undo()
    return {"video": video[None]}, {"latent": latent[None], "decoded": decoded[None]}


# --------------------------------------------------------------------------- wav2vec2


def wav2vec_case(ref: Reference, folder: Path, seed: int) -> tuple[Tensors, Tensors]:
    """get_embedding (from generate_multitalk.py) with the reference Wav2Vec2Model subclass, loaded by
    from_pretrained from a folder in the layout of TencentGameMate/chinese-wav2vec2-base."""
    from transformers import Wav2Vec2FeatureExtractor

    from multitalk_worker.models.audio_encoder import audio_encoder_config

    cfg = audio_encoder_config(PARITY.audio_encoder)
    torch.manual_seed(seed + 40)
    model = ref.wav2vec2.Wav2Vec2Model(cfg)
    state = seed_weights(model, seed + 40)
    out_dir = folder / WAV2VEC_DIR
    write_wav2vec_folder(out_dir, state, cfg)
    gen = np.random.default_rng(5000 + seed)
    t = np.arange(10_200) / 16000.0
    signal = (0.3 * np.sin(2 * np.pi * 220.0 * t) + 0.05 * gen.standard_normal(t.shape)).astype(np.float32)
    with reference_runtime():
        # The reference sets config.output_attentions = True in forward; transformers >= 5 rejects that
        # under SDPA, transformers 4 (the authors') silently used eager attention for it. Ask for eager.
        encoder = ref.wav2vec2.Wav2Vec2Model.from_pretrained(
            str(out_dir), local_files_only=True, attn_implementation="eager"
        )
        encoder.feature_extractor._freeze_parameters()
        _check_loaded(encoder.state_dict(), state, "reference wav2vec2")
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(out_dir), local_files_only=True)
        emb = ref.get_embedding(signal, extractor, encoder.eval(), sr=16000, device="cpu")
    return {"signal": torch.from_numpy(signal)}, {"features": emb.float()}


def _check_loaded(loaded: Tensors, expected: Tensors, what: str) -> None:
    """from_pretrained warns and initialises randomly on missing keys; here that must be an error."""
    bad = [k for k, v in expected.items() if k not in loaded or not torch.equal(loaded[k].float(), v.float())]
    if bad:
        raise RuntimeError(f"{what}: {len(bad)} tensors not loaded from the folder, e.g. {bad[:3]}")


def write_wav2vec_folder(out_dir: Path, state: Tensors, cfg: Any) -> None:
    """config.json, preprocessor_config.json and pytorch_model.bin as the hub repo has them: the backbone
    saved from Wav2Vec2ForPreTraining (`wav2vec2.` prefix), weight-norm tensors named weight_g/weight_v."""
    from transformers import Wav2Vec2FeatureExtractor

    out_dir.mkdir(parents=True, exist_ok=True)
    renamed = {}
    for key, value in state.items():
        key = key.replace("parametrizations.weight.original0", "weight_g")
        key = key.replace("parametrizations.weight.original1", "weight_v")
        renamed[f"wav2vec2.{key}"] = value
    torch.save(renamed, out_dir / "pytorch_model.bin")
    cfg.save_pretrained(str(out_dir))
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False
    ).save_pretrained(str(out_dir))
