"""Numerical parity of multitalk_worker against the official MultiTalk and InfiniteTalk code, stage by stage.

    python tools/parity.py --reference /path/to/MultiTalk [--seed N] [--persons 1|2] [--write-fixtures]
    python tools/parity.py --model infinitetalk --reference /path/to/InfiniteTalk [--seed N] [--persons 1|2]
    python tools/parity.py --model longcat-avatar[-1.0] --reference /path/to/LongCat-Video [--seed N] [...]

Tiny seeded weights are written in the original checkpoint layouts; the reference (imported from the
checkout, which is not modified; see tools/_parity_reference.py for what is replaced to run it on a CPU)
and our code load the same files and run on the same inputs. One line per stage:

    stage  max_abs_err  rel_err  tolerance  ok|FAIL

rel_err = ||ours − ref||₂ / ||ref||₂ over every element of the stage's outputs (float64 sums). The exit
status is 1 if any stage fails.

Tolerances. float32 stages: 1e-4. bfloat16 stages (the DiT cast by the pipeline's own
`to_param_dtype_fp32only`, inputs in the pipeline's dtypes; T5 in bf16 as the pipeline runs it): 2e-2, and
5e-2 for the two-person DiT. bf16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3) and the DiT rounds its
residual stream after every sub-layer, so two correct implementations that only order a sum differently
drift apart by a few 1e-3. Measured on this tiny model (seeds 0-3): running our DiT with SDPA's math kernel
instead of its default CPU kernel moves the one-person output by 4.5e-3 to 5.0e-3 and the two-person output
by 5.8e-3 to 1.9e-2; the two-person case is larger because each token's Label-RoPE class is an argmax over
bf16 reference-map values, and near-ties flip. The reference's own bf16 output is 7e-3 to 8e-3 (one person)
and 7e-3 to 1.1e-1 (two persons) away from its float32 output (printed as "noise floor"). The bounds are
about four (one person, T5) and 2.5 (two persons) times the kernel-swap drift: they absorb a different
kernel or CPU (the fixtures are checked on other machines) and still fail on a structural error, which the
float32 stages catch at 1e-4 anyway (a 1 % change of one audio-attention weight moves the float32 DiT output
by 4e-3).

Pipeline stages (tools/_parity_pipeline_cases.py, tools/_parity_pipeline_ours.py; skipped with
--no-pipeline): the committed example speech through the reference's own loading, loudness normalisation,
`para`/`add` preparation and get_embedding (audio_prepare_speech, audio_features_speech), and two full
two-clip streaming runs of the reference's MultiTalkPipeline.generate against our MultiTalkPipeline
(generate_two_clips: two persons, 3 passes per step; generate_two_clips_text1: one person, text scale 1,
2 passes), compared on each clip's final latent and its decoded, colour-corrected frames; float32, 1e-4.

--write-fixtures stores the seed's weights (original layouts), inputs and reference outputs under
tests/fixtures/parity/, which tests/test_parity_fixtures.py and tests/test_parity_generate.py check our
code against without the reference.

--model infinitetalk (tools/_parity_infinitetalk_cases.py, tools/_parity_infinitetalk_ours.py) checks, on
the same tiny model with InfiniteTalk's file layout (seven Wan shards, single/ and multi/ adapter files):
the adapter load (our bf16 and float32 DiT state against the reference's after its own __init__, bitwise;
an adapter with a key missing or an extra key refused by both), the DiT forward with each adapter
(float32 1e-4; bf16 as above) and its audio projector in bf16, and full streaming runs of the reference's
generate_infinitetalk against our pipeline: two clips image-to-video and video-to-video on a 25 fps H.264
source, one and two persons, and a four-clip run whose reference frames are clamped to the source's last
frame (each clip's final latent, decoded colour-corrected clip and reference frame within 1e-4; the source
frame indices and the output length N exactly). Its --write-fixtures writes
tests/fixtures/parity/infinitetalk/ (tests/test_parity_infinitetalk.py); the T5, CLIP, VAE and wav2vec2
weights are the MultiTalk fixtures', which must have been written with the same seed.

--model longcat-avatar (v1.5) and longcat-avatar-1.0 (tools/_parity_longcat_cases.py against a LongCat-Video
checkout, tools/_parity_longcat_ours.py) write a tiny DiT in the published folder layout (config.json, two
bf16 shards and their index) and compare one DiT forward per case in float32 on the CPU (text-to-video with a
CFG batch, image-to-video with 1, 2 and 3 audio streams, a continuation with and without the cached keys);
tolerance 1e-5. Then (unless --no-pipeline) two-segment runs of the checkout's LongCatVideoAvatarPipeline,
driven as its demo scripts drive it (generate_ai2v, the uint8 frames, generate_avc with the KV cache and the
reference latent), against our LongCatPipeline's segment loop on the same tiny folders (the DiT, umT5 and its
tokenizer, the Wan VAE), inputs and seed (tools/_parity_longcat_run_cases.py says what the tool supplies,
tools/_parity_longcat_run_ours.py what is compared): per run the text embeddings and masks (and the default
negative prompt's text), the conditioning latents (the image's, the continuation's re-encoded 13 frames),
segment 0's final latent, its decoded uint8 frames, segment 1's final latent and its kept frames; float32
stages rel_err <= 1e-5, uint8 frames within one level. 1.5: the distilled 8 steps with 1 and 2 speakers and 3
guided steps (CFG 4/4) with 1; 1.0: 3 guided steps with 1 and 2 speakers. The version's audio-feature stages
(Whisper or wav2vec2) and the schedules come first, from tools/parity_longcat_audio.py run in its own process
(its fixtures are written by that tool). Its --write-fixtures writes
tests/fixtures/parity/longcat/<model>/, which tests/test_parity_longcat.py checks our code against without the
reference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import torch  # noqa: E402
from _parity_cases import (  # noqa: E402
    build_reference_dit,
    clip_case,
    dit_inputs,
    run_reference_audio_proj,
    run_reference_dit,
    seed_weights,
    t5_case,
    vae_case,
    wav2vec_case,
    write_dit_weights,
)
from _parity_infinitetalk_cases import infinitetalk_cases  # noqa: E402
from _parity_infinitetalk_ours import (  # noqa: E402
    IT_DIR,
    IT_TOLERANCES,
    RUN_STAGES,
    compare_it,
    it_stored_form,
    run_it_stage,
)
from _parity_longcat_cases import run_longcat  # noqa: E402
from _parity_ours import (  # noqa: E402
    CLIP_DIR,
    DIT_DIR,
    NATIVE_DIR,
    NATIVE_DIT,
    PARITY,
    STAGE_TOLERANCES,
    T5_DIR,
    VAE_DIR,
    compare,
    run_stage,
)
from _parity_pipeline_cases import pipeline_cases  # noqa: E402
from _parity_pipeline_ours import PIPELINE_TOLERANCES, compare_pipeline, run_pipeline_stage, stored_form  # noqa: E402
from _parity_reference import Reference, load_reference  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "parity"
PIPELINE_FILE = "pipeline_cases.safetensors"
TOLERANCES = STAGE_TOLERANCES | PIPELINE_TOLERANCES
Tensors = dict[str, torch.Tensor]
Case = tuple[Tensors, Tensors]  # (inputs, reference outputs)


def reference_cases(
    ref: Reference, root: Path, seed: int, persons: list[int], pipeline: bool = True
) -> dict[str, Case]:
    """Write every stage's weights under `root`; return each stage's inputs and reference outputs."""
    cfg = PARITY.dit
    write_dit_weights(root / DIT_DIR, seed_weights(build_reference_dit(ref, cfg), seed), cfg)
    cases: dict[str, Case] = {}
    dit_in = {p: dit_inputs(cfg, p, seed) for p in persons}
    for p in persons:
        for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            out = run_reference_dit(ref, root / DIT_DIR, cfg, dit_in[p], dtype)
            cases[f"dit_{p}p_{name}"] = (dit_in[p], {"out": out})
    p = max(persons)
    native = dit_inputs(NATIVE_DIT, p, seed)
    write_dit_weights(root / NATIVE_DIR, seed_weights(build_reference_dit(ref, NATIVE_DIT), seed), NATIVE_DIT)
    native_out = run_reference_dit(ref, root / NATIVE_DIR, NATIVE_DIT, native, torch.float32)
    cases[f"dit_native_{p}p_f32"] = (native, {"out": native_out})
    audio = dit_in[max(persons)]["audio"]
    cases["audio_proj"] = (
        {"audio": audio},
        {"tokens": run_reference_audio_proj(ref, root / DIT_DIR, cfg, audio)},
    )
    t5_in, t5_f32, t5_bf16 = t5_case(ref, root / T5_DIR, seed)
    cases["t5"], cases["t5_bf16"] = (t5_in, t5_f32), (t5_in, t5_bf16)
    cases["clip"] = clip_case(ref, root / CLIP_DIR, seed)
    vae_in, vae_out = vae_case(ref, root / VAE_DIR, seed)
    cases["vae_encode"] = (vae_in, {"latent": vae_out["latent"]})
    cases["vae_decode"] = ({"latent": vae_out["latent"]}, {"decoded": vae_out["decoded"]})
    cases["wav2vec2"] = wav2vec_case(ref, root / "wav2vec", seed)
    if pipeline:
        cases |= pipeline_cases(ref, root, seed)
    return cases


def bf16_noise_floor(cases: dict[str, Case]) -> dict[str, float]:
    """rel distance of the reference's own bf16 outputs from its float32 outputs, per bf16 stage."""
    floors = {}
    for stage, (_, ref) in cases.items():
        if stage.endswith("_bf16") and "_load_" not in stage:
            f32 = cases.get(stage.replace("_bf16", "_f32")) or cases.get(stage.removesuffix("_bf16"))
            if f32 is not None:
                floors[stage] = compare(ref, f32[1])[1]
    return floors


def write_fixtures(cases: dict[str, Case], root: Path, seed: int, ref: Reference) -> None:
    """cases.safetensors (`<stage>/in/<name>`, `<stage>/ref/<name>`) and manifest.json next to the weights."""
    tensors, pipeline = {}, {}
    for stage, (inputs, outputs) in cases.items():
        if stage in PIPELINE_TOLERANCES:  # thinned (stored_form), in their own file
            pipeline |= {f"{stage}/in/{k}": v.clone().contiguous() for k, v in inputs.items()}
            pipeline |= {f"{stage}/ref/{k}": v.contiguous() for k, v in stored_form(outputs).items()}
            continue
        tensors |= {f"{stage}/in/{k}": v.clone().contiguous() for k, v in inputs.items()}
        tensors |= {f"{stage}/ref/{k}": v.clone().contiguous() for k, v in outputs.items()}
    save_file(tensors, str(root / "cases.safetensors"))
    if pipeline:
        save_file(pipeline, str(root / PIPELINE_FILE))
    manifest = {
        "written_by": "tools/parity.py --write-fixtures",
        "reference": "MeiGen-AI/MultiTalk @ c1ad840, imported from a checkout and run on CPU",
        "seed": seed,
        "metric": "rel_err = ||ours - ref||_2 / ||ref||_2 over all outputs of the stage",
        "tolerances": {stage: STAGE_TOLERANCES[stage] for stage in cases if stage in STAGE_TOLERANCES},
        "pipeline_tolerances": {stage: TOLERANCES[stage] for stage in cases if stage in PIPELINE_TOLERANCES},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def run(
    ref: Reference, root: Path, seed: int, persons: list[int], pipeline: bool = True
) -> tuple[dict[str, Case], list[str], bool]:
    cases = reference_cases(ref, root, seed, persons, pipeline)
    lines, notes, ok_all = [], [], True
    for stage, (inputs, reference) in cases.items():
        tolerance = TOLERANCES[stage]
        try:
            if stage in PIPELINE_TOLERANCES:
                max_abs, rel, note = compare_pipeline(run_pipeline_stage(stage, root, inputs), reference)
                notes += [f"note: {stage}: {note}"] if note else []
            else:
                max_abs, rel = compare(run_stage(stage, root, inputs), reference)
        except Exception as exc:  # a stage that cannot run on our side is a failure, reported as such
            lines.append(f"{stage:<24} {'-':>11} {'-':>11} {tolerance:>9.0e}  FAIL ({exc!r:.200})")
            ok_all = False
            continue
        ok = rel <= tolerance
        ok_all &= ok
        lines.append(f"{stage:<24} {max_abs:>11.3e} {rel:>11.3e} {tolerance:>9.0e}  {'ok' if ok else 'FAIL'}")
    return cases, lines + notes, ok_all


# --------------------------------------------------------------------------- InfiniteTalk

IT_FIXTURES = FIXTURES / IT_DIR
ENCODER_DIRS = (T5_DIR, CLIP_DIR, VAE_DIR, "wav2vec")


def write_encoder_weights(ref: Reference, root: Path, seed: int) -> None:
    """The T5, CLIP, VAE and wav2vec2 weight folders of the MultiTalk stages (their outputs unused)."""
    t5_case(ref, root / T5_DIR, seed)
    clip_case(ref, root / CLIP_DIR, seed)
    vae_case(ref, root / VAE_DIR, seed)
    wav2vec_case(ref, root / "wav2vec", seed)


def run_infinitetalk(
    ref: Reference, root: Path, seed: int, persons: list[int], pipeline: bool = True
) -> tuple[dict[str, Case], list[str], bool]:
    write_encoder_weights(ref, root, seed)
    cases = infinitetalk_cases(ref, root, seed, persons, pipeline)
    lines, notes, ok_all = [], [], True
    for stage, (inputs, reference) in cases.items():
        tolerance = IT_TOLERANCES[stage]
        try:
            with tempfile.TemporaryDirectory(prefix="parity-it-ours-") as work:
                ours = run_it_stage(stage, root, inputs, Path(work))
            max_abs, err, note = compare_it(stage, ours, reference)
        except Exception as exc:  # a stage that cannot run on our side is a failure, reported as such
            lines.append(f"{stage:<24} {'-':>11} {'-':>11} {tolerance:>9.0e}  FAIL ({exc!r:.300})")
            ok_all = False
            continue
        notes += [f"note: {stage}: {note}"] if note else []
        ok = err <= tolerance
        ok_all &= ok
        lines.append(f"{stage:<24} {max_abs:>11.3e} {err:>11.3e} {tolerance:>9.0e}  {'ok' if ok else 'FAIL'}")
    return cases, lines + notes, ok_all


def _same_weights(a: Path, b: Path) -> bool:
    """The same files with the same tensors (torch.save archives need not be byte-identical)."""
    files_a = sorted(f.relative_to(a) for f in a.rglob("*") if f.is_file())
    files_b = sorted(f.relative_to(b) for f in b.rglob("*") if f.is_file())
    if files_a != files_b:
        return False
    for rel in files_a:
        if rel.suffix in (".pth", ".bin"):
            x, y = (torch.load(d / rel, map_location="cpu", weights_only=True) for d in (a, b))
            if x.keys() != y.keys() or any(not torch.equal(x[k], y[k]) for k in x):
                return False
        elif (a / rel).read_bytes() != (b / rel).read_bytes():
            return False
    return True


def write_infinitetalk_fixtures(cases: dict[str, Case], root: Path, seed: int) -> None:
    """IT_FIXTURES: the DiT folder and source video, cases.safetensors (loads as digests), the runs
    (thinned) in pipeline_cases.safetensors, manifest.json. The encoder folders are the committed MultiTalk
    fixtures', which must hold this seed's weights."""
    stale = [d for d in ENCODER_DIRS if not _same_weights(root / d, FIXTURES / d)]
    if stale:
        raise SystemExit(f"{FIXTURES} {stale} are not seed {seed}'s: write the MultiTalk fixtures first")
    shutil.rmtree(IT_FIXTURES, ignore_errors=True)
    shutil.copytree(root / IT_DIR, IT_FIXTURES, symlinks=False)
    tensors: dict[str, Tensors] = {"cases.safetensors": {}, PIPELINE_FILE: {}}
    for stage, (inputs, outputs) in cases.items():
        file = PIPELINE_FILE if stage in RUN_STAGES else "cases.safetensors"
        tensors[file] |= {f"{stage}/in/{k}": v.clone().contiguous() for k, v in inputs.items()}
        tensors[file] |= {
            f"{stage}/ref/{k}": v.contiguous() for k, v in it_stored_form(stage, outputs).items()
        }
    for file, content in tensors.items():
        save_file(content, str(IT_FIXTURES / file))
    manifest = {
        "written_by": "tools/parity.py --model infinitetalk --write-fixtures",
        "reference": "MeiGen-AI/InfiniteTalk @ 0107cd9, imported from a checkout and run on CPU",
        "seed": seed,
        "metric": "loads: tensors whose bytes differ; runs and DiT: rel_err = ||ours - ref||_2 / ||ref||_2",
        "tolerances": {stage: IT_TOLERANCES[stage] for stage in cases},
    }
    (IT_FIXTURES / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


# --------------------------------------------------------------------------- LongCat-Video-Avatar

LONGCAT_MODELS = ("longcat-avatar", "longcat-avatar-1.0")
LONGCAT_FIXTURES = FIXTURES / "longcat"


LONGCAT_AUDIO_TOOL = REPO / "tools" / "parity_longcat_audio.py"
LONGCAT_AUDIO_STAGES = {"longcat-avatar": ("whisper_",), "longcat-avatar-1.0": ("wav2vec_",)}


def longcat_audio(checkout: Path, model: str, seed: int) -> tuple[list[str], bool]:
    """The audio-feature and schedule stages of `model` from tools/parity_longcat_audio.py, run in its own
    process (it imports the checkout's audio package its own way); its fixtures are its own."""
    command = [sys.executable, str(LONGCAT_AUDIO_TOOL), "--reference", str(checkout), "--seed", str(seed)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=1800)
    wanted = (*LONGCAT_AUDIO_STAGES[model], "sched_", "step_guidance")
    rows = [line.split() for line in result.stdout.splitlines()]
    rows = [row for row in rows if len(row) == 4 and row[0].startswith(wanted)]
    if not rows:
        return [f"{'audio':<24} {'-':>11} {'-':>11} {'-':>9}  FAIL ({result.stderr[-300:]!r})"], False
    lines = []
    for stage, max_abs, rel, result_ in rows:
        bound = "1e-5" if stage.startswith(LONGCAT_AUDIO_STAGES[model]) else "bitwise"
        lines.append(f"{stage:<24} {float(max_abs):>11.3e} {float(rel):>11.3e} {bound:>9}  {result_}")
    return lines, all(row[3] == "ok" for row in rows)


def main_longcat(args: argparse.Namespace, persons: list[int]) -> int:
    fixtures = LONGCAT_FIXTURES / args.model if args.write_fixtures else None
    pipeline = not args.no_pipeline or args.write_fixtures
    lines, ok = run_longcat(args.reference, args.model, args.seed, persons, fixtures, pipeline)
    if pipeline:
        audio_lines, audio_ok = longcat_audio(args.reference, args.model, args.seed)
        lines, ok = audio_lines + lines, ok and audio_ok
    print(
        f"{args.model}, seed {args.seed}, persons {persons}, float32 on CPU; rel_err = ||ours-ref|| / ||ref||"
    )
    print(f"{'stage':<24} {'max_abs_err':>11} {'rel_err':>11} {'tolerance':>9}  result")
    print("\n".join(lines))
    if fixtures is not None:
        size = sum(f.stat().st_size for f in fixtures.rglob("*") if f.is_file())
        print(f"fixtures written to {fixtures.relative_to(REPO)} ({size / 1e6:.2f} MB)")
    return 0 if ok else 1


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", choices=("multitalk", "infinitetalk", *LONGCAT_MODELS), default="multitalk"
    )
    parser.add_argument("--reference", type=Path, required=True, help="the model's checkout (read only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--persons", type=int, choices=(1, 2), help="stages for this person count only")
    parser.add_argument("--write-fixtures", action="store_true", help=f"store the case under {FIXTURES}")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the speech and generation stages")
    args = parser.parse_args(argv)
    persons = [1, 2] if args.persons is None or args.write_fixtures else [args.persons]
    torch.manual_seed(args.seed)
    if args.model in LONGCAT_MODELS:
        return main_longcat(args, persons)
    ref = load_reference(args.reference, args.model)
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        root = Path(tmp)
        pipeline = not args.no_pipeline or args.write_fixtures
        if args.model == "infinitetalk":
            cases, lines, ok = run_infinitetalk(ref, root, args.seed, persons, pipeline)
            if args.write_fixtures:
                write_infinitetalk_fixtures(cases, root, args.seed)
        else:
            cases, lines, ok = run(ref, root, args.seed, persons, pipeline)
        if args.write_fixtures and args.model == "multitalk":
            for old in FIXTURES.glob("*"):  # the InfiniteTalk fixtures stay
                if old.name != IT_DIR:
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
            shutil.copytree(root, FIXTURES, ignore=shutil.ignore_patterns(NATIVE_DIR), dirs_exist_ok=True)
            write_fixtures({k: v for k, v in cases.items() if "native" not in k}, FIXTURES, args.seed, ref)
    print(
        f"seed {args.seed}, persons {persons}, float32 and bfloat16 on CPU; rel_err = ||ours-ref|| / ||ref||"
    )
    print(f"{'stage':<24} {'max_abs_err':>11} {'rel_err':>11} {'tolerance':>9}  result")
    print("\n".join(lines))
    for stage, floor in bf16_noise_floor(cases).items():
        print(f"note: {stage}: reference bf16 vs reference float32 rel {floor:.3e} (bf16 noise floor)")
    if args.write_fixtures:
        written = IT_FIXTURES if args.model == "infinitetalk" else FIXTURES
        size = sum(f.stat().st_size for f in written.rglob("*") if f.is_file())
        print(f"fixtures written to {written.relative_to(REPO)} ({size / 1e6:.2f} MB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
