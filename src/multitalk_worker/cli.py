"""`multitalk-worker` command line: `generate` makes one mp4; `weights` inspects model folders.

Bad inputs end with exit status 1 and one line on stderr (`error [CODE]: message`), never a traceback:
`main` is the one place where WorkerError becomes a message.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from multitalk_worker.errors import InvalidInput, WorkerError
from multitalk_worker.pipeline.presets import PRESETS, apply_preset
from multitalk_worker.pipeline.request import GenerationRequest, Progress, Region, SamplingParams, Speaker

logger = logging.getLogger(__name__)

TINY_NOTE = (
    "note: --weights tiny is a tiny model with random weights; its video proves the plumbing "
    "(audio, image, sampling, encoding), not the quality"
)


def parse_region(text: str) -> Region:
    """`left`, `right`, `full` or `x0,y0,x1,y1` (fractions of the image, x to the right, y down)."""
    if text in ("left", "right", "full"):
        return text  # type: ignore[return-value]
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise InvalidInput(f"--region {text!r} is not accepted; use left, right, full or x0,y0,x1,y1 in 0..1")
    return values  # type: ignore[return-value]


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="make a talking video (mp4) from an image and speech")
    gen.add_argument("--image", type=Path, required=True, help="reference image (any PIL-readable file)")
    gen.add_argument(
        "--audio", type=Path, action="append", required=True, help="speech of one speaker (repeat for two)"
    )
    gen.add_argument(
        "--audio-mode",
        choices=("parallel", "sequential"),
        default="parallel",
        help="two speakers: parallel (both tracks at once; a shorter track ends in silence) or "
        "sequential (the first speaker, then the second)",
    )
    gen.add_argument(
        "--region",
        action="append",
        default=None,
        help="per speaker, in --audio order: left, right, full or x0,y0,x1,y1 "
        "(fractions of the image, x to the right, y down); default: left and right halves",
    )
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None, help="default: the reference's negative prompt")
    gen.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="sampling recipe: default (40 steps), or fusionx (8) / lightx2v (4), the recipes of the "
        "distillation LoRAs of those names, which need that LoRA merged for good results",
    )
    gen.add_argument("--steps", type=int, default=None, help="denoising steps per clip (default: preset)")
    gen.add_argument("--text-guidance", type=float, default=None)
    gen.add_argument("--audio-guidance", type=float, default=None)
    gen.add_argument("--shift", type=float, default=None)
    gen.add_argument("--seed", type=int, default=42, help="noise seed; negative: random")
    gen.add_argument("--teacache", type=float, default=None, metavar="THRESH", help="TeaCache threshold")
    gen.add_argument("--apg", action="store_true", help="adaptive projected guidance")
    gen.add_argument("--color-correction", type=float, default=1.0, help="strength 0..1 (default 1)")
    gen.add_argument(
        "--resolution",
        choices=("480p", "720p", "tiny"),
        default=None,
        help="bucket family (default: tiny for --weights tiny, else 480p)",
    )
    gen.add_argument("--max-duration", type=float, default=None, metavar="S", help="cap on the video length")
    gen.add_argument("--weights", required=True, help="model folder, or 'tiny' for the built-in tiny model")
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    gen.add_argument("--out", type=Path, required=True, help="output .mp4 path")
    gen.set_defaults(func=run_generate)


def build_request(args: argparse.Namespace) -> GenerationRequest:
    resolution = args.resolution or ("tiny" if args.weights == "tiny" else "480p")
    regions = [parse_region(r) for r in args.region] if args.region else [None] * len(args.audio)
    if len(regions) != len(args.audio):
        raise InvalidInput(
            f"{len(regions)} --region given for {len(args.audio)} --audio; give one per speaker"
        )
    sampling = apply_preset(
        args.preset,
        resolution,
        SamplingParams(
            seed=args.seed,
            teacache_threshold=args.teacache,
            apg=args.apg,
            color_correction=args.color_correction,
        ),
    )
    overrides = {
        "steps": args.steps,
        "text_guidance": args.text_guidance,
        "audio_guidance": args.audio_guidance,
        "shift": args.shift,
    }
    sampling = replace(sampling, **{k: v for k, v in overrides.items() if v is not None})
    return GenerationRequest(
        image=args.image,
        speakers=tuple(Speaker(audio=a, region=r) for a, r in zip(args.audio, regions, strict=True)),
        prompt=args.prompt,
        audio_mode=args.audio_mode,
        negative_prompt=args.negative_prompt,
        resolution=resolution,
        max_duration_s=args.max_duration,
        sampling=sampling,
    )


class _ProgressBar:
    """A tqdm bar over all denoising steps of all clips, opened at the first sampling step."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def __call__(self, event: Progress) -> None:
        if event.stage != "sample":
            return
        if self.bar is None:
            self.bar = tqdm(total=event.chunks * event.steps, unit="step", desc="sampling")
        self.bar.set_postfix_str(f"clip {event.chunk}/{event.chunks}")
        self.bar.update((event.chunk - 1) * event.steps + event.step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_generate(args: argparse.Namespace) -> int:
    from multitalk_worker.media import write_mp4
    from multitalk_worker.pipeline.pipeline import MultiTalkPipeline, check_inputs

    request = build_request(args)
    if not args.out.parent.is_dir():
        raise InvalidInput(f"output folder {args.out.parent} does not exist")
    check_inputs(request, tiny_model=args.weights == "tiny")  # before loading any weights
    if PRESETS[args.preset].needs_lora:
        logger.warning(
            "preset %s is a distillation-LoRA recipe; without that LoRA expect low quality", args.preset
        )
    if args.weights == "tiny":
        print(TINY_NOTE, flush=True)
    started = time.perf_counter()
    pipeline = MultiTalkPipeline.from_pretrained(args.weights, device=args.device)
    bar = _ProgressBar()
    try:
        result = pipeline(request, progress=bar)
    finally:
        bar.close()
    write_mp4(args.out, result.frames, result.audio, result.sample_rate, result.fps)
    count, height, width = result.frames.shape[:3]
    print(
        f"wrote {args.out}: {count} frames ({count / result.fps:.2f} s) at {width}x{height}, "
        f"{result.resolved['clips']} clip(s), seed {result.seed}, {time.perf_counter() - started:.1f} s"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from multitalk_worker.weights import cli as weights_cli

    parser = argparse.ArgumentParser(
        prog="multitalk-worker", description="MultiTalk talking-video generation (Wan2.1-I2V-14B + MultiTalk)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands)
    weights_cli.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except WorkerError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
