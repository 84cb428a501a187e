"""End-to-end clips through `TalkingVideoPipeline` on one GPU, with full-size networks and random weights.

    python bench/bench_pipeline.py --out DIR [--cases ref-fast,fast-fast,fast-fast-2p,fast-default]

Every stage runs as in production (audio decode + loudness + wav2vec2, image buckets, umT5, CLIP, VAE
encode, DiT sampling, VAE decode, colour correction, mp4 mux with PyAV, then the mp4 is decoded and
checked); only the weights are random (no checkpoint can be read here) and the tokenizer is the built-in
small one (token ids < 384 of umT5's 256,384). Inputs: examples/person.png (square -> 640x640 bucket at
480p) and examples/speech_a.wav cut to one 81-frame clip (--max-duration 3.24). Cases:
  ref-fast      reference engine, `fast` preset (4 steps x 2 passes)
  fast-fast     fast engine (compiled), `fast` preset: the first call pays compilation, the second is warm
  fast-fast-warm  the same, one call (warm when an earlier case compiled the same shapes)
  fast-fast-2p  fast engine, `fast` preset, two speakers (examples/two_people.png, parallel)
  fast-default  fast engine, `default` preset (40 steps x 3 passes)
The reference engine runs first (the fast engine changes the networks in place: compiled blocks, bf16
VAE); the other cases run in the order given.
Writes DIR/results.json, the mp4s, and prints a table last.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from multitalk_worker.media import probe_mp4, write_mp4  # noqa: E402
from multitalk_worker.models.audio_encoder import build_audio_encoder  # noqa: E402
from multitalk_worker.models.configs import CONFIGS, TINY, MultiTalkConfig  # noqa: E402
from multitalk_worker.models.image_encoder import build_image_encoder  # noqa: E402
from multitalk_worker.models.text_encoder import build_text_encoder  # noqa: E402
from multitalk_worker.models.transformer import MultiTalkTransformer  # noqa: E402
from multitalk_worker.models.vae import build_vae  # noqa: E402
from multitalk_worker.pipeline.engine import engine_options  # noqa: E402
from multitalk_worker.pipeline.pipeline import TalkingVideoPipeline  # noqa: E402
from multitalk_worker.pipeline.presets import apply_preset  # noqa: E402
from multitalk_worker.pipeline.request import GenerationRequest, SamplingParams, Speaker  # noqa: E402
from multitalk_worker.tiny import build_tiny_feature_extractor, build_tiny_tokenizer, shape_noise  # noqa: E402
from multitalk_worker.weights.checkpoint import empty_model  # noqa: E402
from multitalk_worker.weights.loader import ModelBundle  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def fill_random(model: torch.nn.Module, generator: torch.Generator) -> None:
    """In-place random weights on the model's device, by the tiny model's rule (`shape_noise`)."""
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator, device=param.device, dtype=torch.float32)
        param.data.copy_(shape_noise(name, noise))
        del noise


def build_on(device: str, dtype: torch.dtype, build) -> torch.nn.Module:  # noqa: ANN001
    """Meta build in `dtype`, storage on `device`, random weights: never a float32 copy of a big model."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with empty_model():
            model = build()
    finally:
        torch.set_default_dtype(default)
    buffers = {name: buf.clone() for name, buf in model.named_buffers()}  # real (e.g. CLIP position ids)
    model.to_empty(device=device)
    for name, buf in model.named_buffers():
        buf.copy_(buffers[name])
    fill_random(model, torch.Generator(device=device).manual_seed(0))
    return model.to(dtype).eval().requires_grad_(False)


def random_bundle(device: str, config: MultiTalkConfig) -> ModelBundle:
    audio = build_on("cpu", torch.float32, lambda: build_audio_encoder(config.audio_encoder))
    return ModelBundle(
        dit=build_on(device, torch.bfloat16, lambda: MultiTalkTransformer(config.dit)),
        text_encoder=build_on(device, torch.bfloat16, lambda: build_text_encoder(config.text_encoder)),
        tokenizer=build_tiny_tokenizer(max_length=config.text_encoder.text_len),
        image_encoder=build_on(device, torch.float16, lambda: build_image_encoder(config.image_encoder)),
        vae=build_on(device, torch.float32, lambda: build_vae(config.vae)),
        audio_encoder=audio,
        feature_extractor=build_tiny_feature_extractor(),
        config=config,
    )


def request(preset: str, persons: int, resolution: str) -> GenerationRequest:
    speakers = (Speaker(EXAMPLES / "speech_a.wav"),)
    image = EXAMPLES / "person.png"
    if persons == 2:
        speakers = (Speaker(EXAMPLES / "speech_a.wav"), Speaker(EXAMPLES / "speech_b.wav"))
        image = EXAMPLES / "two_people.png"
    return GenerationRequest(
        image=image,
        speakers=speakers,
        prompt="A person talks to the camera in a bright studio",
        resolution=resolution,  # type: ignore[arg-type]
        max_duration_s=3.24,
        sampling=apply_preset(preset, resolution, SamplingParams(seed=42)),
    )


def run_case(
    pipeline: TalkingVideoPipeline, name: str, preset: str, persons: int, out: Path, resolution: str = "480p"
) -> dict:
    cuda = pipeline.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()  # so the reserved peak is this case's own
    start = time.perf_counter()
    result = pipeline(request(preset, persons, "tiny" if pipeline.is_tiny else resolution))
    generate_s = time.perf_counter() - start
    path = out / f"{name}.mp4"
    mux_start = time.perf_counter()
    write_mp4(path, result.frames, result.audio, result.sample_rate, result.fps)
    info = probe_mp4(path)
    row = {
        "case": name,
        "preset": preset,
        "persons": persons,
        "end_to_end_s": round(time.perf_counter() - start, 2),
        "generate_s": round(generate_s, 2),
        "mux_and_check_s": round(time.perf_counter() - mux_start, 2),
        "stages_s": {k: round(v, 2) for k, v in result.timings.items()},
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "frames": info.frames,
        "size": f"{info.width}x{info.height}",
        "fps": info.fps,
        "audio_s": info.audio_duration_s,
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default="ref-fast,fast-fast,fast-fast-2p")
    parser.add_argument("--tiny", action="store_true", help="smoke test: the tiny model on the CPU")
    parser.add_argument("--resolution", default="480p", choices=["480p", "720p"])
    parser.add_argument("--fp8", action="store_true", help="fast engine with float8 DiT linears")
    parser.add_argument("--offload", action="store_true", help="fast engine in low-memory mode")
    parser.add_argument(
        "--attention", default=None, help="fast engine's attention backend (default: the engine's 'auto')"
    )
    parser.add_argument(
        "--no-fp8-attention", action="store_true", help="with --fp8: keep self-attention in bf16"
    )
    parser.add_argument(
        "--gpu-cap-gib",
        type=float,
        help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction) after loading",
    )
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",")
    bundle = random_bundle(device, TINY if args.tiny else CONFIGS[f"14b-{args.resolution}"])
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "ready_s": round(time.perf_counter() - T_START, 2),
        "weights_gib": round(torch.cuda.memory_allocated() / 2**30, 2) if cuda else None,
        "rows": [],
    }
    rows: list[dict] = results["rows"]  # type: ignore[assignment]
    if "ref-fast" in cases:  # first: the fast engine changes the networks in place
        rows.append(run_case(TalkingVideoPipeline(bundle), "ref-fast", "fast", 1, args.out, args.resolution))
    fast_engine = engine_options("fast", fp8=args.fp8, offload=args.offload, attention=args.attention)
    if args.no_fp8_attention:
        fast_engine = replace(fast_engine, fp8_attention=False)
    if not cuda:  # inductor on a 2-core CPU takes minutes; the smoke test checks the wiring, not speed
        fast_engine = replace(fast_engine, compile=False)
    prepare_start = time.perf_counter()
    fast = TalkingVideoPipeline(bundle, engine=fast_engine, device=torch.device(device))
    # with offload this includes the copy of the block stacks to page-locked host memory
    results["engine_prepare_s"] = round(time.perf_counter() - prepare_start, 2)
    results["dit_runtime"] = str(fast.engine.runtime)  # the attention backends chosen at load
    if cuda:
        torch.cuda.empty_cache()
        results["engine_resident_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        results["host_offloaded_gib"] = round(sum(o.host_bytes() for o in fast.offloads) / 2**30, 2)
        if args.gpu_cap_gib:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(args.gpu_cap_gib * 2**30 / total)
            results["gpu_cap_gib"] = args.gpu_cap_gib
    runs = {  # case -> (row name, preset, persons); run in the order given
        "fast-fast": [("fast-fast-cold", "fast", 1), ("fast-fast-warm", "fast", 1)],
        "fast-fast-warm": [("fast-fast-warm", "fast", 1)],
        "fast-fast-2p": [("fast-fast-2p", "fast", 2)],
        "fast-default": [("fast-default", "default", 1)],
    }
    for case in cases:
        for name, preset, persons in runs.get(case, []):
            rows.append(run_case(fast, name, preset, persons, args.out, args.resolution))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(
        f"\n{results['device']}, torch {results['torch']}, ready {results['ready_s']} s, "
        f"weights {results['weights_gib']} GiB, fp8 {fast_engine.fp8}, offload {fast_engine.offload}, "
        f"resident after prepare {results.get('engine_resident_gib')} GiB, cap {args.gpu_cap_gib} GiB\n"
        f"{results['dit_runtime']}"
    )
    print(f"{'case':18} {'e2e s':>8} {'dit s':>8} {'peak GiB':>9} frames")
    for row in rows:
        dit = row["stages_s"].get("sample", float("nan"))
        print(
            f"{row['case']:18} {row['end_to_end_s']:8.2f} {dit:8.2f} {row['peak_gib']!s:>9} {row['frames']}"
        )


if __name__ == "__main__":
    main()
