"""LongCat-Video-Avatar's own bucket tables and image resize (spec longcat-avatar-inference.md §6.1, §6.2).

LongCat does not share MultiTalk's image path: on one GPU its pipeline picks the bucket from
`ASPECT_RATIO_627` (480p) or `ASPECT_RATIO_960` (720p) (the closest key to H/W, ties to the first in table
order), and diffusers' `VaeImageProcessor` (resize mode `crop`) scales the image to cover the bucket with
integer floor division, resamples it with LANCZOS, pastes it centred on a black canvas (negative offsets crop)
and maps `x/255` to `2x − 1`. The same path serves a video source's frames (already bucket-sized for our
continuations: the resize is then the identity). tools/parity.py compares both against the checkout.

Person masks (spec §6.5): the reference draws the two boxes and the background at the source size, resizes
them bilinearly (align_corners false) to the size that covers the bucket (`int()` of the float product) and
crops `(new − target) // 2`; the DiT then tests each token's top-left value `> 0`. `longcat_person_masks`
gives that `> 0` map at the bucket without the source-size tensors (12 bytes a source pixel): bilinear
reads at most two source rows and two columns per output pixel, with the weights torch computes (taken
from interpolating an identity matrix), so a box's output is non-zero iff a read row and a read column lie
in it, and the background's iff the read pixels are not all inside the boxes (counted exactly).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from multitalk_worker.errors import InvalidInput
from multitalk_worker.pipeline.image import BUCKETS_TINY, ConditionImage

FACE_MARGIN = 0.1  # the multi script's `face_scale`: the default two-person boxes' margin (MultiTalk: 0.05)

# Keys are height/width ratios as the reference writes them; values are (H, W) in pixels (spec §6.1).
LONGCAT_480P: dict[str, tuple[int, int]] = {
    "0.26": (320, 1216), "0.31": (352, 1120), "0.38": (384, 1024), "0.43": (416, 960), "0.52": (448, 864),
    "0.58": (480, 832), "0.67": (512, 768), "0.74": (544, 736), "0.86": (576, 672), "0.95": (608, 640),
    "1.05": (640, 608), "1.17": (672, 576), "1.29": (704, 544), "1.35": (736, 544), "1.50": (768, 512),
    "1.67": (800, 480), "1.73": (832, 480), "2.00": (896, 448), "2.31": (960, 416), "2.58": (992, 384),
    "2.75": (1056, 384), "3.09": (1088, 352), "3.70": (1184, 320), "3.80": (1216, 320), "3.90": (1248, 320),
    "4.00": (1280, 320),
}  # fmt: skip
LONGCAT_720P: dict[str, tuple[int, int]] = {
    "0.25": (480, 1920), "0.29": (512, 1792), "0.32": (544, 1696), "0.36": (576, 1600), "0.40": (608, 1504),
    "0.49": (672, 1376), "0.54": (704, 1312), "0.59": (736, 1248), "0.69": (800, 1152), "0.74": (832, 1120),
    "0.82": (864, 1056), "0.88": (896, 1024), "0.94": (928, 992), "1.00": (960, 960), "1.07": (992, 928),
    "1.14": (1024, 896), "1.22": (1056, 864), "1.31": (1088, 832), "1.35": (1120, 832), "1.44": (1152, 800),
    "1.70": (1248, 736), "2.00": (1344, 672), "2.05": (1376, 672), "2.47": (1504, 608), "2.53": (1536, 608),
    "2.83": (1632, 576), "3.06": (1664, 544), "3.12": (1696, 544), "3.62": (1856, 512), "3.93": (1888, 480),
    "4.00": (1920, 480),
}  # fmt: skip
LONGCAT_BUCKETS: dict[str, dict[str, tuple[int, int]]] = {
    "480p": LONGCAT_480P,
    "720p": LONGCAT_720P,
    "tiny": BUCKETS_TINY,  # the built-in tiny model's (not a reference table)
}


def longcat_bucket(src_h: int, src_w: int, resolution: str) -> tuple[int, int]:
    """The bucket (H, W) of a `src_h x src_w` picture: the first key in table order closest to H/W."""
    table = LONGCAT_BUCKETS.get(resolution)
    if table is None:
        raise InvalidInput(f"resolution {resolution!r} is not accepted; use one of {list(LONGCAT_BUCKETS)}")
    ratio = src_h / src_w
    return table[min(table, key=lambda key: abs(float(key) - ratio))]


def resize_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> np.ndarray:
    """Cover the bucket (floor division), LANCZOS, paste centred on black: uint8 [H, W, 3] (spec §6.2)."""
    height, width = bucket
    if width / height < image.width / image.height:
        size = (image.width * height // image.height, height)
    else:
        size = (width, image.height * width // image.width)
    resized = image.convert("RGB").resize(size, resample=Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(resized, (width // 2 - size[0] // 2, height // 2 - size[1] // 2))
    return np.asarray(canvas)


def prepare_longcat_image(image: Image.Image, resolution: str) -> ConditionImage:
    """The conditioning image at its LongCat bucket: float32 [1, 3, 1, H, W] in [-1, 1]."""
    bucket = longcat_bucket(image.height, image.width, resolution)
    pixels = torch.from_numpy(resize_to_bucket(image, bucket).astype(np.float32) / 255.0)
    pixels = pixels.permute(2, 0, 1)[None, :, None]
    return ConditionImage(pixels=2.0 * pixels - 1.0, source_size=(image.height, image.width), bucket=bucket)


_CHUNK = 512  # one-hot source signals interpolated at a time


def _reads(source: int, covered: int, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For output indices `first...first+count` of a bilinear resize `source -> covered`: the lowest and the
    highest source index it reads with a positive weight (int64 [count] each; equal when it reads one).
    The weights are torch's own: one-hot source signals interpolated, a chunk of them at a time."""
    low = torch.full((count,), source, dtype=torch.int64)
    high = torch.full((count,), -1, dtype=torch.int64)
    for start in range(0, source, _CHUNK):
        k = min(_CHUNK, source - start)
        signals = torch.zeros(k, source)
        signals[torch.arange(k), torch.arange(start, start + k)] = 1
        weights = F.interpolate(signals[None], size=covered, mode="linear", align_corners=False)[0]
        read = weights[:, first : first + count] > 0  # [k, count]
        index = torch.arange(start, start + read.shape[0])[:, None].expand_as(read)
        low = torch.minimum(low, torch.where(read, index, source).min(0).values)
        high = torch.maximum(high, torch.where(read, index, -1).max(0).values)
    return low, high


def _count(inside: torch.Tensor, reads: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Source indices read per output index that lie where `inside` (0/1 float [source]) is 1."""
    low, high = reads
    return inside[low] + torch.where(high != low, inside[high], 0.0)


def longcat_person_masks(
    boxes: list[tuple[int, int, int, int]], source_size: tuple[int, int], bucket: tuple[int, int]
) -> torch.Tensor:
    """[person 1, person 2, background] at the bucket, float32 0/1: the reference's bilinear cover-and-crop
    of its source-size masks, `> 0` (module docstring). `boxes`: two (r0, c0, r1, c1), end-exclusive."""
    src_h, src_w = source_size
    height, width = bucket
    if width / height > src_w / src_h:
        covered = (int(src_h * width / src_w), width)
    else:
        covered = (height, int(src_w * height / src_h))
    rows = _reads(src_h, covered[0], (covered[0] - height) // 2, height)
    cols = _reads(src_w, covered[1], (covered[1] - width) // 2, width)

    def read_inside(r0: int, c0: int, r1: int, c1: int) -> torch.Tensor:
        """[H, W]: source pixels read by each output pixel that lie in the box."""
        r_in, c_in = torch.zeros(src_h), torch.zeros(src_w)
        r_in[max(r0, 0) : max(r1, 0)] = 1
        c_in[max(c0, 0) : max(c1, 0)] = 1
        return _count(r_in, rows)[:, None] * _count(c_in, cols)[None, :]

    (r0, c0, r1, c1), (s0, d0, s1, d1) = boxes[0], boxes[1]
    first, second = read_inside(r0, c0, r1, c1), read_inside(s0, d0, s1, d1)
    overlap = read_inside(max(r0, s0), max(c0, d0), min(r1, s1), min(c1, d1))
    total = read_inside(0, 0, src_h, src_w)
    masks = torch.stack([first > 0, second > 0, total - (first + second - overlap) > 0])
    return masks.float()
