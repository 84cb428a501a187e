"""LongCat-Video-Avatar pipeline parity, our side: two-segment runs (ai2v, then one continuation) of our
LongCatPipeline's segment loop on the tiny published-layout model, their inputs, and the comparison.

Shared by tools/parity.py (`--model longcat-avatar[-1.0]`, against the checkout's LongCatVideoAvatarPipeline
through tools/_parity_longcat_run_cases.py) and tests/test_parity_longcat.py (against the stored fixtures).

Each run starts from the same inputs on both sides: a bucket-sized uint8 image (the resize is the identity
on both sides, so the image path's own resampling is not part of it), each stream's full audio features
(random, `[features, audio_block, audio_channel]`: the audio path has its own tool,
tools/parity_longcat_audio.py), the two-speaker masks at the bucket size, the prompt and the seed. The stages
compared per run (float32 on the CPU):

* `text_<run>`: the umT5 embeddings and masks of the prompt and, with guidance, of the negative prompt;
* `cond_<run>`: the image's normalised VAE latent (latent 0 of segment 0) and the continuation's 4 latents
  re-encoded from the first segment's last 13 uint8 frames (latents 0-3 of segment 1);
* `sample_<run>`: segment 0's final latent after the full schedule;
* `frames_<run>`: segment 0's decoded uint8 frames;
* `cont_<run>`: segment 1's final latent (its 20 sampled latents after the cache pass) and its kept uint8
  frames 13-92.

Tolerances: float stages rel_err <= 1e-5 as the DiT cases; uint8 frames at most one level apart anywhere
(the reference truncates `255·(x/2 + 0.5)`, so a value within rounding of an integer may fall either side).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from multitalk_worker.models.vae import vae_decode  # noqa: E402
from multitalk_worker.pipeline import longcat as lp  # noqa: E402
from multitalk_worker.pipeline import longcat_sampling as ls  # noqa: E402
from multitalk_worker.pipeline.checkpoint import LoopStart  # noqa: E402
from multitalk_worker.pipeline.image import ConditionImage, person_boxes  # noqa: E402
from multitalk_worker.pipeline.longcat_audio import AUDIO_V10, AUDIO_V15  # noqa: E402
from multitalk_worker.pipeline.longcat_image import (  # noqa: E402
    FACE_MARGIN,
    longcat_person_masks,
    prepare_longcat_image,
)
from multitalk_worker.pipeline.longcat_inputs import LongCatInputs  # noqa: E402
from multitalk_worker.pipeline.longcat_segments import (  # noqa: E402
    COND_FRAMES,
    COND_LATENTS,
    SEGMENT_FRAMES,
    plan_segments,
    rendered_frames,
)
from multitalk_worker.pipeline.pipeline import FrameCollector, to_uint8  # noqa: E402
from multitalk_worker.pipeline.request import GenerationRequest, SamplingParams, Speaker  # noqa: E402
from multitalk_worker.registry import get_model  # noqa: E402
from multitalk_worker.timeline import SAMPLE_RATE  # noqa: E402

Tensors = dict[str, Tensor]
TEXT_DIR, VAE_DIR, TOKENIZER_DIR = "text_encoder", "vae", "tokenizer"  # LongCat-Video's folders (spec §2.1)
BUCKET = (16, 48)  # (H, W): 2 x 6 latents, 1 x 3 tokens per latent frame (person 1, background, person 2)
SEGMENTS = 2
PROMPT = "A  man &amp; a woman talk,\n smiling."  # cleaned to "A man & a woman talk, smiling."
FLOAT_TOLERANCE = 1e-5
FRAME_TOLERANCE = 1  # uint8 levels
FPS = {"longcat-avatar": 25, "longcat-avatar-1.0": 16}
STRIDE = {"longcat-avatar": 1, "longcat-avatar-1.0": 2}  # audio features per video frame (§4.5)


@dataclass(frozen=True)
class Run:
    """One two-segment run: the sampling the demo scripts use for this version."""

    persons: int
    steps: int
    distill: bool  # the reference's `use_distill` (v1.5: the 8-step schedule, both scales 1)
    text_scale: float
    audio_scale: float


RUNS: dict[str, dict[str, Run]] = {
    "longcat-avatar": {  # 1.5: the distilled 8 steps (its default), and 3 guided steps (CFG 4/4)
        "distill_1p": Run(1, 8, True, 1.0, 1.0),
        "distill_2p": Run(2, 8, True, 1.0, 1.0),
        "cfg_1p": Run(1, 3, False, 4.0, 4.0),
    },
    "longcat-avatar-1.0": {  # 1.0: its default schedule with CFG 4/4, 3 steps
        "cfg_1p": Run(1, 3, False, 4.0, 4.0),
        "cfg_2p": Run(2, 3, False, 4.0, 4.0),
    },
}
HEAD_LATENTS = 2  # latents the CI check decodes
HEAD_FRAMES = 1 + 4 * (HEAD_LATENTS - 1)  # the frames they decode to


def run_inputs(cfg: dict, model_name: str, run: Run, seed: int) -> Tensors:
    """The seeded inputs of one run: image uint8 [H, W, 3], features [P, N, block, channel], masks, seed."""
    gen = torch.Generator().manual_seed(seed)
    height, width = BUCKET
    image = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    count = STRIDE[model_name] * rendered_frames(SEGMENTS)  # the scripts' padded track's features
    features = torch.randn(run.persons, count, cfg["audio_block"], cfg["audio_channel"], generator=gen)
    inputs: Tensors = {"image": image, "features": features, "seed": torch.tensor([seed])}
    if run.persons == 2:
        inputs["masks"] = person_masks(height, width)
    return inputs


def person_masks(height: int, width: int) -> Tensor:
    """Person 1 left, person 2 right (end-exclusive boxes as the multi script draws them), background: at
    the token grid (one token per 16 pixels, read at its top-left pixel) tokens 0 | 1 | 2 of each row."""
    third = width // 3
    masks = torch.zeros(3, height, width)
    masks[0, : height - 2, : third - 2] = 1
    masks[1, : height - 2, 2 * third : width - 2] = 1
    masks[2] = (masks[0] + masks[1] == 0).float()
    return masks


def utf8(text: str) -> Tensor:
    """A string as a uint8 tensor, so that a stage can hold it (compared exactly)."""
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def build_ours(root: Path, model_name: str, dit_folder: str) -> lp.LongCatPipeline:
    """Our pipeline on the folders under root: the DiT through our strict loader, umT5, its tokenizer and the
    Wan VAE through their libraries' loaders (the classes our pipeline runs), all float32 on the CPU; one
    speaker's guidance batched as the reference's (`batched_guidance`)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    from multitalk_worker.weights.longcat import load_dit

    dit = load_dit(root, dit_folder, device=torch.device("cpu"), dtype=torch.float32)
    text = UMT5EncoderModel.from_pretrained(str(root / TEXT_DIR), dtype=torch.float32).eval()
    vae = AutoencoderKLWan.from_pretrained(str(root / VAE_DIR), torch_dtype=torch.float32).eval()
    v15 = model_name == "longcat-avatar"

    def no_encoder(signal: np.ndarray, frames: int) -> Tensor:
        raise RuntimeError("the parity runs pass the audio features; the audio path is parity_longcat_audio")

    bundle = lp.LongCatBundle(
        dit=dit.eval(),
        text_encoder=text,
        tokenizer=AutoTokenizer.from_pretrained(str(root / TOKENIZER_DIR)),
        vae=vae,
        audio=no_encoder,
        audio_config=AUDIO_V15 if v15 else AUDIO_V10,
        model=model_name,
        weights=str(root),
    )
    return lp.LongCatPipeline(bundle, torch.device("cpu"), batched_guidance=True)


def _state(pipe: lp.LongCatPipeline, model_name: str, run: Run, inputs: Tensors) -> tuple[lp._Run, lp._Text]:
    """Our segment loop's state for one run (`_Run`, as `LongCatPipeline.__call__` builds it) over SEGMENTS
    whole segments, and the encoded text."""
    spec = get_model(model_name)
    family = spec.family
    assert family is not None
    pixels = inputs["image"].permute(2, 0, 1)[None, :, None].float() / 255
    first = ConditionImage(pixels=(pixels - 0.5) * 2, source_size=BUCKET, bucket=BUCKET)
    frames = rendered_frames(SEGMENTS)
    silence = np.zeros(frames * SAMPLE_RATE // spec.fps, dtype=np.float32)
    prepared = LongCatInputs(
        spec=spec,
        streams=(silence,) * run.persons,
        soundtrack=silence,
        track_s=(silence.shape[0] / SAMPLE_RATE,) * run.persons,
        first=first,
        source_frames=None,
        person_masks=inputs.get("masks"),
        plan=plan_segments(frames, frames, "whole_segments"),
    )
    sampling = SamplingParams(steps=run.steps, text_guidance=run.text_scale, audio_guidance=run.audio_scale,
                              seed=int(inputs["seed"]))  # fmt: skip
    request = GenerationRequest(
        speakers=tuple(Speaker(audio=Path("features-given.wav")) for _ in range(run.persons)),
        prompt=PROMPT,
        model=spec.name,
        sampling=sampling,
    )
    mode: ls.ScheduleMode = family.schedule if run.distill else "default"
    text = pipe._text(request, ls.guidance_on(run.text_scale, run.audio_scale))
    features = list(inputs["features"].unbind(0))
    state = lp._Run(pipe, prepared, features, text, run.steps, mode, family.shift, run.text_scale,
                    run.audio_scale, None, None)  # fmt: skip
    return state, text


def _text_outputs(text: lp._Text, model_name: str, persons: int) -> Tensors:
    """The embeddings and masks; with guidance also the default negative prompt our pipeline picked."""
    out = {"text/prompt": text.positive[0][0], "text/prompt_mask": text.positive[1][0]}
    if text.negative is not None:
        family = get_model(model_name).family
        assert family is not None
        out |= {"text/negative": text.negative[0][0], "text/negative_mask": text.negative[1][0],
                "text/negative_utf8": utf8(family.default_negative(persons))}  # fmt: skip
    return out


@torch.inference_mode()
def run_ours(pipe: lp.LongCatPipeline, model_name: str, run: Run, inputs: Tensors) -> Tensors:
    """Our whole segment loop (`_Run.generate`: sampling, decoding, the uint8 round trip, the continuation)
    over SEGMENTS segments; every stage's outputs."""
    state, text = _state(pipe, model_name, run, inputs)
    latents: list[Tensor] = []
    sample_first, sample_next = state._first, state._continue
    state._first = lambda *a: _kept(latents, sample_first(*a))  # type: ignore[method-assign]
    state._continue = lambda *a: _kept(latents, sample_next(*a))  # type: ignore[method-assign]
    sink = FrameCollector()
    seed = int(inputs["seed"])
    state.generate(torch.Generator("cpu").manual_seed(seed), sink, {}, LoopStart(seed, None, None))
    video = torch.from_numpy(sink.frames())
    return _text_outputs(text, model_name, run.persons) | {
        "cond/image_latent": latents[0][:, :, :1],
        "cond/reencoded": latents[1][:, :, :COND_LATENTS],
        "sample/latent": latents[0],
        "frames/uint8": video[:SEGMENT_FRAMES],
        "cont/latent": latents[1],
        "cont_frames/uint8": video[SEGMENT_FRAMES:],
    }


@torch.inference_mode()
def run_ours_stored(pipe: lp.LongCatPipeline, model_name: str, run: Run, inputs: Tensors,
                    carried: Tensor) -> Tensors:  # fmt: skip
    """The CI form of `run_ours` (no full decode: a 93-frame decode of the tiny VAE takes ~15 s on a CPU):
    segment 0 by `_Run._first`, the first HEAD_LATENTS latents decoded (the causal decoder's first frames
    depend on those latents only), and the continuation by `_Run._continue` from the reference's stored
    uint8 frames 80-92 of segment 0 (`carried`), with our segment 0's reference and tail latents."""
    state, text = _state(pipe, model_name, run, inputs)
    segments, timings = state.inputs.plan.segments, {}
    generator = torch.Generator("cpu").manual_seed(int(inputs["seed"]))
    first = state._first(segments[0], generator, timings)
    head = to_uint8(vae_decode(pipe.bundle.vae, first[:, :, :HEAD_LATENTS])[0])
    pixels = lp._from_uint8(carried.numpy(), torch.device("cpu"))
    tail = first[:, :, -COND_LATENTS:]
    second = state._continue(segments[1], generator, first[:, :, :1], pixels, tail, timings)
    return _text_outputs(text, model_name, run.persons) | {
        "cond/image_latent": first[:, :, :1],
        "cond/reencoded": second[:, :, :COND_LATENTS],
        "sample/latent": first,
        "frames/head": torch.from_numpy(head),
        "cont/latent": second,
    }


def stored_form(outputs: Tensors) -> Tensors:
    """What the fixtures keep of a reference run: the frames thinned to segment 0's first HEAD_FRAMES (what
    `run_ours_stored` decodes) and last 13 (its continuation's input), and segment 1's first HEAD_FRAMES."""
    kept = {k: v for k, v in outputs.items() if "uint8" not in k}
    frames = outputs["frames/uint8"]
    return kept | {
        "frames/head": frames[:HEAD_FRAMES],
        "frames/carried": frames[-COND_FRAMES:],
        "cont_frames/head": outputs["cont_frames/uint8"][:HEAD_FRAMES],
    }


def _kept(store: list[Tensor], latent: Tensor) -> Tensor:
    store.append(latent.clone())
    return latent


IMAGE_SOURCES = ((1280, 720), (720, 1280), (1024, 1024), (640, 480), (333, 517))  # (W, H)
IMAGE_RESOLUTIONS = ("480p", "720p")


def source_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth seeded RGB picture of `size` (W, H): random 8x8 blocks, bicubic-upscaled."""
    width, height = size
    rng = np.random.default_rng([seed, width, height])
    blocks = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((width, height), resample=Image.Resampling.BICUBIC)


def digest(pixels: Tensor) -> Tensor:
    """sha256 of a float32 tensor's bytes, as a uint8 tensor (the fixtures keep digests of big images)."""
    return utf8(hashlib.sha256(pixels.float().contiguous().numpy().tobytes()).hexdigest())


def source_boxes(size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Two person boxes (r0, c0, r1, c1) in source pixels: left and right thirds, overlapping rows."""
    width, height = size
    return [(height // 10, width // 20, 7 * height // 10, width // 2 + 7),
            (height // 3, width // 2 - 5, 9 * height // 10, 19 * width // 20)]  # fmt: skip


def image_ours(seed: int) -> Tensors:
    """The `image` stage, ours: each source's LongCat bucket, the digest of its [1, 3, H, W] pixels and of
    its two-person masks at the bucket (`> 0`), and the default two-person boxes (no regions given)."""
    out: Tensors = {}
    for size in IMAGE_SOURCES:
        image = source_image(size, seed)
        for resolution in IMAGE_RESOLUTIONS:
            prepared = prepare_longcat_image(image, resolution)
            masks = longcat_person_masks(source_boxes(size), prepared.source_size, prepared.bucket)
            name = f"image/{size[0]}x{size[1]}_{resolution}"
            out[f"{name}_bucket"] = torch.tensor(prepared.bucket)
            out[f"{name}_utf8"] = digest(prepared.pixels[:, :, 0])
            out[f"{name}_masks_utf8"] = digest((masks > 0).float())
        boxes = person_boxes([None, None], image.height, image.width, margin=FACE_MARGIN)
        out[f"image/{size[0]}x{size[1]}_default_boxes"] = torch.tensor(boxes)
    return out


def stage_outputs(outputs: Tensors) -> dict[str, Tensors]:
    """{"text": {...}, "cond": {...}, ...} from the flat `<stage>/<name>` keys."""
    grouped: dict[str, Tensors] = {}
    for key, value in outputs.items():
        stage, name = key.split("/")
        grouped.setdefault(stage, {})[name] = value
    return grouped


def compare_stage(stage: str, ours: Tensors, ref: Tensors) -> tuple[float, float, bool]:
    """(max |Δ|, rel_err, ok). Masks must be equal; uint8 frames within FRAME_TOLERANCE levels."""
    max_abs, num, den = 0.0, 0.0, 0.0
    exact = True
    for name, r in ref.items():
        o = ours[name]
        if o.shape != r.shape:
            return float("inf"), float("inf"), False
        if name.endswith(("utf8", "bucket", "boxes")):
            exact &= torch.equal(o, r)
            continue
        d = o.double() - r.double()
        max_abs = max(max_abs, d.abs().max().item() if d.numel() else 0.0)
        num += d.pow(2).sum().item()
        den += r.double().pow(2).sum().item()
        if name.endswith(("mask", "utf8")) and not torch.equal(o, r):
            exact = False
    rel = (num / den) ** 0.5 if den else num**0.5
    if stage.endswith("frames"):
        return max_abs, rel, max_abs <= FRAME_TOLERANCE
    return max_abs, rel, exact and rel <= FLOAT_TOLERANCE


def tolerance_text(stage: str) -> str:
    return f"{FRAME_TOLERANCE} lvl" if stage.endswith("frames") else f"{FLOAT_TOLERANCE:.0e}"
