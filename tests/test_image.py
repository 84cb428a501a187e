"""Bucket choice, resize/crop arithmetic, regions and person masks (spec 3.1, 3.2, 3.5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multitalk_worker.errors import ImageDecodeFailed, InvalidInput
from multitalk_worker.pipeline import image
from tests.media_files import cutout_png, exif_photo, grey16_png

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_bucket_tables_are_the_reference_tables() -> None:
    assert list(image.BUCKETS_480P) == [
        "0.26", "0.38", "0.50", "0.67", "0.82", "1.00", "1.22", "1.50",
        "1.86", "2.00", "2.50", "2.83", "3.60", "3.80", "4.00",
    ]  # fmt: skip
    assert len(image.BUCKETS_720P) == 21 and image.BUCKETS_720P["3.75"] == (1920, 512)
    assert image.BUCKETS_480P["2.83"] == (1088, 384) and image.BUCKETS_720P["1.31"] == (1088, 832)
    for table in (image.BUCKETS_480P, image.BUCKETS_720P, image.BUCKETS_TINY):
        assert all(h % 16 == 0 and w % 16 == 0 for h, w in table.values())


@pytest.mark.parametrize(
    ("src", "resolution", "bucket"),
    [
        ((720, 1280), "480p", (448, 896)),
        ((720, 1280), "720p", (704, 1280)),
        ((1280, 720), "480p", (832, 448)),
        ((1280, 720), "720p", (1280, 704)),
        ((512, 512), "480p", (640, 640)),
        ((512, 512), "720p", (960, 960)),
        ((1440, 2560), "480p", (448, 896)),
        ((100, 1000), "480p", (320, 1216)),  # beyond the table: nearest key
    ],
)
def test_bucket_choice(src: tuple[int, int], resolution: str, bucket: tuple[int, int]) -> None:
    assert image.choose_bucket(*src, resolution) == bucket


def test_unknown_resolution_is_rejected() -> None:
    with pytest.raises(InvalidInput, match="1080p"):
        image.choose_bucket(10, 10, "1080p")


def test_resize_uses_pil_bilinear_ceil_and_half_to_even_crop() -> None:
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 255, (641, 640, 3), dtype=np.uint8))
    cond = image.prepare_image(src, "480p")
    assert cond.bucket == (640, 640) and cond.pixels.shape == (1, 3, 1, 640, 640)
    # scale = max(640/641, 640/640) = 1 -> 641x640; top = round(0.5) = 0 (half to even), not 1
    expected = np.asarray(src.resize((640, 641), resample=Image.BILINEAR))[0:640]
    got = ((cond.pixels[0, :, 0].permute(1, 2, 0) / 2 + 0.5) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(got, expected)
    assert cond.pixels.min() >= -1 and cond.pixels.max() <= 1


def test_resize_scale_and_crop_offsets_for_16_9() -> None:
    src = Image.new("RGB", (1280, 720), (255, 0, 0))
    src.paste((0, 0, 255), (0, 0, 1280, 60))  # blue band of 60 rows at the top
    cond = image.prepare_image(src, "480p")
    # scale 0.7 -> 504x896 and crop top = 28: the band (42 resized rows) keeps 14 rows in the output
    assert cond.bucket == (448, 896)
    red = cond.pixels[0, 0, 0, :, 0]
    assert (red[:12] < -0.9).all() and (red[16:] > 0.9).all()


def test_example_image_loads_and_bad_bytes_fail(tmp_path: Path) -> None:
    loaded = image.load_image(EXAMPLES / "person.png")
    assert loaded.image.mode == loaded.mode == "RGB" and loaded.background is None
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    with pytest.raises(ImageDecodeFailed, match="bad.png"):
        image.load_image(bad)
    with pytest.raises(ImageDecodeFailed):
        image.load_image(tmp_path / "missing.png")


def test_region_is_x_right_y_down_and_converts_to_row_first_bbox() -> None:
    # 100 rows x 200 columns: x0=0.1 -> column 20, y0=0.2 -> row 20, x1=0.5 -> column 100, y1=0.9 -> row 90
    assert image.region_to_bbox((0.1, 0.2, 0.5, 0.9), 100, 200) == (20, 20, 90, 100)
    assert image.region_to_bbox("full", 100, 200) == (0, 0, 100, 200)


def test_default_masks_are_the_reference_halves() -> None:
    # the reference example image: 2560 wide, 1440 high
    assert image.default_bbox("left", 1440, 2560) == (72, 64, 1368, 1216)
    assert image.default_bbox("right", 1440, 2560) == (72, 1344, 1368, 2496)
    assert image.person_boxes([None, None], 1440, 2560) == [(72, 64, 1368, 1216), (72, 1344, 1368, 2496)]
    assert image.person_boxes(["left", "right"], 1440, 2560) == image.person_boxes([None, None], 1440, 2560)


@pytest.mark.parametrize(
    ("regions", "message"),
    [
        ([(0.0, 0.0, 0.6, 1.0), (0.5, 0.0, 1.0, 1.0)], "overlap"),
        (["full", "right"], "overlap"),
        ([(0.5, 0.0, 0.2, 1.0), "right"], "0 <= x0 < x1 <= 1"),
        ([(0.0, 0.0, 1.2, 1.0), "right"], "0 <= x0 < x1 <= 1"),
        ([(0.0, 0.0, 0.5), "right"], "not accepted"),
        (["left", None], "both speakers or for neither"),
        (["middle", "right"], "not accepted"),
    ],
)
def test_bad_regions_are_rejected(regions: list, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        image.person_boxes(regions, 360, 640)


def test_single_speaker_takes_no_region() -> None:
    assert image.person_boxes([None], 360, 640) is None
    with pytest.raises(InvalidInput, match="only applies with two speakers"):
        image.person_boxes(["left"], 360, 640)


def test_person_masks_two_people_and_one() -> None:
    src, bucket, latent = (360, 640), (448, 896), (56, 112)
    boxes = image.person_boxes([None, None], *src)
    masks = image.person_masks(boxes, src, bucket, latent)
    assert masks.shape == (3, 56, 112) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert masks[0, 28, 20] == 1 and masks[0, 28, 90] == 0 and masks[1, 28, 90] == 1
    assert torch.equal(masks[2], ((masks[0] + masks[1]) == 0).float())
    assert masks[0, :, 56:].sum() == 0 and masks[1, :, :56].sum() == 0
    ones = image.person_masks(None, src, bucket, latent)
    assert torch.equal(ones, torch.ones(3, 56, 112))
    image.check_masks_visible(masks, 2)


def test_tiny_region_is_rejected_on_the_token_grid() -> None:
    src, bucket, latent = (360, 640), (448, 896), (56, 112)
    boxes = image.person_boxes([(0.0, 0.0, 0.004, 0.004), "right"], *src)
    masks = image.person_masks(boxes, src, bucket, latent)
    with pytest.raises(InvalidInput, match="speaker 1 is too small"):
        image.check_masks_visible(masks, 2)


def _masks_at_source_size(
    boxes: list[image.PixelBox], src: tuple[int, int], bucket: tuple[int, int], latent: tuple[int, int]
) -> torch.Tensor:
    """Spec 3.5 literally: draw at source size, nearest-resize, crop, nearest to the latent grid."""
    masks = torch.zeros(3, *src)
    for index, (r0, c0, r1, c1) in enumerate(boxes):
        masks[index, r0:r1, c0:c1] = 1
    masks[2] = (masks[:2].sum(0) == 0).float()
    scaled = torch.nn.functional.interpolate(
        masks[None], size=image._scaled_size(*src, bucket), mode="nearest"
    )
    cropped = image._centre_crop(scaled, bucket)
    return (torch.nn.functional.interpolate(cropped, size=latent, mode="nearest")[0] > 0).float()


@pytest.mark.parametrize(
    ("src", "resolution", "regions"),
    [
        ((360, 640), "480p", [None, None]),
        ((1081, 1917), "720p", [(0.03, 0.1, 0.47, 0.9), (0.52, 0.2, 0.99, 0.95)]),
        ((2999, 1003), "480p", [(0.0, 0.0, 1.0, 0.31), (0.0, 0.5, 1.0, 1.0)]),
        ((37, 23), "tiny", ["left", "right"]),
    ],
)
def test_masks_built_at_bucket_size_equal_the_source_size_construction(
    src: tuple[int, int], resolution: str, regions: list
) -> None:
    bucket = image.choose_bucket(*src, resolution)
    latent = (bucket[0] // 8, bucket[1] // 8)
    boxes = image.person_boxes(regions, *src)
    assert boxes is not None
    assert torch.equal(
        image.person_masks(boxes, src, bucket, latent), _masks_at_source_size(boxes, src, bucket, latent)
    )


def test_oversized_image_is_refused_from_its_header(tmp_path: Path) -> None:
    """A 12000x12000 PNG (140 KB) is refused before any pixel is decoded."""
    path = tmp_path / "huge.png"
    Image.new("L", (12000, 12000)).save(path, optimize=True)
    assert path.stat().st_size < 200_000
    with pytest.raises(
        InvalidInput, match=r"12000x12000 is 144.0 megapixels; images of at most 50 megapixels"
    ):
        image.image_size(path)
    with pytest.raises(InvalidInput, match="megapixels"):
        image.load_image(path)
    image.check_pixels(8000, 6000, "photo")  # a 48 MP photo is accepted


# ----------------------------------------------------------------------------- images as a viewer shows them

WHITE = (255, 255, 255)


def test_exif_orientation_is_applied_by_default_and_stored_keeps_the_pixels(tmp_path: Path) -> None:
    path = exif_photo(tmp_path / "phone.jpg", orientation=6)
    shown = image.load_image(path)
    assert shown.image.size == (400, 600) and image.image_size(path) == (400, 600)  # portrait, as shown
    assert shown.report() == {
        "mode": "RGB", "orientation": "exif", "exif_orientation": 6, "rotated": True, "background": None,
    }  # fmt: skip
    pixels = np.asarray(shown.image.convert("L"))
    assert pixels[:50, -50:].mean() > 240 and pixels[:50, :50].mean() < 120  # the block is top-right
    stored = image.load_image(path, orientation="stored")
    assert stored.image.size == (600, 400) and image.image_size(path, "stored") == (600, 400)
    assert stored.report()["rotated"] is False
    assert np.asarray(stored.image.convert("L"))[:50, :50].mean() > 240  # the block where it is stored


@pytest.mark.parametrize(("orientation", "size"), [(1, (600, 400)), (3, (600, 400)), (8, (400, 600))])
def test_every_exif_orientation_turns_as_a_viewer(tmp_path: Path, orientation: int, size: tuple) -> None:
    assert image.load_image(exif_photo(tmp_path / "p.jpg", orientation)).image.size == size


def test_options_are_checked() -> None:
    with pytest.raises(InvalidInput, match=r"use one of \['exif', 'stored'\]"):
        image.check_orientation("sideways")
    with pytest.raises(InvalidInput, match="#rrggbb"):
        image.parse_background("white")
    assert image.parse_background("#00FF80") == (0, 255, 128)


def grey_of(picture: Image.Image) -> np.ndarray:
    assert picture.mode == "RGB"
    rgb = np.asarray(picture).astype(int)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return rgb[..., 0]


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_wide_grey_keeps_its_level(mode: str) -> None:
    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    if mode == "I;16B":
        source = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    elif mode == "I":
        source = Image.fromarray(values.astype(np.int32))
    else:
        source = Image.fromarray(values)
    assert source.mode == mode
    assert grey_of(image.to_rgb(source, WHITE)).tolist() == [[0, 1, 128, 255]]


def test_sixteen_bit_png_keeps_its_grey(tmp_path: Path) -> None:
    path, mean = grey16_png(tmp_path / "g16.png")
    loaded = image.load_image(path)
    assert loaded.mode == "I;16" and abs(grey_of(loaded.image).mean() - mean) < 1.0


def test_float_grey_in_unit_and_byte_scales() -> None:
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    byte = Image.fromarray(np.array([[0.0, 128.0, 255.0]], np.float32))
    assert unit.mode == byte.mode == "F"
    assert grey_of(image.to_rgb(unit, WHITE)).tolist() == [[0, 128, 255]]
    assert grey_of(image.to_rgb(byte, WHITE)).tolist() == [[0, 128, 255]]


def test_one_bit_l_cmyk_and_rgb() -> None:
    bits = Image.fromarray(np.array([[0, 1]], bool))
    assert bits.mode == "1" and grey_of(image.to_rgb(bits, WHITE)).tolist() == [[0, 255]]
    grey = Image.new("L", (2, 1), 77)
    assert grey_of(image.to_rgb(grey, WHITE)).tolist() == [[77, 77]]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # full magenta and yellow: red
    assert image.to_rgb(cmyk, WHITE).getpixel((0, 0)) == (255, 0, 0)
    rgb = Image.new("RGB", (1, 1), (1, 2, 3))
    assert image.to_rgb(rgb, WHITE) is rgb


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "RGBa"])
def test_transparency_is_put_on_the_background(mode: str) -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(200, 200, 200, 255), (0, 0, 0, 0), (0, 0, 0, 128)])  # opaque, clear, half black
    if mode == "PA":  # palette index and alpha: index 0 light grey, index 1 black
        source = Image.frombytes("PA", (3, 1), bytes([0, 255, 1, 0, 1, 128]))
        source.putpalette([200, 200, 200, 0, 0, 0])
    else:
        source = rgba.convert(mode)
    assert source.mode == mode
    out = np.asarray(image.to_rgb(source, (0, 255, 0))).astype(int)
    assert abs(out[0, 0] - 200).max() <= 2 and out[0, 1].tolist() == [0, 255, 0]
    assert abs(out[0, 2] - [0, 127, 0]).max() <= 2  # half black over green


def test_palette_with_and_without_a_transparent_index(tmp_path: Path) -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putdata([0, 1])
    assert image.to_rgb(palette, WHITE).getpixel((1, 0)) == (0, 0, 255)
    palette.info["transparency"] = 1  # index 1 is transparent, as in a GIF
    out = image.to_rgb(palette, (0, 255, 0))
    assert (out.getpixel((0, 0)), out.getpixel((1, 0))) == ((255, 0, 0), (0, 255, 0))
    palette.save(tmp_path / "p.png")
    loaded = image.load_image(tmp_path / "p.png", background="#00ff00")
    assert loaded.mode == "P" and loaded.background == "#00ff00"
    assert loaded.image.getpixel((1, 0)) == (0, 255, 0)


def test_cutout_default_background_is_white(tmp_path: Path) -> None:
    loaded = image.load_image(cutout_png(tmp_path / "cut.png"))
    assert loaded.mode == "RGBA" and loaded.background == image.DEFAULT_BACKGROUND == "#ffffff"
    assert loaded.image.getpixel((0, 0)) == WHITE and loaded.image.getpixel((32, 24)) == (128, 128, 128)


def test_heic_photo_decodes(tmp_path: Path) -> None:
    """tests/fixtures/photo.heic (615 bytes): 64x48, red left half, blue right half, a white corner."""
    loaded = image.load_image(FIXTURES / "photo.heic")
    assert loaded.image.size == (64, 48) and image.image_size(FIXTURES / "photo.heic") == (64, 48)
    pixels = np.asarray(loaded.image).astype(int)
    assert abs(pixels[24, 8] - [200, 40, 40]).max() < 8 and abs(pixels[24, 56] - [40, 60, 200]).max() < 8
    assert (pixels[4, 4] > 240).all()


def test_avif_photo_decodes(tmp_path: Path) -> None:
    path = tmp_path / "photo.avif"
    Image.new("RGB", (64, 48), (30, 160, 90)).save(path, quality=90)
    loaded = image.load_image(path)
    assert loaded.image.size == (64, 48)
    assert abs(np.asarray(loaded.image).astype(int).reshape(-1, 3).mean(0) - [30, 160, 90]).max() < 6


@pytest.mark.parametrize("name", ["notes.txt", "missing.png"])
def test_unreadable_image_lists_the_accepted_formats(tmp_path: Path, name: str) -> None:
    if name == "notes.txt":
        (tmp_path / name).write_text("not a picture")
    for call in (image.load_image, image.image_size):
        with pytest.raises(ImageDecodeFailed, match=f"{name}: .*accepted: PNG, JPEG, .* HEIC/HEIF or AVIF"):
            call(tmp_path / name)
