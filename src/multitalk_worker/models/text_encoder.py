"""umT5-XXL text encoder as transformers' UMT5EncoderModel (spec 4, 8.5)."""

from __future__ import annotations

import torch
from transformers import UMT5Config, UMT5EncoderModel

from multitalk_worker.models.configs import TextEncoderConfig


def text_encoder_config(cfg: TextEncoderConfig) -> UMT5Config:
    """The transformers config of the umT5 encoder: gated tanh-GELU FFN, per-layer relative bias."""
    config = UMT5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    # Eager attention rounds scores and probabilities to bf16 where the reference does; fused SDPA
    # accumulates in float32 and lands 6e-3 (relative) away in bf16 (tools/parity.py, stage t5_bf16).
    # (The setter the `attn_implementation` keyword goes through; transformers 5's typed __init__ lacks it.)
    config._attn_implementation = "eager"
    return config


def build_text_encoder(cfg: TextEncoderConfig) -> UMT5EncoderModel:
    """An umT5 encoder with freshly initialised weights, in eval mode (use under a meta-device context to
    build it without memory)."""
    return UMT5EncoderModel(text_encoder_config(cfg)).eval().requires_grad_(False)


@torch.no_grad()
def encode_text(
    encoder: UMT5EncoderModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> list[torch.Tensor]:
    """Encode a padded batch `[B, text_len]` and cut each row to its own non-pad length (EOS included).

    Returns B tensors `[L_i, d_model]` in the encoder's dtype (spec 4: bf16 for the real model).
    """
    device = encoder.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device)
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, C]
    lengths = attention_mask.gt(0).sum(dim=1).tolist()
    return [row[:length] for row, length in zip(hidden, lengths, strict=True)]
