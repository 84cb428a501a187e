"""The built-in tiny model: every network of the TINY preset with seeded random weights, built in-process.

It is a real model (the same classes, code paths and precisions as the 14B one, random weights), used by
`--weights tiny` and by the tests. Nothing is downloaded: the umT5-style tokenizer is built here with the
`tokenizers` library (Unigram model, pad id 0, EOS `</s>` id 1 appended to every sequence).

How the weights are drawn from `seed` (the rule the tests and the parity fixtures rely on):

* one generator seeded `seed` visits the networks in the order dit, text_encoder, image_encoder, vae,
  audio_encoder, each in sorted key order. The DiT's keys include the audio adapter's, so this gives the
  MultiTalk model (adapter "multitalk"); its weights are pinned by tests/test_tiny.py;
* every other adapter (InfiniteTalk's "single", "multi") is drawn by its own generator, seeded
  `adapter_seed(seed, name)`, over the adapter keys alone in sorted key order, and replaces the DiT's audio
  tensors. So an InfiniteTalk tiny model has exactly the MultiTalk tiny model's base for the same seed, and
  its adapters differ from each other and from MultiTalk's.
"""

from __future__ import annotations

import hashlib
import math

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from torch import nn
from transformers import PreTrainedTokenizerFast, Wav2Vec2FeatureExtractor

from multitalk_worker.models.audio_encoder import build_audio_encoder
from multitalk_worker.models.configs import TINY, MultiTalkConfig
from multitalk_worker.models.transformer import MultiTalkTransformer
from multitalk_worker.registry import DEFAULT_MODEL
from multitalk_worker.timeline import SAMPLE_RATE
from multitalk_worker.weights.adapters import apply_adapter_state, is_audio_key, resolve_adapter
from multitalk_worker.weights.checkpoint import assign_state, empty_model
from multitalk_worker.weights.loader import DEFAULT_ADAPTER, ModelBundle, component_dtypes, empty_models
from multitalk_worker.weights.original import T5_TIED

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in umT5
_WORDS = (
    "a an the and of in on with to is are man woman person people talking speaking singing smiling "
    "looking camera close up portrait studio light background room outdoor video face hands head "
    "two one young old happy calm bright tones overexposed static blurred details subtitles style "
    "works paintings images overall gray worst quality low jpeg compression residue ugly incomplete "
    "extra fingers poorly drawn deformed disfigured misshapen limbs fused still picture messy three "
    "legs many walking backwards"
).split()


def build_tiny_tokenizer(
    vocab_size: int = TINY.text_encoder.vocab_size, max_length: int = 512
) -> PreTrainedTokenizerFast:
    """A small SentencePiece-style Unigram tokenizer with umT5's special-token ids."""
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    pieces = ["▁", *letters, *".,!?'-:;()\"", *(f"▁{c}" for c in letters), *(f"▁{w}" for w in _WORDS)]
    pieces = list(dict.fromkeys(pieces))[: vocab_size - len(SPECIAL_TOKENS)]
    # longer pieces score higher, so whole words win over letter sequences
    vocab = [(token, 0.0) for token in SPECIAL_TOKENS] + [(p, -10.0 / len(p)) for p in pieces]
    tokenizer = Tokenizer(Unigram(vocab, unk_id=SPECIAL_TOKENS.index("<unk>"), byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
        padding_side="right",
    )


def build_tiny_feature_extractor() -> Wav2Vec2FeatureExtractor:
    """wav2vec2 preprocessing: 16 kHz mono, zero-mean unit-variance normalisation."""
    return Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SAMPLE_RATE,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=False,
    )


def shape_noise(key: str, noise: torch.Tensor) -> torch.Tensor:
    """Standard-normal `noise` for the tensor `key` turned into weights that keep activations in range:
    1 ± 0.1 for norm scales, fan-in scaled for matrices, 0.1 · noise otherwise."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "gamma" or (leaf == "weight" and "norm" in key):
        return 1.0 + 0.1 * noise
    if noise.ndim >= 2 and "modulation" not in key and "scale_shift" not in key:
        return noise / math.sqrt(math.prod(noise.shape[1:]))
    return 0.1 * noise


def _random_tensor(key: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Seeded weights by `shape_noise`'s rule, rounded to bf16 so that every file dtype of the real layouts
    (bf16 .pth, float32 shards) stores them exactly and a written checkpoint loads back bit for bit."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return shape_noise(key, noise).to(torch.bfloat16).float()


def randomize(
    model: nn.Module,
    generator: torch.Generator,
    *,
    device: torch.device,
    dtype: torch.dtype,
    tied: dict[str, str] | None = None,
) -> nn.Module:
    """Give a meta-built model seeded random weights (visited in sorted key order), cast and assigned."""
    tied = tied or {}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in sorted(model.state_dict().items()):
        if key in tied:
            continue
        value = _random_tensor(key, tensor.shape, generator)
        state[key] = value.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    for key, source in tied.items():
        state[key] = state[source]
    assign_state(model, state, device=device)
    return model


def adapter_seed(seed: int, adapter: str) -> int:
    """The seed of adapter `adapter`'s own generator: the first 8 bytes of sha256("<seed>/<adapter>"),
    little-endian, as a non-negative int64 (stable across runs, platforms and Python versions)."""
    digest = hashlib.sha256(f"{seed}/{adapter}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def tiny_adapter_state(seed: int, adapter: str, *, config: MultiTalkConfig = TINY) -> dict[str, torch.Tensor]:
    """The adapter tensors (8·L + 10) of the tiny model `build_tiny_bundle(seed, adapter=adapter)`, in
    float32 (every value exact in bf16), keyed as in the published adapter files."""
    with empty_model():
        dit = MultiTalkTransformer(config.dit)
    cpu = torch.device("cpu")
    if adapter == DEFAULT_ADAPTER:  # drawn with the base, by the bundle's own generator
        randomize(dit, torch.Generator().manual_seed(seed), device=cpu, dtype=torch.float32)
        return {k: v for k, v in dit.state_dict().items() if is_audio_key(k)}
    generator = torch.Generator().manual_seed(adapter_seed(seed, adapter))
    shapes = {k: v.shape for k, v in dit.state_dict().items() if is_audio_key(k)}
    return {key: _random_tensor(key, shape, generator) for key, shape in sorted(shapes.items())}


def build_tiny_bundle(
    seed: int = 0,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    config: MultiTalkConfig = TINY,
    model: str = DEFAULT_MODEL,
    adapter: str | None = None,
    persons: int = 1,
) -> ModelBundle:
    """Every network of `config` (TINY) with weights drawn from `seed`, at the precisions of `load_models`.

    `model`, `adapter` and `persons` choose the audio adapter as `load_models` does (registry names); the
    base weights do not depend on them (see the module docstring for the rule)."""
    chosen = resolve_adapter(model, adapter, persons=persons)
    device = torch.device(device)
    dtypes = component_dtypes(dtype)
    generator = torch.Generator().manual_seed(seed)
    models = empty_models(config)
    with empty_model():
        audio_encoder = build_audio_encoder(config.audio_encoder)
    for name, network in models.by_name().items():
        tied = dict(T5_TIED) if name == "text_encoder" else None
        randomize(network, generator, device=device, dtype=getattr(dtypes, name), tied=tied)
    randomize(audio_encoder, generator, device=torch.device("cpu"), dtype=dtypes.audio_encoder)
    if chosen.name != DEFAULT_ADAPTER:
        apply_adapter_state(models.dit, tiny_adapter_state(seed, chosen.name, config=config))
    return ModelBundle(
        dit=models.dit,
        text_encoder=models.text_encoder,
        tokenizer=build_tiny_tokenizer(max_length=config.text_encoder.text_len),
        image_encoder=models.image_encoder,
        vae=models.vae,
        audio_encoder=audio_encoder,
        feature_extractor=build_tiny_feature_extractor(),
        config=config,
        model=model,
        adapter=chosen.name,
    )
