"""`weights verify DIR [--model M] [--adapter A]`: print what is missing or wrong in a model folder for one
registry model (the Wan base, every adapter file of the model or the one named, the encoders, wav2vec2);
exit status 1 on any problem. `weights download DIR [--model M] [--layout L]`: fetch the files the manifest
lists from the Hugging Face Hub, then verify."""

from __future__ import annotations

import argparse
from pathlib import Path

from multitalk_worker.models.configs import CONFIGS, get_config
from multitalk_worker.registry import DEFAULT_MODEL, MODELS, all_adapters
from multitalk_worker.weights import LAYOUTS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `weights` command group (`verify DIR`, `download DIR`) to a CLI's subparsers."""
    weights = subparsers.add_parser("weights", help="inspect model weight folders")
    commands = weights.add_subparsers(dest="weights_command", required=True)
    check = commands.add_parser(
        "verify", help="check a Wan2.1-I2V-14B(-Diffusers) + MultiTalk/InfiniteTalk folder without loading it"
    )
    check.add_argument("dir", type=Path, help="model folder (original or Diffusers layout)")
    check.add_argument(
        "--wav2vec", type=Path, default=None, help="wav2vec2 folder (default: DIR/chinese-wav2vec2-base)"
    )
    check.add_argument(
        "--preset",
        choices=sorted(CONFIGS),
        default=None,
        help="model preset (default: from DIR's config.json)",
    )
    check.add_argument(
        "--model",
        choices=sorted(MODELS),
        default=DEFAULT_MODEL,
        help=f"the model whose adapter files are checked (default: {DEFAULT_MODEL})",
    )
    check.add_argument(
        "--adapter",
        choices=sorted({a.name for a in all_adapters().values()}),
        default=None,
        help="check only this adapter of the model (default: all of them)",
    )
    check.set_defaults(func=run_verify)
    fetch = commands.add_parser(
        "download",
        help="fetch a model folder from the Hugging Face Hub (the manifest's files only; resumes); verify it",
    )
    fetch.add_argument("dir", type=Path, help="model folder to create or complete")
    fetch.add_argument("--model", choices=sorted(MODELS), default=DEFAULT_MODEL)
    fetch.add_argument("--layout", choices=LAYOUTS, default="original", help="original (Wan's) or diffusers")
    fetch.set_defaults(func=run_download)


def run_verify(args: argparse.Namespace) -> int:
    from multitalk_worker.weights.manifest import verify  # torch: only when the command runs

    config = get_config(args.preset) if args.preset else None
    report = verify(
        args.dir, config=config, wav2vec_path=args.wav2vec, model=args.model, adapter=args.adapter
    )
    print(report)
    return 0 if report.ok else 1


def run_download(args: argparse.Namespace) -> int:
    from multitalk_worker.weights.download import download  # torch: only when the command runs

    report = download(args.dir, model=args.model, layout=args.layout)
    print(report)
    return 0 if report.verify is not None and report.verify.ok else 1
