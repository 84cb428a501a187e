"""LongCat-Video-Avatar pipeline parity, the reference side: the checkout's LongCatVideoAvatarPipeline driven
as the demo scripts drive it (run_demo_avatar_single_audio_to_video.py / ..._multi_...: `generate_ai2v`, the
uint8 frames, then `generate_avc` with the previous segment's frames and latent, the first latent as the
reference, `ref_img_index` 10, `mask_frame_range` 3), on the tiny published-layout folders, float32 on a CPU.

What is the checkout's own: the pipeline class and its methods (prompt cleaning and encoding, bucket choice,
image and video preprocessing, VAE encode and (de)normalisation, noise draw, schedules incl. `enhance_hf`,
guidance, the KV-cache pass, the post-loop overwrite, decode and postprocessing), its VAE class
(`longcat_video.modules.autoencoder_kl_wan`), scheduler and DiT, the demo scripts' negative prompts (read
from their source) and their window statements (tools/_parity_longcat_audio_cases.py compiles them).

What the tool supplies or replaces at run time (the checkout is not modified):

* the stand-ins of tools/_parity_longcat_reference.py for flash_attn and CUDA, and `loguru` (only its
  warning logger is used) as the standard logging module's logger when it is not installed;
* `get_bucket_config` answers the tiny resolution with the tiny bucket (32 x 64) and every other one as the
  checkout does; the image is given at that size, so the resize is the identity on both sides;
* `max_sequence_length` = the tiny DiT's `model_max_length` (12; the demo leaves the default 512, the
  published DiT's length);
* the continuation's noise: `generate_avc` draws it in the DiT's dtype (`prepare_latents(dtype=dit_dtype)`),
  which is bf16 for the published weights and float32 here; the tool draws it in bf16 from the same
  generator, right after segment 0's draw, and passes it as `latents=`, as the published bf16 DiT would draw
  it (our pipeline always draws it in bf16, spec §7.5);
* the multi script's DiT folder (`avatar_multi` in 1.0) is the single one: the tiny weights are the same.
"""

from __future__ import annotations

import ast
import importlib
import logging
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _parity_longcat_run_ours import (
    BUCKET,
    FPS,
    PROMPT,
    RUNS,
    SEGMENTS,
    STRIDE,
    TEXT_DIR,
    TOKENIZER_DIR,
    VAE_DIR,
    Run,
    Tensors,
    utf8,
)

from multitalk_worker.models.configs import TINY
from multitalk_worker.models.text_encoder import build_text_encoder
from multitalk_worker.models.vae import build_vae
from multitalk_worker.tiny import build_tiny_tokenizer, randomize
from multitalk_worker.weights.checkpoint import empty_model
from multitalk_worker.weights.original import T5_TIED

PIPELINE_MODULE = "longcat_video.pipeline_longcat_video_avatar"
TINY_RESOLUTION = "tiny"
SCRIPTS = {1: "run_demo_avatar_single_audio_to_video.py", 2: "run_demo_avatar_multi_audio_to_video.py"}
MODEL_TYPES = {"longcat-avatar": "avatar-v1.5", "longcat-avatar-1.0": "avatar-v1.0"}
SHIFTS = {"longcat-avatar": 7.0, "longcat-avatar-1.0": 12.0}  # the scheduler configs' shift (spec §7.1)
REF_IMG_INDEX, MASK_FRAME_RANGE = 10, 3  # the scripts' defaults
NUM_FRAMES, NUM_COND_FRAMES = 93, 13


def write_encoders(root: Path, seed: int) -> None:
    """umT5 (transformers folder), its tokenizer and the Wan VAE (diffusers folder) with seeded weights, in
    LongCat-Video's folders (`text_encoder/`, `tokenizer/`, `vae/`)."""
    generator = torch.Generator().manual_seed(seed)
    with empty_model():
        text = build_text_encoder(TINY.text_encoder)
        vae = build_vae(TINY.vae)
    cpu = torch.device("cpu")
    randomize(text, generator, device=cpu, dtype=torch.float32, tied=dict(T5_TIED))
    randomize(vae, generator, device=cpu, dtype=torch.float32)
    # stored in bf16 (as the demo loads them, spec §2.9-2.10); both sides load them as float32, exactly
    text.to(torch.bfloat16).save_pretrained(str(root / TEXT_DIR))
    vae.to(torch.bfloat16).save_pretrained(str(root / VAE_DIR))
    build_tiny_tokenizer(max_length=TINY.text_encoder.text_len).save_pretrained(str(root / TOKENIZER_DIR))


def load_reference_pipeline(checkout: Path) -> types.ModuleType:
    """The checkout's pipeline module (after tools/_parity_longcat_reference.py's DiT import)."""
    from _parity_longcat_reference import _patched_import, load_reference_dit

    load_reference_dit(checkout)
    if importlib.util.find_spec("loguru") is None:
        sys.modules.setdefault("loguru", types.SimpleNamespace(logger=logging.getLogger("longcat_video")))  # type: ignore[arg-type]
    with _patched_import():
        module = importlib.import_module(PIPELINE_MODULE)
    original = module.get_bucket_config
    height, width = BUCKET

    def bucket_config(resolution: str, scale_factor_spatial: int) -> dict[str, Any]:
        if resolution == TINY_RESOLUTION:
            return {f"{height / width:.2f}": ([height, width], 1)}
        return original(resolution, scale_factor_spatial)

    module.get_bucket_config = bucket_config
    return module


def demo_negative_prompt(checkout: Path, persons: int) -> str:
    """The `negative_prompt = "..."` literal of the demo script the reference runs for `persons`."""
    tree = ast.parse((checkout / SCRIPTS[persons]).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "negative_prompt":
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                return node.value.value
    raise LookupError(f"no negative_prompt literal in {SCRIPTS[persons]}")


def reference_pipe(module: types.ModuleType, root: Path, model_name: str, dit_folder: str) -> Any:
    from transformers import AutoTokenizer, UMT5EncoderModel

    dit_cls = sys.modules["longcat_video.modules.avatar.longcat_video_dit_avatar"]
    dit = dit_cls.LongCatVideoAvatarTransformer3DModel.from_pretrained(
        str(root), subfolder=dit_folder, cp_split_hw=[1, 1], torch_dtype=torch.float32
    ).eval()
    vae_module = sys.modules["longcat_video.modules.autoencoder_kl_wan"]
    vae = vae_module.AutoencoderKLWan.from_pretrained(str(root / VAE_DIR), torch_dtype=torch.float32).eval()
    scheduler_module = sys.modules["longcat_video.modules.scheduling_flow_match_euler_discrete"]
    pipe = module.LongCatVideoAvatarPipeline(
        tokenizer=AutoTokenizer.from_pretrained(str(root / TOKENIZER_DIR)),
        text_encoder=UMT5EncoderModel.from_pretrained(str(root / TEXT_DIR), dtype=torch.float32).eval(),
        vae=vae,
        scheduler=scheduler_module.FlowMatchEulerDiscreteScheduler(shift=SHIFTS[model_name]),
        dit=dit,
        model_type=MODEL_TYPES[model_name],
    )
    return pipe.to("cpu")


def run_reference(
    pipe: Any,
    checkout: Path,
    windows: tuple[Any, Any],
    model_name: str,
    run: Run,
    inputs: Tensors,
    text_len: int,
) -> Tensors:
    """Segment 0 (`generate_ai2v`) and one continuation (`generate_avc`) as the demo's generate runs them."""
    from PIL import Image

    negative = demo_negative_prompt(checkout, run.persons)
    masks = inputs.get("masks")
    common = {
        "prompt": PROMPT, "negative_prompt": negative, "num_frames": NUM_FRAMES,
        "num_inference_steps": run.steps, "text_guidance_scale": run.text_scale,
        "audio_guidance_scale": run.audio_scale, "output_type": "both", "use_distill": run.distill,
        "max_sequence_length": text_len, "ref_target_masks": masks,
    }  # fmt: skip
    generator = torch.Generator("cpu").manual_seed(int(inputs["seed"]))
    streams = inputs["features"].unbind(0)
    space: dict[str, Any] = {
        "torch": torch, "full_audio_emb": streams[0], "audio_stride": STRIDE[model_name],
        "num_frames": NUM_FRAMES, "num_cond_frames": NUM_COND_FRAMES, "local_rank": "cpu",
    }  # fmt: skip
    exec(windows[0], space)  # noqa: S102 - the script's windows before its segment loop
    image = Image.fromarray(inputs["image"].numpy())
    with torch.no_grad():  # as inside generate_ai2v
        text = pipe.encode_prompt(PROMPT, negative, ls_guided(run), 1, common["max_sequence_length"], "cpu",
                                  torch.float32)  # fmt: skip
    output, latent = pipe.generate_ai2v(
        image=image, resolution=TINY_RESOLUTION, generator=generator,
        audio_emb=_gather(streams, space["center_indices"]), **common,
    )  # fmt: skip
    video = [Image.fromarray((output[0][i] * 255).astype(np.uint8)) for i in range(output[0].shape[0])]
    first_latent = latent.clone()
    exec(windows[1], space)  # noqa: S102 - one pass of the script's segment loop
    height, width = BUCKET
    shape = (1, pipe.dit.config.in_channels, (NUM_FRAMES - 1) // 4 + 1, height // 8, width // 8)
    noise = torch.randn(shape, generator=generator, dtype=torch.bfloat16)  # the bf16 DiT's draw (module doc)
    output2, latent2 = pipe.generate_avc(
        video=video, video_latent=latent, height=height, width=width, num_cond_frames=NUM_COND_FRAMES,
        generator=generator, use_kv_cache=True, offload_kv_cache=False, enhance_hf=not run.distill,
        audio_emb=_gather(streams, space["center_indices"]), ref_latent=latent[:, :, :1].clone(),
        ref_img_index=REF_IMG_INDEX, mask_frame_range=MASK_FRAME_RANGE, latents=noise, **common,
    )  # fmt: skip
    frames2 = (output2[0] * 255).astype(np.uint8)
    out: Tensors = {"text/prompt": text[0][0, 0], "text/prompt_mask": text[1][0]}
    if text[2] is not None:
        out |= {"text/negative": text[2][0, 0], "text/negative_mask": text[3][0],
                "text/negative_utf8": utf8(negative)}  # fmt: skip
    out |= {
        "cond/image_latent": first_latent[:, :, :1],
        "cond/reencoded": latent2[:, :, :4],
        "sample/latent": first_latent,
        "frames/uint8": torch.from_numpy(np.stack([np.asarray(v) for v in video])),
        "cont/latent": latent2,
        "cont_frames/uint8": torch.from_numpy(frames2[NUM_COND_FRAMES:]),
    }
    return out


def image_reference(pipe: Any, checkout: Path, seed: int) -> tuple[Tensors, float]:
    """The `image` stage by the checkout: `get_condition_shape` (one GPU: scale factor 16) and its
    `video_processor.preprocess(..., resize_mode="crop")`, as generate_ai2v runs them, and the multi script's
    masks of two boxes through `_resize_and_centercrop_tensor` (`> 0`, as the DiT reads them), and its
    default boxes; with the largest |ours − ref| of the pixels (the stage itself keeps digests)."""
    from _parity_longcat_run_ours import IMAGE_RESOLUTIONS, IMAGE_SOURCES, digest, source_boxes, source_image

    from multitalk_worker.pipeline.longcat_image import prepare_longcat_image

    out: Tensors = {}
    worst = 0.0
    for size in IMAGE_SOURCES:
        image = source_image(size, seed)
        for resolution in IMAGE_RESOLUTIONS:
            height, width = pipe.get_condition_shape(image, resolution, scale_factor_spatial=16)
            pixels = pipe.video_processor.preprocess(image, height=height, width=width, resize_mode="crop")
            name = f"image/{size[0]}x{size[1]}_{resolution}"
            out[f"{name}_bucket"] = torch.tensor([height, width])
            out[f"{name}_utf8"] = digest(pixels)
            masks = pipe._resize_and_centercrop_tensor(_demo_masks(size, source_boxes(size)), height, width)
            out[f"{name}_masks_utf8"] = digest((masks > 0).float())
            ours = prepare_longcat_image(image, resolution).pixels[:, :, 0]
            if ours.shape == pixels.shape:
                worst = max(worst, (ours - pixels).abs().max().item())
            else:
                worst = float("inf")
        out[f"image/{size[0]}x{size[1]}_default_boxes"] = _default_boxes(checkout, size)
    return out, worst


def _default_boxes(checkout: Path, size: tuple[int, int]) -> torch.Tensor:
    """The multi script's default boxes (its `if left_person_bbox is None and right_person_bbox is None:`
    statement, compiled from the script and run with the source size): [[r0, c0, r1, c1], [...]]."""
    path = checkout / SCRIPTS[2]
    test = "left_person_bbox is None and right_person_bbox is None"
    tree = ast.parse(path.read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == test)
    space: dict[str, Any] = {"left_person_bbox": None, "right_person_bbox": None,
                             "src_width": size[0], "src_height": size[1]}  # fmt: skip
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), space)  # noqa: S102
    names = ("y_min", "x_min", "y_max", "x_max")
    return torch.tensor([[space[f"{side}_{n}"] for n in names] for side in ("left", "right")])


def _demo_masks(size: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """The multi script's `ref_target_masks` of two bboxes [y_min, x_min, y_max, x_max] (its statements:
    each box filled, the background where neither is)."""
    width, height = size
    human = [torch.zeros([height, width]) for _ in boxes]
    for mask, (y0, x0, y1, x1) in zip(human, boxes, strict=True):
        mask[y0:y1, x0:x1] = 1
    background = torch.zeros([height, width])
    for mask in human:
        background += mask
    background = torch.where(background > 0, torch.tensor(0), torch.tensor(1))
    return torch.stack([*human, background], dim=0)


def ls_guided(run: Run) -> bool:
    return run.text_scale > 1.0 or run.audio_scale > 1.0  # the pipeline's do_classifier_free_guidance


def _gather(streams: tuple[torch.Tensor, ...], center_indices: torch.Tensor) -> torch.Tensor:
    """The multi script's `audio_embs`: each stream's `full[center_indices][None]`, concatenated (the single
    script's is stream 0's)."""
    return torch.cat([full[center_indices][None] for full in streams])


def window_statements(checkout: Path) -> tuple[Any, Any]:
    from _parity_longcat_audio_cases import _window_statements

    return _window_statements(checkout / SCRIPTS[1])


def runs_for(model_name: str, persons: list[int]) -> dict[str, Run]:
    return {name: run for name, run in RUNS[model_name].items() if run.persons in persons}


__all__ = [
    "FPS",
    "SEGMENTS",
    "load_reference_pipeline",
    "reference_pipe",
    "run_reference",
    "runs_for",
    "window_statements",
    "write_encoders",
]
