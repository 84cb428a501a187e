"""LongCat-Video-Avatar's audio path and sampling schedules against the official code, stage by stage.

    python tools/parity_longcat_audio.py --reference /path/to/LongCat-Video [--seed N] [--write-fixtures]

Stages (tools/_parity_longcat_audio_ours.py names them; tools/_parity_longcat_audio_cases.py says how the
reference is run from the unmodified checkout):

* `whisper_*` (v1.5) and `wav2vec_*` (v1.0): tiny random encoders (a whisper-large-v3 folder written by
  `write_tiny_whisper` in the published layout; the MultiTalk fixtures' chinese-wav2vec2-base folder), one
  or two persons (`add`/`para`, with and without the silent "others" stream), tracks shorter than the
  rendered length (zero-padded, float64 in the reference) and longer ones, one and more 30 s Whisper
  windows: every stream's features over the padded track and the per-frame windows of the first 3
  segments; float32, max |Δ| / max |ref| <= 1e-5.
* `sched_*`: the scheduler's timesteps and sigmas of every mode (v1.5 distilled; 8/30/50 steps at shift 7
  and 12; `enhance_hf`; v1.0's "distill" table) and the bf16 timesteps the DiT embeds: bitwise.
* `step_guidance`: scheduler.step on the negated prediction at three positions, and the split guidance
  expression: bitwise.
* `vocals` (with --audio-separator): audio-separator 0.30.2's MDX computation against pipeline/vocals.py on
  a tiny ONNX model with Kim_Vocal_2's input name and shape (`write_tiny_mdx`): the 44.1 kHz stem and the
  16 kHz vocal read back from its 16-bit WAV; the stem within max |Δ| / max |ref| <= 1e-5, the vocal within
  one 16-bit step. Measured: bitwise when both sides compute audio-separator's peak-limit factor
  `0.9 / peak` alike; ours follows the reference's pinned NumPy 1.26 (float64, then applied in float32),
  the tool runs it under NumPy 2 (float32): stem 1.8e-7, vocal 6.2e-6 (< 3.05e-5, one step).

One line per stage: `stage  max_abs_err  rel_err  ok|FAIL`; exit status 1 if any fails. --write-fixtures
stores the tiny Whisper folder and every stage's inputs and reference outputs under
tests/fixtures/parity/longcat_audio/, which tests/test_parity_longcat_audio.py checks without the checkout.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import torch  # noqa: E402
from _parity_longcat_audio_cases import (  # noqa: E402
    audio_case,
    load_longcat_reference,
    schedule_case,
    step_case,
    vocal_case,
)
from _parity_longcat_audio_ours import (  # noqa: E402
    AUDIO_STAGES,
    SCHEDULES,
    TOLERANCE_F32,
    VOCAL_MODEL,
    WAV2VEC_DIR,
    WHISPER_DIR,
    compare,
    manifest,
    run_audio_stage,
    run_schedule_stage,
    run_step_stage,
    run_vocal_stage,
    vocal_check,
    write_tiny_mdx,
    write_tiny_whisper,
)
from safetensors.torch import save_file  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "parity"
OUT_DIR = FIXTURES / "longcat_audio"
CASES_FILE = "cases.safetensors"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", type=Path, required=True, help="LongCat-Video checkout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--audio-separator",
        type=Path,
        help="a folder holding the audio_separator package, version 0.30.2 (the reference's pin), e.g. from "
        "`pip install --no-deps --target DIR audio-separator==0.30.2`; adds the vocal-separation stage",
    )
    parser.add_argument("--write-fixtures", action="store_true")
    args = parser.parse_args()
    ref = load_longcat_reference(args.reference)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    stored: dict[str, torch.Tensor] = {}
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tiny_whisper(root / WHISPER_DIR, args.seed)
        (root / WAV2VEC_DIR).parent.mkdir(parents=True)
        shutil.copytree(FIXTURES / WAV2VEC_DIR, root / WAV2VEC_DIR)
        rows: list[tuple[str, float, float, bool]] = []
        for stage in AUDIO_STAGES:
            inputs, expected = audio_case(ref, stage, root, args.seed)
            worst, rel = compare(run_audio_stage(stage, root, args.seed), expected)
            rows.append((stage, worst, rel, rel <= TOLERANCE_F32))
            stored |= _keys(stage, inputs, expected)
        for stage in SCHEDULES:
            expected = schedule_case(ref, stage)
            worst, rel = compare(run_schedule_stage(stage), expected)
            rows.append((stage, worst, rel, worst == 0.0))
            stored |= _keys(stage, {}, expected)
        inputs, expected = step_case(ref, args.seed)
        worst, rel = compare(run_step_stage(inputs), expected)
        rows.append(("step_guidance", worst, rel, worst == 0.0))
        stored |= _keys("step_guidance", inputs, expected)
        if args.audio_separator is not None:
            write_tiny_mdx(root / VOCAL_MODEL, args.seed)
            expected = vocal_case(args.audio_separator, root / VOCAL_MODEL, args.seed)
            rows.append(
                ("vocals", *vocal_check(run_vocal_stage(root / "longcat_audio", args.seed), expected))
            )
            stored |= _keys("vocals", {}, expected)
        for stage, worst, rel, ok in rows:
            print(f"{stage:28s} {worst:.3e} {rel:.3e} {'ok' if ok else 'FAIL'}")
            failed |= not ok
        if args.write_fixtures:
            shutil.rmtree(OUT_DIR, ignore_errors=True)
            shutil.copytree(root / WHISPER_DIR, OUT_DIR / Path(WHISPER_DIR).name)
            save_file({k: v.contiguous() for k, v in stored.items()}, str(OUT_DIR / CASES_FILE))
            (OUT_DIR / "manifest.json").write_text(manifest(args.seed) + "\n")
            print(f"fixtures written to {OUT_DIR}")
    return 1 if failed else 0


def _keys(
    stage: str, inputs: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    return {f"{stage}/in/{k}": v for k, v in inputs.items()} | {
        f"{stage}/ref/{k}": v for k, v in expected.items()
    }


if __name__ == "__main__":
    sys.exit(main())
