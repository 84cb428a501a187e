"""LongCat-Video-Avatar loaded from the published folders (weights/longcat_bundle.py): the tiny in-process
bundle written out as K (the model folder) and B (LongCat-Video/ beside it) in the published file names,
formats and key names (tests/tiny_longcat.write_longcat_folders), loaded back through
`LongCatPipeline.from_pretrained`, must make the same frames for the same job and seed (float32, bitwise);
1.0's two-speaker jobs run on avatar_multi/; 1.5's DMD LoRA is on for distilled jobs only; each missing
piece is a typed error naming its path; the CLI and the worker serve a folder."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from multitalk_worker.config import Settings
from multitalk_worker.errors import CheckpointError, InvalidInput, ModelMissing
from multitalk_worker.media import probe_mp4
from multitalk_worker.models.longcat.attention import Conditioning
from multitalk_worker.models.longcat.blocks import linear_fp32
from multitalk_worker.models.longcat.lora import LoraLinear
from multitalk_worker.pipeline.engine import engine_options
from multitalk_worker.pipeline.longcat import LongCatPipeline
from multitalk_worker.pipeline.request import GenerationRequest, SamplingParams, Speaker
from multitalk_worker.service import JobService
from multitalk_worker.tiny_longcat import TINY_LORA_ALPHA_SCALE, build_tiny_longcat_bundle, tiny_dmd_lora
from multitalk_worker.weights.longcat_bundle import reload_dit
from tests.conftest import EXAMPLES
from tests.test_longcat_pipeline import request as pipeline_job
from tests.tiny_longcat import (
    BASE_FOLDER,
    LORA_FILE,
    dit_config,
    random_tensors,
    round_to,
    write_longcat_folders,
)

DISTILLED = SamplingParams(steps=8, text_guidance=1.0, audio_guidance=1.0, seed=3)
TWO = (
    Speaker(EXAMPLES / "speech_a.wav", region=(0.0, 0.0, 0.5, 1.0)),
    Speaker(EXAMPLES / "speech_b.wav", region=(0.5, 0.0, 1.0, 1.0)),
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny convolutions, one thread


@pytest.fixture(scope="module")
def v15(tmp_path_factory: pytest.TempPathFactory) -> tuple[LongCatPipeline, Path]:
    """The in-process tiny 1.5 pipeline (weights rounded to the published dtypes) and its written K."""
    bundle = build_tiny_longcat_bundle("longcat-avatar", seed=0)
    round_to(bundle.dit, torch.bfloat16)
    assert bundle.audio_encoder is not None
    round_to(bundle.audio_encoder, torch.float16)
    lora = tiny_dmd_lora(bundle.dit, seed=1)  # the bundle's own LoRA (seed + 1)
    k = write_longcat_folders(tmp_path_factory.mktemp("v15"), bundle, lora=lora)
    return LongCatPipeline(bundle, torch.device("cpu")), k


@pytest.fixture(scope="module")
def v10(tmp_path_factory: pytest.TempPathFactory) -> tuple[LongCatPipeline, Path, dict[str, torch.Tensor]]:
    """The in-process tiny 1.0 pipeline, its K (avatar_multi/ other weights than avatar_single/) and the
    multi DiT's tensors."""
    bundle = build_tiny_longcat_bundle("longcat-avatar-1.0", seed=0)
    round_to(bundle.dit, torch.bfloat16)
    multi = random_tensors(dit_config("longcat-avatar-1.0"), seed=5)
    assert set(multi) == set(bundle.dit.state_dict())
    k = write_longcat_folders(tmp_path_factory.mktemp("v10"), bundle, multi=multi)
    return LongCatPipeline(bundle, torch.device("cpu")), k, multi


def request(model: str = "longcat-avatar", **changes: object) -> GenerationRequest:
    """test_longcat_pipeline's job, 0.6 s long (15 frames at 25 fps)."""
    return pipeline_job(model, **({"max_duration_s": 0.6} | changes))


def frames(pipe: LongCatPipeline, job: GenerationRequest) -> np.ndarray:
    result = pipe(job)
    assert result.frames is not None
    return result.frames


def lora_states(pipe: LongCatPipeline) -> list[bool]:
    """Records, per call of one LoRA target Linear, whether its branch was on."""
    layer = pipe.bundle.dit.get_submodule("blocks.0.attn.qkv")
    assert isinstance(layer, LoraLinear)
    seen: list[bool] = []
    layer.register_forward_pre_hook(lambda module, args: seen.append(layer.lora.enabled))
    return seen


def test_v15_folder_makes_the_in_process_frames_with_the_lora_on_for_distilled_jobs(
    v15: tuple[LongCatPipeline, Path],
) -> None:
    tiny, k = v15
    loaded = LongCatPipeline.from_pretrained(str(k), device="cpu", model="longcat-avatar")
    assert loaded.bundle.weights == str(k) and loaded.is_tiny and loaded.bundle.vocals is None
    assert loaded.bundle.lora is not None and len(loaded.bundle.lora) == 5
    seen = lora_states(loaded)
    distilled = frames(loaded, request(sampling=DISTILLED))
    assert seen and all(seen)  # every DiT call of the distilled job ran with the LoRA
    np.testing.assert_array_equal(distilled, frames(tiny, request(sampling=DISTILLED)))
    seen.clear()
    plain = frames(loaded, request())  # 1 step: the non-distilled linear schedule
    assert seen and not any(seen) and not loaded.bundle.lora.enabled
    assert plain.shape == distilled.shape and not np.array_equal(plain, distilled)


def test_v10_folder_one_speaker_then_two_on_avatar_multi(
    v10: tuple[LongCatPipeline, Path, dict[str, torch.Tensor]],
) -> None:
    tiny, k, multi = v10
    loaded = LongCatPipeline.from_pretrained(str(k), device="cpu", model="longcat-avatar-1.0")
    slot = loaded.bundle.dit_slot
    assert slot is not None and slot.folder == "avatar_single" and loaded.bundle.lora is None
    one = request("longcat-avatar-1.0")
    np.testing.assert_array_equal(frames(loaded, one), frames(tiny, one))
    two = request("longcat-avatar-1.0", speakers=TWO, image=EXAMPLES / "two_people.png")
    result = loaded(two)
    assert (slot.folder, slot.swaps, result.timings["dit_swap"] > 0) == ("avatar_multi", 1, True)
    state = loaded.bundle.dit.state_dict()
    assert all(torch.equal(state[key], value.float()) for key, value in multi.items())
    tiny.bundle.dit.load_state_dict({key: value.float() for key, value in multi.items()})  # its multi DiT
    assert result.frames is not None
    np.testing.assert_array_equal(result.frames, frames(tiny, two))


def test_v10_swap_in_the_low_memory_mode(v10: tuple[LongCatPipeline, Path, dict[str, torch.Tensor]]) -> None:
    """With the DiT's blocks in host memory (MULTITALK_OFFLOAD), a swap to avatar_multi/ also reaches the
    block still on the device from the last call: the frames of the resident folder pipeline, bit for bit."""
    _, k, _ = v10
    low_memory = engine_options("reference", offload=True)
    offloaded = LongCatPipeline.from_pretrained(
        str(k), device="cpu", model="longcat-avatar-1.0", engine=low_memory
    )
    resident = LongCatPipeline.from_pretrained(str(k), device="cpu", model="longcat-avatar-1.0")
    two_steps = replace(DISTILLED, steps=2)  # a block written during the swap is read again at step 2
    one = request("longcat-avatar-1.0", sampling=two_steps)
    two = request("longcat-avatar-1.0", sampling=two_steps, speakers=TWO, image=EXAMPLES / "two_people.png")
    for job in (one, two):
        np.testing.assert_array_equal(frames(offloaded, job), frames(resident, job))
    assert offloaded.bundle.dit_slot is not None and offloaded.bundle.dit_slot.folder == "avatar_multi"


def test_lora_branch_is_the_reference_formula_and_off_is_the_base_layer() -> None:
    """y = base(x) + cast(up(down(cast(x))))·multiplier·alpha_scale, the down output chunked per split up
    (spec §2.7); in a float32 island the same in float32; switched off, the base layer exactly."""
    bundle = build_tiny_longcat_bundle("longcat-avatar", seed=0)
    lora = tiny_dmd_lora(bundle.dit, seed=1)
    assert bundle.lora is not None
    qkv = bundle.dit.get_submodule("blocks.0.attn.qkv")
    assert isinstance(qkv, LoraLinear)
    name = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv"
    down, ups = (
        lora[f"{name}.lora_down.weight"],
        [lora[f"{name}.lora_up.blocks.{i}.weight"] for i in range(3)],
    )
    x = torch.randn(2, 7, qkv.in_features, generator=torch.Generator().manual_seed(0))
    base = F.linear(x, qkv.weight, qkv.bias)
    bundle.lora.enabled = False
    assert torch.equal(qkv(x), base)
    bundle.lora.enabled = True
    rank = down.shape[0] // 3
    term = torch.cat([(x @ down[i * rank : (i + 1) * rank].T) @ ups[i].T for i in range(3)], dim=-1)
    torch.testing.assert_close(qkv(x), base + term * TINY_LORA_ALPHA_SCALE, rtol=1e-6, atol=1e-6)
    assert not torch.equal(qkv(x), base)
    ada = bundle.dit.get_submodule("blocks.0.adaLN_modulation.1")  # called through linear_fp32
    assert isinstance(ada, LoraLinear)
    ada_name = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___adaLN_modulation___lorahyphen___1"
    t = torch.randn(3, ada.in_features, generator=torch.Generator().manual_seed(1))
    ada_term = (t @ lora[f"{ada_name}.lora_down.weight"].T) @ lora[f"{ada_name}.lora_up.weight"].T
    expected = F.linear(t, ada.weight, ada.bias) + ada_term * TINY_LORA_ALPHA_SCALE
    torch.testing.assert_close(linear_fp32(ada, t), expected, rtol=1e-6, atol=1e-6)
    bundle.lora.enabled = False
    assert torch.equal(linear_fp32(ada, t), F.linear(t, ada.weight, ada.bias))


def test_lora_switch_is_honoured_by_compiled_blocks() -> None:
    """The switch is read in forward, so blocks compiled as models/runtime.compile_blocks compiles them
    (each block, dynamic=False) recompile for it instead of running the graph traced with the other state
    (dynamo's eager backend: its guards and graphs without a C++ toolchain, outputs bitwise eager's)."""
    bundle = build_tiny_longcat_bundle("longcat-avatar", seed=0)
    dit, switch = bundle.dit, bundle.lora
    assert switch is not None
    gen = torch.Generator().manual_seed(0)
    config = dit.config
    latent = torch.randn(1, 16, 3, 4, 4, generator=gen)
    text = torch.randn(1, config.model_max_length, config.caption_channels, generator=gen)
    audio = torch.randn(1, 9, config.audio_window, config.audio_block, config.audio_channel, generator=gen)
    t = torch.tensor([[0.0, 600.0, 600.0]])

    def run() -> torch.Tensor:
        with torch.no_grad():
            return dit(latent, t, text, None, audio, cond=Conditioning(num_cond_latents=1))

    switch.enabled = False
    off = run()
    switch.enabled = True
    on = run()
    assert not torch.equal(on, off)
    for block in dit.blocks:
        block.compile(backend="eager", dynamic=False)
    assert torch.equal(run(), on)
    switch.enabled = False
    assert torch.equal(run(), off)
    switch.enabled = True
    assert torch.equal(run(), on)


def _copy(k: Path, tmp_path: Path) -> Path:
    """K and B copied under tmp_path (to damage one of them); returns the new K."""
    shutil.copytree(k.parent, tmp_path / "weights")
    return tmp_path / "weights" / k.name


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        (f"../{BASE_FOLDER}", "missing the base folder .*LongCat-Video.*beside the model folder"),
        (f"../{BASE_FOLDER}/text_encoder", "text encoder config: .*LongCat-Video/text_encoder/config.json"),
        (f"../{BASE_FOLDER}/tokenizer", "umT5 tokenizer folder: .*LongCat-Video/tokenizer"),
        (
            f"../{BASE_FOLDER}/vae/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
        ),
        ("whisper-large-v3", "Whisper-large-v3 folder .*: .*whisper-large-v3"),
        ("base_model/config.json", "DiT base_model/ .*base_model/config.json"),
        ("base_model/diffusion_pytorch_model-00002-of-00002.safetensors", "DiT base_model/ .*00002-of-00002"),
    ],
)
def test_each_missing_piece_is_named(
    v15: tuple[LongCatPipeline, Path], tmp_path: Path, remove: str, message: str
) -> None:
    k = _copy(v15[1], tmp_path)
    target = (k / remove).resolve()
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ModelMissing, match=message):
        LongCatPipeline.from_pretrained(str(k), device="cpu", model="longcat-avatar")


def test_a_tensor_missing_from_the_vae_file_is_named(
    v15: tuple[LongCatPipeline, Path], tmp_path: Path
) -> None:
    k = _copy(v15[1], tmp_path)
    path = k.parent / BASE_FOLDER / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    save_file({name: t for name, t in tensors.items() if name != key}, str(path))
    with pytest.raises(CheckpointError, match=rf"file vae/diffusion_pytorch_model.safetensors, key {key}"):
        LongCatPipeline.from_pretrained(str(k), device="cpu", model="longcat-avatar")


def test_the_vocal_separator_is_loaded_when_present(
    v15: tuple[LongCatPipeline, Path], tmp_path: Path
) -> None:
    pytest.importorskip("onnx")
    from tests.test_vocals import _identity_model

    k = _copy(v15[1], tmp_path)
    _identity_model(k)  # an all-pass model at vocal_separator/Kim_Vocal_2.onnx
    loaded = LongCatPipeline.from_pretrained(str(k), device="cpu", model="longcat-avatar")
    assert loaded.bundle.vocals is not None


def test_a_distilled_job_without_the_lora_file_is_refused(
    v15: tuple[LongCatPipeline, Path], tmp_path: Path
) -> None:
    k = _copy(v15[1], tmp_path)
    (k / LORA_FILE).unlink()
    loaded = LongCatPipeline.from_pretrained(str(k), device="cpu", model="longcat-avatar")
    assert loaded.bundle.lora is None
    with pytest.raises(ModelMissing, match=r"needs the DMD LoRA .*lora/dmd_lora.safetensors"):
        loaded(request(sampling=DISTILLED))


def test_v10_missing_wav2vec_and_a_multi_dit_of_another_shape(
    v10: tuple[LongCatPipeline, Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    k = _copy(v10[1], tmp_path)
    shutil.rmtree(k / "chinese-wav2vec2-base")
    with pytest.raises(ModelMissing, match="chinese-wav2vec2-base folder .*: .*chinese-wav2vec2-base"):
        LongCatPipeline.from_pretrained(str(k), device="cpu", model="longcat-avatar-1.0")
    config = k / "avatar_multi" / "config.json"
    config.write_text(config.read_text().replace('"depth": 2', '"depth": 3'))
    dit = v10[0].bundle.dit
    before = {key: value.clone() for key, value in dit.state_dict().items()}
    with pytest.raises(CheckpointError, match="avatar_multi/config.json"):
        reload_dit(k, "avatar_multi", dit, dtype=torch.float32)
    assert all(torch.equal(before[key], value) for key, value in dit.state_dict().items())


def test_a_real_size_folder_refuses_the_tiny_resolution(
    v15: tuple[LongCatPipeline, Path], tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """resolution `tiny` is for tiny-size models only: the tiny folder takes it, a folder whose DiT config is
    the real size does not (at the doors' check, before any weight is read)."""
    assert make_settings(MULTITALK_WEIGHTS=str(v15[1]), MULTITALK_MODEL="longcat-avatar").tiny_sizes
    k = _copy(v15[1], tmp_path)
    config = k / "base_model" / "config.json"
    config.write_text(config.read_text().replace('"hidden_size": 64', '"hidden_size": 4096'))
    settings = make_settings(MULTITALK_WEIGHTS=str(k), MULTITALK_MODEL="longcat-avatar")
    assert not settings.tiny_sizes
    with pytest.raises(InvalidInput, match="resolution 'tiny'"):
        LongCatPipeline.check_inputs(request(), tiny_model=settings.tiny_sizes)


def test_cli_door_with_a_folder(v15: tuple[LongCatPipeline, Path], cli, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "out.mp4"
    proc = cli(
        "generate", "--model", "longcat-avatar", "--weights", v15[1], "--device", "cpu",
        "--image", EXAMPLES / "person.png", "--audio", EXAMPLES / "speech_b.wav", "--prompt", "hello",
        "--resolution", "tiny", "--max-duration", "0.6", "--steps", "1", "--out", out,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    info = probe_mp4(out)
    assert (info.frames, info.fps, info.has_audio) == (15, 25.0, True)


def test_worker_door_with_a_folder(v10: tuple[LongCatPipeline, Path, dict[str, torch.Tensor]],
                                   make_settings: Callable[..., Settings]) -> None:  # fmt: skip
    """A 1.0 job through the RunPod handler on a worker whose MULTITALK_WEIGHTS is the folder: an mp4
    decoded back."""
    import base64
    import tempfile

    from tests.test_worker import job_input, run

    service = JobService(make_settings(MULTITALK_WEIGHTS=str(v10[1]), MULTITALK_MODEL="longcat-avatar-1.0"))
    job = job_input(model="longcat-avatar-1.0", max_duration_s=0.6, advanced={"steps": 1, "seed": 3},
                    output={"delivery": "base64"})  # fmt: skip
    output = run(service, job)["output"]
    assert (output["frames"], output["fps"], output["model"]) == (9, 16, "longcat-avatar-1.0")
    assert output["resolved"]["weights"] == str(v10[1])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "out.mp4"
        path.write_bytes(base64.b64decode(output["video"]["base64"]))
        info = probe_mp4(path)
    assert (info.frames, info.fps, info.has_audio) == (9, 16.0, True)
