"""Reference image in, bucket-sized conditioning image and person masks out (spec 3.1, 3.2, 3.5).

The picture is read as a viewer shows it (`load_image`): EXIF orientation applied (orientation `exif`, our
default; `stored` keeps the stored pixels and ignores EXIF, as the reference does), every Pillow mode mapped
to 8-bit RGB at its own scale (16-bit grey divided by 257, not clipped), and transparent pixels composited on
a background colour (default white) instead of showing whatever colour the file stores under them.

Regions. Our requests give a person's region as `[x0, y0, x1, y1]` normalised to the input image:
x runs left to right, y top to bottom, both 0..1 (or the shorthands `left`, `right`, `full`). The
reference's JSON `bbox` is different and a frequent trap: `[r0, c0, r1, c1]` in source pixels with the
ROW (y) range first, filling `mask[r0:r1, c0:c1]`. `region_to_bbox` converts ours to theirs. The
shorthands `left`/`right` are exactly the reference's default two-person masks (halves with 5% margins).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from multitalk_worker.errors import ImageDecodeFailed, InvalidInput
from multitalk_worker.pipeline.request import (
    ACCEPTED_IMAGES,
    DEFAULT_BACKGROUND,
    IMAGE_ORIENTATIONS,
    ImageOrientation,
    Region,
)

# Keys are height/width ratios as the reference writes them; values are (H, W) in pixels.
BUCKETS_480P: dict[str, tuple[int, int]] = {
    "0.26": (320, 1216), "0.38": (384, 1024), "0.50": (448, 896), "0.67": (512, 768),
    "0.82": (576, 704), "1.00": (640, 640), "1.22": (704, 576), "1.50": (768, 512),
    "1.86": (832, 448), "2.00": (896, 448), "2.50": (960, 384), "2.83": (1088, 384),
    "3.60": (1152, 320), "3.80": (1216, 320), "4.00": (1280, 320),
}  # fmt: skip
BUCKETS_720P: dict[str, tuple[int, int]] = {
    "0.22": (448, 2048), "0.29": (512, 1792), "0.36": (576, 1600), "0.45": (640, 1408),
    "0.55": (704, 1280), "0.63": (768, 1216), "0.76": (832, 1088), "0.88": (896, 1024),
    "1.00": (960, 960), "1.14": (1024, 896), "1.31": (1088, 832), "1.50": (1152, 768),
    "1.58": (1216, 768), "1.82": (1280, 704), "1.91": (1344, 704), "2.20": (1408, 640),
    "2.30": (1472, 640), "2.67": (1536, 576), "2.89": (1664, 576), "3.62": (1856, 512),
    "3.75": (1920, 512),
}  # fmt: skip
# Only for the tiny random-weight model (whole-pipeline CPU runs in seconds); not a reference table.
BUCKETS_TINY: dict[str, tuple[int, int]] = {
    "0.50": (32, 64), "0.75": (48, 64), "1.00": (48, 48), "1.33": (64, 48), "2.00": (64, 32),
}  # fmt: skip
BUCKET_TABLES: dict[str, dict[str, tuple[int, int]]] = {
    "480p": BUCKETS_480P,
    "720p": BUCKETS_720P,
    "tiny": BUCKETS_TINY,
}
_HEX_COLOUR = re.compile(r"#[0-9a-fA-F]{6}")
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit full scale (Pillow's 16-bit PNG/TIFF modes)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")  # no decoder opens a file as "La"
MAX_IMAGE_PIXELS = 50_000_000  # a 48 MP phone photo fits; checked from the header, before decoding
FACE_MARGIN = 0.05  # the reference's `face_scale`: margin of the default two-person masks
PixelBox = tuple[int, int, int, int]  # (r0, c0, r1, c1): rows r0:r1, columns c0:c1


@dataclass(frozen=True)
class ConditionImage:
    pixels: torch.Tensor  # float32 [1, 3, 1, H, W] in [-1, 1]
    source_size: tuple[int, int]  # (src_h, src_w)
    bucket: tuple[int, int]  # (H, W)


def check_pixels(width: int, height: int, name: str, limit: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse a picture (an image, a video's frame size) of more than `limit` pixels, before decoding."""
    if width < 1 or height < 1 or width * height > limit:
        raise InvalidInput(
            f"{name}: {width}x{height} is {width * height / 1e6:.1f} megapixels; "
            f"images of at most {limit / 1e6:g} megapixels are accepted (scale it down)",
            stage="image",
        )


@dataclass(frozen=True)
class LoadedImage:
    """A decoded picture as RGB, and what was done to get there (the result's `source` report)."""

    image: Image.Image  # RGB, displayed orientation
    mode: str  # the file's Pillow mode, e.g. "RGB", "I;16", "RGBA", "P", "CMYK"
    orientation: ImageOrientation  # what the job asked
    exif_orientation: int  # the file's EXIF Orientation tag, 1 (upright) when it has none
    background: str | None  # the colour transparent pixels were put on; None: the picture has none

    def report(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "orientation": self.orientation,
            "exif_orientation": self.exif_orientation,
            "rotated": self.orientation == "exif" and self.exif_orientation != 1,
            "background": self.background,
        }


def parse_background(colour: str) -> tuple[int, int, int]:
    """`#rrggbb` -> (r, g, b)."""
    if not isinstance(colour, str) or not _HEX_COLOUR.fullmatch(colour):
        raise InvalidInput(
            f"image background {colour!r} is not accepted; use a colour as #rrggbb, e.g. #ffffff"
        )
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def check_orientation(orientation: str) -> ImageOrientation:
    if orientation not in IMAGE_ORIENTATIONS:
        raise InvalidInput(
            f"image orientation {orientation!r} is not accepted; use one of {list(IMAGE_ORIENTATIONS)}"
        )
    return orientation


@functools.cache
def register_image_plugins() -> None:
    """HEIC/HEIF (the iPhone's default) through pi-heif: the decode-only build of pillow-heif, whose wheels
    bundle only libheif and libde265 (LGPL-3.0, no encoder, no GPL x265). AVIF is Pillow's own plugin."""
    from pi_heif import register_heif_opener

    register_heif_opener()


def _unreadable(path: Path, exc: BaseException) -> ImageDecodeFailed:
    return ImageDecodeFailed(f"{Path(path).name}: not a readable image ({exc}); accepted: {ACCEPTED_IMAGES}")


def exif_orientation(image: Image.Image) -> int:
    """The EXIF Orientation tag (1..8), 1 when absent or out of range."""
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    """float grey on the 0..255 scale -> RGB, rounded and clipped."""
    levels = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(levels[..., None], 3, axis=2))


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or (image.mode in ("P", "L", "RGB") and "transparency" in image.info)


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode as 8-bit RGB at its own scale: 16-bit grey (I;16*, I) / 257; float grey F in 0..1
    (0..255 when its values exceed 1, Pillow's own scale); transparency (alpha, a palette's or a key colour)
    composited on `background`; every other mode (1, L, P, CMYK, YCbCr, LAB, HSV) by Pillow's conversion."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _WIDE_GREY:
        return _grey_to_rgb(np.asarray(image, dtype=np.float64) / 257.0)
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        return _grey_to_rgb(values * 255.0 if values.max(initial=0.0) <= 1.0 else values)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return image.convert("RGB")


@contextmanager
def _quiet_bomb_check() -> Iterator[None]:
    """PIL warns of pictures over 89 MP at open; `check_pixels` refuses them itself, with our message."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def image_size(path: Path, orientation: ImageOrientation = "exif") -> tuple[int, int]:
    """(width, height) as shown (`orientation`), from the header alone, checked against MAX_IMAGE_PIXELS."""
    register_image_plugins()
    try:
        with _quiet_bomb_check(), Image.open(path) as img:
            width, height = img.size
            # first: a PNG's EXIF may follow its pixel data, and Pillow decodes the picture to read it
            check_pixels(width, height, Path(path).name)
            turned = check_orientation(orientation) == "exif" and exif_orientation(img) >= 5
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _unreadable(path, exc) from exc
    return (height, width) if turned else (width, height)


def load_image(
    path: Path, *, orientation: ImageOrientation = "exif", background: str = DEFAULT_BACKGROUND
) -> LoadedImage:
    """Open an image (ACCEPTED_IMAGES) as RGB as a viewer shows it (module docstring); `orientation`
    "stored" ignores EXIF as the reference does. The size in the header is checked first (`check_pixels`),
    so no array of an oversized picture is ever made."""
    check_orientation(orientation)
    colour = parse_background(background)
    register_image_plugins()
    try:
        with _quiet_bomb_check():
            img = Image.open(path)
        try:
            check_pixels(img.width, img.height, Path(path).name)
            img.load()  # a single-frame file is closed once loaded
            tag, mode, alpha = exif_orientation(img), img.mode, _has_alpha(img)
            shown = ImageOps.exif_transpose(img) if orientation == "exif" and tag != 1 else img
            rgb = to_rgb(shown, colour)
        except BaseException:
            img.close()
            raise
        if rgb is not img:  # an upright RGB file is used as it is: one full-size array, not two
            img.close()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _unreadable(path, exc) from exc
    return LoadedImage(rgb, mode, orientation, tag, background.lower() if alpha else None)


def choose_bucket(src_h: int, src_w: int, resolution: str) -> tuple[int, int]:
    """First key in table order minimising |key - src_h/src_w| (spec 3.1)."""
    try:
        table = BUCKET_TABLES[resolution]
    except KeyError:
        raise InvalidInput(
            f"resolution {resolution!r} is not accepted; use one of {list(BUCKET_TABLES)}"
        ) from None
    ratio = src_h / src_w
    key = min(table, key=lambda k: abs(float(k) - ratio))
    return table[key]


def _scaled_size(src_h: int, src_w: int, target: tuple[int, int]) -> tuple[int, int]:
    """`ceil(scale * side)` with `scale = max(H/src_h, W/src_w)` in double precision (spec 3.2)."""
    scale = max(target[0] / src_h, target[1] / src_w)
    return math.ceil(scale * src_h), math.ceil(scale * src_w)


def _centre_crop(array: torch.Tensor, target: tuple[int, int]) -> torch.Tensor:
    """Crop the last two axes to `target`; offsets `round((size - target) / 2)` (half to even)."""
    height, width = array.shape[-2:]
    top = int(round((height - target[0]) / 2.0))
    left = int(round((width - target[1]) / 2.0))
    return array[..., top : top + target[0], left : left + target[1]]


def prepare_image(image: Image.Image, resolution: str) -> ConditionImage:
    """Bucket, PIL bilinear resize, centre crop, map to [-1, 1] -> [1, 3, 1, H, W] float32."""
    src_h, src_w = image.height, image.width
    bucket = choose_bucket(src_h, src_w, resolution)
    new_h, new_w = _scaled_size(src_h, src_w, bucket)
    resized = np.asarray(image.resize((new_w, new_h), resample=Image.Resampling.BILINEAR))
    pixels = _centre_crop(torch.from_numpy(resized.copy()).permute(2, 0, 1), bucket)  # [3, H, W] uint8
    pixels = pixels[None, :, None].float() / 255
    return ConditionImage(pixels=(pixels - 0.5) * 2, source_size=(src_h, src_w), bucket=bucket)


def default_bbox(side: str, src_h: int, src_w: int, margin: float = FACE_MARGIN) -> PixelBox:
    """The reference's default mask of the left or right person (spec 3.5), in pixels; `margin` is its
    `face_scale` (MultiTalk's 0.05; LongCat's multi script uses 0.1)."""
    half = src_w // 2
    r0, r1 = int(src_h * margin), int(src_h * (1 - margin))
    c0, c1 = int(half * margin), int(half * (1 - margin))
    if side == "right":
        c0, c1 = int(half * margin + half), int(half * (1 - margin) + half)
    return r0, c0, r1, c1


def region_to_bbox(region: Region, src_h: int, src_w: int, margin: float = FACE_MARGIN) -> PixelBox:
    """Our `[x0, y0, x1, y1]` (normalised, x right, y down) or shorthand -> the reference's row-first box."""
    if region in ("left", "right"):
        return default_bbox(str(region), src_h, src_w, margin)
    if region == "full":
        return 0, 0, src_h, src_w
    if isinstance(region, str) or len(region) != 4:
        raise InvalidInput(
            f"region {region!r} is not accepted; use [x0, y0, x1, y1] in 0..1, 'left', 'right' or 'full'"
        )
    x0, y0, x1, y1 = (float(v) for v in region)
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)) or not (x0 < x1 and y0 < y1):
        raise InvalidInput(
            f"region {list(region)} is not accepted; need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 "
            "(x to the right, y down, as fractions of the image)"
        )
    return int(y0 * src_h), int(x0 * src_w), int(y1 * src_h), int(x1 * src_w)


def _describe(region: Region | None) -> str:
    return region if isinstance(region, str) else "[" + ", ".join(f"{float(v):g}" for v in region or ()) + "]"


def _overlap(a: PixelBox, b: PixelBox) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def person_boxes(
    regions: list[Region | None], src_h: int, src_w: int, margin: float = FACE_MARGIN
) -> list[PixelBox] | None:
    """Pixel boxes of two persons (defaults: left and right halves, `margin` inside); None for one person."""
    if len(regions) == 1:
        if regions[0] is not None:
            raise InvalidInput("a region only applies with two speakers; omit it for a single speaker")
        return None
    given: list[Region] = [r for r in regions if r is not None]
    if not given:
        given = ["left", "right"]
    elif len(given) != len(regions):
        raise InvalidInput("give a region for both speakers or for neither")
    boxes = [region_to_bbox(r, src_h, src_w, margin) for r in given]
    for person, box in enumerate(boxes, start=1):
        if box[2] <= box[0] or box[3] <= box[1]:
            raise InvalidInput(f"region of speaker {person} covers no pixel of the {src_w}x{src_h} image")
    if _overlap(boxes[0], boxes[1]):
        raise InvalidInput(
            f"the regions of the two speakers overlap ({_describe(regions[0])} and {_describe(regions[1])}); "
            "give each speaker its own part of the image"
        )
    return boxes


def _nearest_index(size: int, out: int) -> torch.Tensor:
    """The source index each of `out` outputs takes under torch's `nearest` resize of `size` (exactly
    torch's rule and float arithmetic: a 1-D resize of the index ramp)."""
    ramp = torch.arange(size, dtype=torch.float32)[None, None]  # exact below 2**24
    return F.interpolate(ramp, size=out, mode="nearest")[0, 0].long()


def _bucket_axes(source_size: tuple[int, int], bucket: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row and column of the bucket: the source row / column that resize + centre crop keep."""
    scaled = _scaled_size(*source_size, bucket)
    rows = _nearest_index(source_size[0], scaled[0])
    cols = _nearest_index(source_size[1], scaled[1])
    return _centre_crop(rows[None], (1, bucket[0]))[0], _centre_crop(cols[None], (1, bucket[1]))[0]


def person_masks(
    boxes: list[PixelBox] | None,
    source_size: tuple[int, int],
    bucket: tuple[int, int],
    latent: tuple[int, int],
) -> torch.Tensor:
    """Spec 3.5: [person1, person2, background] at source size -> nearest resize + crop -> latent grid.

    Returns float32 [3, h, w] of 0/1. One person (`boxes` None): three all-ones maps. Built at the bucket's
    size: a box is separable, so each bucket pixel's value is read through the source row and column
    the nearest resize picks (identical to drawing at source size, which costs 12 bytes a source pixel).
    """
    if boxes is None:
        return torch.ones(3, *latent)
    rows, cols = _bucket_axes(source_size, bucket)
    masks = torch.zeros(3, *bucket)
    for index, (r0, c0, r1, c1) in enumerate(boxes):
        inside_rows = (rows >= r0) & (rows < r1)
        inside_cols = (cols >= c0) & (cols < c1)
        masks[index] = (inside_rows[:, None] & inside_cols[None, :]).float()
    masks[2] = (masks[:2].sum(0) == 0).float()
    return (F.interpolate(masks[None], size=latent, mode="nearest")[0] > 0).float()


def check_masks_visible(masks: torch.Tensor, persons: int) -> None:
    """Each person mask must keep a cell on the DiT token grid (half the latent grid), or the model's
    per-person attention average divides by zero."""
    tokens = (masks.shape[1] // 2, masks.shape[2] // 2)
    grid = F.interpolate(masks[None], size=tokens, mode="nearest")[0] > 0
    for person in range(persons if persons > 1 else 0):
        if not grid[person].any():
            raise InvalidInput(
                f"region of speaker {person + 1} is too small: it covers no cell of the model's "
                f"{tokens[1]}x{tokens[0]} token grid; make it larger"
            )
