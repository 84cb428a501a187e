"""Low-memory mode (models/offload.py, engine `offload`): blocks visit the device one at a time, the
results do not change, and the option reaches the pipeline from Settings and the CLI."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from multitalk_worker.config import Settings
from multitalk_worker.errors import InvalidInput
from multitalk_worker.media import read_frames
from multitalk_worker.models.offload import BlockOffload
from multitalk_worker.models.runtime import FAST_RUNTIME, compile_blocks
from multitalk_worker.pipeline.engine import ENGINES, EngineOptions, engine_options
from multitalk_worker.pipeline.pipeline import TalkingVideoPipeline
from multitalk_worker.pipeline.request import GenerationResult
from multitalk_worker.service.resident import engine_from_settings
from tests.conftest import Cli
from tests.test_cli import EXAMPLES
from tests.test_pipeline import capped_request
from tests.test_transformer import _inputs, _model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _watch(offload: BlockOffload) -> list[tuple[int, list[int], bool]]:
    """Per block call: (index, resident blocks, whether its weights are off their host copies)."""
    seen: list[tuple[int, list[int], bool]] = []
    for index, block in enumerate(offload.blocks):

        def look(module: torch.nn.Module, args: object, index: int = index) -> None:
            onloaded = all(t.data_ptr() != h.data_ptr() for t, h in offload.host[index])
            seen.append((index, offload.resident(), onloaded))

        block.register_forward_pre_hook(look)  # runs after the offload's own pre-hook
    return seen


def _at_rest(offload: BlockOffload, skip: int | None = None) -> bool:
    """Every block but `skip` holds its host copy."""
    return all(
        t.data_ptr() == h.data_ptr()
        for index, pairs in enumerate(offload.host)
        if index != skip
        for t, h in pairs
    )


@pytest.mark.parametrize("compiled", [False, True])
def test_blocks_visit_the_device_one_at_a_time_and_the_output_is_unchanged(compiled: bool) -> None:
    model = _model()
    inputs = _inputs(1, 2)
    with torch.inference_mode():
        expected = model(**inputs, runtime=FAST_RUNTIME)
    offload = BlockOffload(model.blocks, torch.device("cpu"))
    if compiled:
        compile_blocks(model)
    seen = _watch(offload)
    assert offload.resident() == [] and _at_rest(offload)
    for _ in range(2):
        seen.clear()
        with torch.inference_mode():
            out = model(**inputs, runtime=FAST_RUNTIME)
        if compiled:
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(out, expected)
        # block i runs with its own copy on the device and block i+1 prefetched; nothing else is there
        assert seen == [(0, [0, 1], True), (1, [0, 1], True)]
        assert offload.resident() == [0] and _at_rest(offload, skip=0)  # block 0 waits for the next call


def test_offload_pipeline_makes_the_same_video_as_the_resident_one(capped_clip: GenerationResult) -> None:
    request = capped_request()  # one 25-frame clip, 3 guidance passes, 2 steps
    resident = capped_clip  # the resident pipeline's video of that request
    engine = replace(ENGINES["reference"], offload=True)
    pipe = TalkingVideoPipeline.from_pretrained("tiny", device="cpu", engine=engine)
    dit, text = pipe.offloads
    assert dit.blocks == list(pipe.bundle.dit.blocks)
    assert text.blocks == list(pipe.bundle.text_encoder.encoder.block)
    offloaded = pipe(request)
    assert np.array_equal(offloaded.frames, resident.frames)
    for offload in (dit, text):  # both stacks ran through their hooks and are back in host memory
        assert offload.resident() == [0] and _at_rest(offload, skip=0)


def test_offload_option_from_settings_and_cli_and_fp8_refused() -> None:
    assert engine_from_settings(Settings.from_env({"MULTITALK_OFFLOAD": "true"})).offload
    assert not engine_from_settings(Settings.from_env({})).offload
    assert engine_options("fast", offload=True).compile  # the fast engine keeps compilation
    with pytest.raises(InvalidInput, match="fp8 and offload cannot be combined"):
        EngineOptions(fp8=True, offload=True)


@pytest.mark.gpu
@CUDA
def test_cuda_offload_matches_resident_and_holds_two_blocks() -> None:
    model = _model().to(torch.bfloat16)
    inputs = {k: v.cuda() for k, v in _inputs(1, 2).items()}
    resident = _model().to("cuda", torch.bfloat16)
    resident.load_state_dict(model.state_dict())
    for name, tensor in model.named_parameters():  # everything outside the blocks on the GPU
        if not name.startswith("blocks."):
            tensor.data = tensor.data.cuda()
    offload = BlockOffload(model.blocks, torch.device("cuda"))
    assert all(h.is_pinned() for pairs in offload.host for _, h in pairs)
    with torch.inference_mode():
        expected = resident(**inputs, runtime=FAST_RUNTIME)
        out = model(**inputs, runtime=FAST_RUNTIME)
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
    assert offload.resident() == [0]


def test_cli_offload_flag_same_video_and_fp8_refused(tmp_path: Path, cli: Cli) -> None:
    """The flag reaches the pipeline (one 10-frame clip: the pipeline test above compares whole clips)."""
    args = ["--image", EXAMPLES / "person.png", "--audio", EXAMPLES / "speech_a.wav", "--seed", "3"]
    args += ["--max-duration", "0.4", "--steps", "1", "--prompt", "p", "--weights", "tiny"]
    plain, offloaded = tmp_path / "plain.mp4", tmp_path / "offload.mp4"
    for out, extra in ((plain, []), (offloaded, ["--offload"])):
        proc = cli("generate", *args, *extra, "--out", out)
        assert proc.returncode == 0, proc.stderr
    assert len(read_frames(plain)) == 10
    assert np.array_equal(read_frames(offloaded), read_frames(plain))
    proc = cli("generate", *args, "--out", tmp_path / "x.mp4", "--offload", "--fp8")
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "fp8 and offload cannot be combined" in proc.stderr
