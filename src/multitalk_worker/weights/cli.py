"""`weights verify DIR [--model M] [--adapter A]`: print what is missing or wrong in a model folder for one
registry model (the Wan base, every adapter file of the model or the one named, the encoders, wav2vec2; for
LongCat-Video-Avatar, DIR and DIR/../LongCat-Video for one job preset); exit status 1 on any problem.
`weights download DIR [--model M] [--layout L]`: fetch the files the manifest lists from the Hugging Face
Hub, then verify."""

from __future__ import annotations

import argparse
from pathlib import Path

from multitalk_worker.errors import InvalidInput
from multitalk_worker.models.configs import CONFIGS, get_config
from multitalk_worker.registry import DEFAULT_MODEL, MODELS, all_adapters, get_model
from multitalk_worker.weights import LAYOUTS

LONGCAT_PRESETS = sorted({p for spec in MODELS.values() if spec.family is not None for p in spec.presets})


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `weights` command group (`verify DIR`, `download DIR`) to a CLI's subparsers."""
    weights = subparsers.add_parser("weights", help="inspect model weight folders")
    commands = weights.add_subparsers(dest="weights_command", required=True)
    check = commands.add_parser(
        "verify",
        help="check a Wan2.1-I2V-14B(-Diffusers) + MultiTalk/InfiniteTalk folder, or a LongCat-Video-Avatar "
        "folder and ../LongCat-Video, without loading it",
    )
    check.add_argument(
        "dir",
        type=Path,
        help="model folder (Wan: original or Diffusers layout; LongCat: LongCat-Video-Avatar*)",
    )
    check.add_argument(
        "--wav2vec", type=Path, default=None, help="wav2vec2 folder (default: DIR/chinese-wav2vec2-base)"
    )
    check.add_argument(
        "--preset",
        choices=sorted(CONFIGS) + LONGCAT_PRESETS,
        default=None,
        help="Wan: model preset (default: from DIR's config.json); LongCat: the job preset whose files are "
        "required (default: the model's default preset)",
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
    fetch.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="original",
        help="Wan: original (Wan's) or diffusers; LongCat: unused",
    )
    fetch.set_defaults(func=run_download)


def run_verify(args: argparse.Namespace) -> int:
    from multitalk_worker.weights.manifest import verify  # torch: only when the command runs

    if get_model(args.model).family is not None:
        from multitalk_worker.weights.longcat_manifest import verify_longcat

        if args.wav2vec is not None or args.adapter is not None:
            raise InvalidInput(f"--wav2vec and --adapter name Wan files; model {args.model} has none")
        longcat = verify_longcat(args.dir, args.model, preset=args.preset)
        print(longcat)
        return 0 if longcat.ok else 1
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
