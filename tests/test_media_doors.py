"""Media as people send them, through the worker's service and the CLI on the tiny model (issue 21).

Five tiny generations (there were nine): each photo or source is generated once, through one door; the other
door proves the same reading through validate_only's plan, whose `source` is the one report
(`PreparedInputs.report`) that the result repeats, and its preview, the prepared frame as the model sees it.

- Phone photo, EXIF Orientation 6. CLI: the video is portrait (48x64), and the CLI says it turned it.
  Worker plan: the portrait bucket with `exif`, the landscape one (64x48 out) with `stored` (the
  reference's reading); the preview shows where the stored corner went. `--image-orientation` and
  `--image-background` reach the same wire input (no generation).
- 16-bit grey PNG. CLI: the video keeps its grey (colour correction pulls to it). Worker plan: mode I;16, and
  the preview's level (the clipped reading gave white).
- RGBA cut-out. CLI: the video is on the `--image-background` green. Worker plan: mode and background, the
  preview green, and white by default.
- HEIC. Worker: the plan's preview has the photo's colours, and a finished job is 64x48. CLI: an unreadable
  one is refused with the accepted list.
- Browser WebM and stream-copy cut. Worker plan: the frames and seconds that decode. CLI: the cut is dubbed
  and its length as decoded printed from the result's `source`.
"""

from __future__ import annotations

import base64
import io
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from multitalk_worker.cli import build_parser
from multitalk_worker.cli import build_request as cli_request
from multitalk_worker.errors import InvalidInput
from multitalk_worker.media import probe_mp4, read_frames
from multitalk_worker.service import JobService
from tests.conftest import EXAMPLES, Cli
from tests.media_files import browser_webm, cutout_png, exif_photo, grey16_png, stream_copy_cut, write_video
from tests.test_worker import error_of, run
from tests.test_worker_models import base64_video, decoded, output_of, settings_for

FAST = {"resolution": "tiny", "max_duration_s": 0.4, "advanced": {"steps": 1, "seed": 3}}
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GREEN = "#00ff00"


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("media")
    inputs = root / "inputs"
    inputs.mkdir()
    (inputs / "speech_a.wav").write_bytes((EXAMPLES / "speech_a.wav").read_bytes())
    (inputs / "photo.heic").write_bytes((FIXTURES / "photo.heic").read_bytes())
    exif_photo(inputs / "phone.jpg", orientation=6)
    _, grey_mean = grey16_png(inputs / "grey16.png")
    cutout_png(inputs / "cutout.png")
    browser_webm(inputs / "rec.webm", 90, 30)
    stream_copy_cut(write_video(root / "full.mp4", 90, 30), inputs / "cut.mp4", Fraction(9, 10))
    return {"root": root, "inputs": inputs, "grey_mean": grey_mean}


@pytest.fixture(scope="module")
def worker(volume: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> JobService:
    settings = settings_for(
        volume["root"], tmp_path_factory.mktemp("w"), MULTITALK_INFINITETALK_MAX_DURATION_S="10"
    )
    return JobService(settings)


def image_job(image: str, **fields: Any) -> dict[str, Any]:
    base = {"image": f"inputs/{image}", "speakers": [{"audio": "inputs/speech_a.wav"}], "prompt": "a talk"}
    return base | FAST | {"output": {"delivery": "base64"}} | fields


def dub_job(video: str, **fields: Any) -> dict[str, Any]:
    base = {
        "model": "infinitetalk",
        "video": f"inputs/{video}",
        "speakers": [{"audio": "inputs/speech_a.wav"}],
    }
    return base | {"prompt": "a talk"} | FAST | {"output": {"delivery": "base64"}} | fields


def planned(worker: JobService, job: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray]:
    """validate_only's plan, and its preview (one speaker: the image at the bucket, as the model sees it)."""
    plan = output_of(run(worker, job | {"validate_only": True}))["plan"]
    png = base64.b64decode(plan["preview_png"].split(",", 1)[1])
    return plan, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


# ----------------------------------------------------------------------------- the worker


def test_worker_plans_a_phone_photo_as_shown_or_as_stored(worker: JobService) -> None:
    plan, preview = planned(worker, image_job("phone.jpg"))
    assert (plan["image"]["width"], plan["image"]["height"], plan["bucket"]) == (400, 600, [64, 48])
    assert plan["source"] | {} == {
        "kind": "image", "mode": "RGB", "orientation": "exif", "exif_orientation": 6, "rotated": True,
        "background": None,
    }  # fmt: skip
    assert preview[:8, -8:].mean() > 240 and preview[:8, :8].mean() < 120  # the stored corner, top-right
    stored, preview = planned(worker, image_job("phone.jpg", image_orientation="stored"))
    assert (stored["image"]["width"], stored["bucket"], stored["source"]["rotated"]) == (600, [48, 64], False)
    assert preview[:8, :8].mean() > 240


def test_worker_plans_sixteen_bit_grey_and_a_cutout_on_its_background(
    worker: JobService, volume: dict[str, Any]
) -> None:
    plan, preview = planned(worker, image_job("grey16.png"))
    assert plan["source"]["mode"] == "I;16"
    assert abs(preview.mean() - volume["grey_mean"]) < 3  # was 253: clipped to white
    plan, preview = planned(worker, image_job("cutout.png", image_background=GREEN))
    assert (plan["source"]["mode"], plan["source"]["background"]) == ("RGBA", GREEN)
    assert preview[0, 0].tolist() == [0, 255, 0] and abs(preview[24, 24] - 128).max() <= 2
    _, preview = planned(worker, image_job("cutout.png"))
    assert preview[0, 0].tolist() == [255, 255, 255]  # white by default


def test_worker_makes_a_video_of_a_heic_photo(worker: JobService, tmp_path: Path) -> None:
    plan, preview = planned(worker, image_job("photo.heic"))
    assert (plan["image"]["width"], plan["image"]["height"], plan["bucket"]) == (64, 48, [48, 64])
    assert abs(preview[24, 8] - [200, 40, 40]).max() < 10 and abs(preview[24, 56] - [40, 60, 200]).max() < 10
    output = output_of(run(worker, image_job("photo.heic")))
    assert (output["width"], output["height"], output["source"]["mode"]) == (64, 48, "RGB")
    frames, _ = decoded(base64_video(output), tmp_path, "heic.mp4")
    assert frames.shape == (10, 48, 64, 3)


def test_worker_refuses_image_options_with_a_video_and_bad_colours(worker: JobService) -> None:
    error = error_of(run(worker, dub_job("rec.webm", image_orientation="stored")))
    assert error["code"] == "INVALID_INPUT" and "image_orientation applies to an image" in error["message"]
    error = error_of(run(worker, image_job("cutout.png", image_background="green")))
    assert error["code"] == "INVALID_INPUT" and "image_background" in error["message"]


def test_worker_refuses_a_text_file_as_image_with_the_accepted_list(worker: JobService, volume: dict) -> None:
    (volume["inputs"] / "notes.heic").write_text("not a photo")
    error = error_of(run(worker, image_job("notes.heic")))
    assert error["code"] == "IMAGE_DECODE_FAILED" and "HEIC/HEIF or AVIF" in error["message"]


@pytest.mark.parametrize(("video", "frames", "seconds"), [("rec.webm", 90, 3.0), ("cut.mp4", 63, 2.1)])
def test_worker_plans_the_length_that_decodes(
    worker: JobService, video: str, frames: int, seconds: float
) -> None:
    """A MediaRecorder WebM declares no length (was reported as 0 frames, 0 s); a `-ss 0.9 -c copy` cut
    declares the 90 frames its edit list hides 27 of (was reported as 90). The result's `source` is this
    report (the CLI's dub of the cut, below, prints it)."""
    plan = output_of(run(worker, dub_job(video, validate_only=True)))["plan"]
    source = plan["source"]
    assert (source["frames"], source["duration_s"], source["fps"]) == (frames, pytest.approx(seconds), 30.0)
    assert source["counted_by"] == "demux" and plan["video"]["frames"] == frames
    assert source["frames_past_end"] == 0 and source["last_frame_held"] is False


# ----------------------------------------------------------------------------- the CLI


def cli_generate(cli: Cli, out: Path, *args: str | Path) -> str:
    proc = cli(
        "generate", "--prompt", "a person talking", "--weights", "tiny", "--steps", "1", "--max-duration",
        "0.4", "--audio", EXAMPLES / "speech_a.wav", "--out", out, *args,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "negative Z" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    return proc.stdout


def test_cli_flags_build_the_image_fields_of_the_wire_input(volume: dict[str, Any], tmp_path: Path) -> None:
    """The flags are fields of the wire input every door parses (no generation: the worker's plans above
    show what the fields do); with a video they are the schema's refusal, as for the worker."""
    settings = settings_for(volume["root"], tmp_path)
    common = ["generate", "--prompt", "x", "--weights", "tiny", "--out", str(tmp_path / "x.mp4")]
    common += ["--audio", str(EXAMPLES / "speech_a.wav")]
    photo = ["--image", str(volume["inputs"] / "phone.jpg")]
    args = build_parser().parse_args(
        [*common, *photo, "--image-orientation", "stored", "--image-background", GREEN]
    )
    request = cli_request(args, settings)
    assert (request.image_orientation, request.image_background) == ("stored", GREEN)
    request = cli_request(build_parser().parse_args([*common, *photo]), settings)
    assert (request.image_orientation, request.image_background) == ("exif", "#ffffff")
    video = ["--model", "infinitetalk", "--video", str(volume["inputs"] / "cut.mp4")]
    with pytest.raises(InvalidInput, match="image_orientation applies to an image"):
        cli_request(build_parser().parse_args([*common, *video, "--image-orientation", "exif"]), settings)


def test_cli_turns_a_phone_photo_as_shown(cli: Cli, volume: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "phone.mp4"
    stdout = cli_generate(cli, out, "--image", volume["inputs"] / "phone.jpg")
    info = probe_mp4(out)
    assert (info.width, info.height) == (48, 64)  # portrait; `stored` is landscape: the worker's plan above
    assert "turned by its EXIF orientation 6" in stdout


def test_cli_keeps_sixteen_bit_grey(cli: Cli, volume: dict[str, Any], tmp_path: Path) -> None:
    """Colour correction pulls every frame to the picture's Lab statistics: a grey picture gives a grey
    video of about its level (the clipped reading gave white, mean 253)."""
    out = tmp_path / "grey.mp4"
    cli_generate(cli, out, "--image", volume["inputs"] / "grey16.png")
    frames = read_frames(out).astype(float)
    assert abs(frames.mean() - volume["grey_mean"]) < 12
    assert abs(frames.mean(axis=(0, 1, 2)) - frames.mean()).max() < 6  # grey: no colour cast


def test_cli_puts_a_cutout_on_the_chosen_background(cli: Cli, volume: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "cut.mp4"
    stdout = cli_generate(cli, out, "--image", volume["inputs"] / "cutout.png", "--image-background", GREEN)
    assert "transparent pixels on #00ff00" in stdout
    red, green, blue = read_frames(out).astype(float).mean(axis=(0, 1, 2))
    assert green > red + 40 and green > blue + 40  # the green background dominates


def test_cli_refuses_an_unreadable_heic_with_the_list(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "photo2.heic"
    bad.write_bytes(b"\x00\x00\x00\x1cftypheic" + bytes(64))
    proc = cli(
        "generate", "--prompt", "x", "--weights", "tiny", "--image", bad,
        "--audio", EXAMPLES / "speech_a.wav", "--out", tmp_path / "x.mp4",
    )  # fmt: skip
    assert proc.returncode == 1 and "error [IMAGE_DECODE_FAILED]: photo2.heic" in proc.stderr
    assert "accepted: PNG, JPEG, WebP, BMP, GIF, TIFF, HEIC/HEIF or AVIF" in proc.stderr


def test_cli_reports_the_length_that_decodes(cli: Cli, volume: dict[str, Any], tmp_path: Path) -> None:
    """The stream-copy cut (the browser WebM's report is the worker's plan, above: one source report)."""
    out = tmp_path / "dub.mp4"
    stdout = cli_generate(cli, out, "--model", "infinitetalk", "--video", volume["inputs"] / "cut.mp4")
    assert "source: 63 frames, 2.10 s as decoded (30 fps, counted by demux)" in stdout
    assert probe_mp4(out).frames == 10
