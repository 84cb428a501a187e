"""LongCat-Video-Avatar DiT parity, the reference side: the checkout's DiT on the cases of
tools/_parity_longcat_ours.py, loaded from the same tiny published-layout folder (diffusers `from_pretrained`,
as the demo scripts load it), in float32 on the CPU (tools/_parity_longcat_reference.py says what is
replaced to run it there); then the pipeline runs of tools/_parity_longcat_run_cases.py on the same folder."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from _parity_longcat_ours import (
    CASES,
    INT8_MODELS,
    VARIANT_PREFIXES,
    VERSIONS,
    Case,
    Tensors,
    case_inputs,
    cases_for,
    variant,
)

from tests.tiny_longcat import LORA_FILE, write_dmd_lora, write_longcat_dit


def build_reference(
    dit_module: ModuleType, root: Path, folder: str, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    cls = dit_module.LongCatVideoAvatarTransformer3DModel
    model = cls.from_pretrained(str(root), subfolder=folder, cp_split_hw=[1, 1], torch_dtype=dtype)
    return model.eval()


def run_reference(model: torch.nn.Module, case: Case, inputs: Tensors) -> Tensors:
    """The checkout's DiT on one case, called as its pipeline calls it (spec §3.2, §7.6)."""
    cond = case.cond
    text = inputs["text"][:, None]  # [B, 1, L, C]
    common = {"audio_embs": inputs["audio"], "num_cond_latents": cond.num_cond_latents}
    if cond.num_ref_latents:
        common |= {"num_ref_latents": cond.num_ref_latents, "ref_img_index": cond.ref_img_index}
    with torch.no_grad():
        cache = {}
        if case.cached:
            _, cache = model(
                hidden_states=inputs["clean"],
                timestep=torch.zeros(inputs["clean"].shape[0]),
                encoder_hidden_states=torch.zeros_like(text),
                return_kv=True,
                skip_crs_attn=True,
                **common,
            )
        out = model(
            hidden_states=inputs["latent"],
            timestep=inputs["timestep"],
            encoder_hidden_states=text,
            encoder_attention_mask=inputs["text_mask"],
            kv_cache_dict=cache,
            mask_frame_range=cond.mask_frame_range,
            ref_target_masks=inputs.get("person_masks"),
            **common,
        )
    return {"out": out}


def longcat_cases(
    dit_module: ModuleType, root: Path, model_name: str, seed: int, persons: list[int]
) -> dict[str, tuple[Tensors, Tensors]]:
    """Write the seed's tiny DiT under root (published layout); each case's inputs and reference output."""
    cfg, folder = VERSIONS[model_name]
    write_longcat_dit(root / folder, cfg, seed)
    models = {"float": build_reference(dit_module, root, folder)}
    models["bf16"] = build_reference(dit_module, root, folder, torch.bfloat16)
    if model_name in INT8_MODELS:
        models["int8"] = build_reference_int8(models["float"], root, folder)
        write_dmd_lora(root / LORA_FILE, cfg, seed)
        models["lora"] = build_reference_lora(dit_module, root, folder)
        models["bf16_lora"] = build_reference_lora(dit_module, root, folder, torch.bfloat16)
    cases = {}
    for name, case in cases_for(model_name).items():
        if (1 if case.streams == 1 or not case.masks else 2) not in persons:
            continue
        prefix = next((p for p in VARIANT_PREFIXES if name.startswith(p)), "")
        base = name.removeprefix(prefix)
        inputs = case_inputs(cfg, case, seed * 100 + list(CASES).index(base))  # a variant: its base's inputs
        cases[name] = (inputs, run_reference(models[variant(case)], case, inputs))
    return cases


def build_reference_lora(
    dit_module: ModuleType, root: Path, folder: str, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """The DiT in `dtype` with the LoRA file added at run time, as the 1.5 demo does (`load_lora`, rank from
    the file's shapes as the demo's 128, then `enable_loras`, which casts it to the model's dtype)."""
    model: Any = build_reference(dit_module, root, folder, dtype)  # the reference's class: its own methods
    model.load_lora(str(root / LORA_FILE), "dmd", multiplier=1.0, lora_network_dim=8, lora_network_alpha=4)
    model.enable_loras(["dmd"])
    return model


def build_reference_int8(model: torch.nn.Module, root: Path, folder: str) -> torch.nn.Module:
    """The reference's own INT8 path (spec §11 test 2): `quantize_model` of a copy of the float model,
    `save_quantized_state_dict` to root/base_model_int8, `load_quantized_dit` from there; then `.float()`
    (int8 buffers stay int8; its bf16 casts of the other tensors are exact on these bf16-valued weights)."""
    import copy
    import importlib

    quantization = importlib.import_module("longcat_video.modules.quantization")
    quantized = quantization.quantize_model(copy.deepcopy(model))
    quantization.save_quantized_state_dict(quantized, str(root / "base_model_int8"), str(root / folder))
    loaded = quantization.load_quantized_dit(str(root), "base_model_int8", cp_split_hw=[1, 1])
    return loaded.float().eval()


def run_longcat(
    checkout: Path,
    model_name: str,
    seed: int,
    persons: list[int],
    fixtures: Path | None,
    pipeline: bool = True,
) -> tuple[list[str], bool]:
    """Every case of `model_name` against the checkout, then (with `pipeline`) the two-segment runs of
    tools/_parity_longcat_run_ours.py; one line per case or stage. With `fixtures`, the folders (DiT, umT5,
    tokenizer, VAE), cases.safetensors (`<case>/in/<name>`, `<case>/ref/<name>`), runs.safetensors
    (`<run>/in/<name>`, `<run>/ref/<stage>/<name>`, frames thinned) and manifest.json are stored there."""
    from _parity_longcat_ours import compare, load_ours, run_ours, tolerance
    from _parity_longcat_reference import load_reference_dit

    dit_module = load_reference_dit(checkout)
    lines, ok_all = [], True
    with tempfile.TemporaryDirectory(prefix="parity-longcat-") as tmp:
        root = Path(tmp)
        cases = longcat_cases(dit_module, root, model_name, seed, persons)
        ours = {
            v: load_ours(root, model_name, v) for v in {variant(c) for c in cases_for(model_name).values()}
        }
        for name, (inputs, reference) in cases.items():
            max_abs, rel = compare(run_ours(ours[variant(CASES[name])], CASES[name], inputs), reference)
            bound = tolerance(CASES[name])
            ok = rel <= bound
            ok_all &= ok
            lines.append(
                f"dit_{name:<20} {max_abs:>11.3e} {rel:>11.3e} {bound:>9.0e}  {'ok' if ok else 'FAIL'}"
            )
        runs: dict[str, tuple[Tensors, Tensors]] = {}
        if pipeline:
            runs, run_lines, runs_ok = pipeline_runs(checkout, root, model_name, seed, persons)
            lines += run_lines
            ok_all &= runs_ok
        if fixtures is not None:
            _write_fixtures(fixtures, root, model_name, seed, cases, runs)
    return lines, ok_all


def pipeline_runs(
    checkout: Path, root: Path, model_name: str, seed: int, persons: list[int]
) -> tuple[dict[str, tuple[Tensors, Tensors]], list[str], bool]:
    """Each run of `model_name` (tools/_parity_longcat_run_ours.py RUNS) by the checkout's pipeline and by
    ours, on the DiT folder under root and umT5, tokenizer and VAE folders written there."""
    from _parity_longcat_run_cases import (
        image_reference,
        load_reference_pipeline,
        reference_pipe,
        run_reference,
        runs_for,
        window_statements,
        write_encoders,
    )
    from _parity_longcat_run_ours import (
        build_ours,
        compare_stage,
        image_ours,
        run_inputs,
        stage_outputs,
        tolerance_text,
    )
    from _parity_longcat_run_ours import run_ours as run_pipeline_ours

    cfg, folder = VERSIONS[model_name]
    write_encoders(root, seed)
    module = load_reference_pipeline(checkout)
    reference, ours = reference_pipe(module, root, model_name, folder), build_ours(root, model_name, folder)
    windows = window_statements(checkout)
    runs, lines, ok_all = {}, [], True
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny VAE's tiny convolutions: 12x faster on one thread of a 2-core CPU
    for index, (name, run) in enumerate(runs_for(model_name, persons).items()):
        inputs = run_inputs(cfg, model_name, run, seed * 100 + 50 + index)
        expected = run_reference(
            reference, checkout, windows, model_name, run, inputs, cfg["model_max_length"]
        )
        runs[name] = (inputs, expected)
        got = stage_outputs(run_pipeline_ours(ours, model_name, run, inputs))
        for stage, ref in stage_outputs(expected).items():
            max_abs, rel, ok = compare_stage(stage, got[stage], ref)
            ok_all &= ok
            label, bound = f"{stage}_{name}", tolerance_text(stage)
            lines.append(f"{label:<24} {max_abs:>11.3e} {rel:>11.3e} {bound:>9}  {'ok' if ok else 'FAIL'}")
    torch.set_num_threads(threads)
    image_ref, worst = image_reference(reference, checkout, seed)
    _, _, ok = compare_stage(
        "image", stage_outputs(image_ours(seed))["image"], stage_outputs(image_ref)["image"]
    )
    ok_all &= ok
    lines.append(
        f"{'image_buckets_pixels':<24} {worst:>11.3e} {'-':>11} {'exact':>9}  {'ok' if ok else 'FAIL'}"
    )
    runs["image"] = ({"seed": torch.tensor([seed])}, image_ref)
    return runs, lines, ok_all


def _write_fixtures(
    fixtures: Path,
    root: Path,
    model_name: str,
    seed: int,
    cases: dict[str, tuple[Tensors, Tensors]],
    runs: dict[str, tuple[Tensors, Tensors]],
) -> None:

    from _parity_longcat_ours import tolerance
    from _parity_longcat_run_ours import FLOAT_TOLERANCE, FRAME_TOLERANCE, stored_form
    from safetensors.torch import save_file

    shutil.rmtree(fixtures, ignore_errors=True)
    shutil.copytree(root, fixtures)
    tensors = {f"{c}/{kind}/{k}": v.contiguous() for c, (i, r) in cases.items()
               for kind, part in (("in", i), ("ref", r)) for k, v in part.items()}  # fmt: skip
    save_file(tensors, str(fixtures / "cases.safetensors"))
    if runs:
        stored = {f"{n}/in/{k}": v.contiguous() for n, (i, _) in runs.items() for k, v in i.items()}
        stored |= {f"{n}/ref/{k}": v.contiguous() for n, (_, r) in runs.items()
                   for k, v in (r if n == "image" else stored_form(r)).items()}  # fmt: skip
        save_file(stored, str(fixtures / "runs.safetensors"))
    manifest = {
        "written_by": f"tools/parity.py --model {model_name} --write-fixtures",
        "reference": "meituan-longcat/LongCat-Video @ 6b3f4b8, imported from a checkout, run on CPU",
        "seed": seed,
        "metric": "rel_err = ||ours - ref||_2 / ||ref||_2 of the DiT output, float32",
        "tolerance": {name: tolerance(CASES[name]) for name in cases},
        "cases": list(cases),
        "runs": [name for name in runs if name != "image"],
        "run_tolerance": {"float rel_err": FLOAT_TOLERANCE, "uint8 max |diff| levels": FRAME_TOLERANCE},
    }
    (fixtures / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
