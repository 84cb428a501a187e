"""LongCat-Video-Avatar's bucket tables and resize (pipeline/longcat_image.py; spec §6.1, §6.2). Their parity
with the checkout's get_condition_shape and VaeImageProcessor is tests/test_parity_longcat.py's."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from multitalk_worker.errors import InvalidInput
from multitalk_worker.pipeline.longcat_image import (
    LONGCAT_480P,
    longcat_bucket,
    longcat_person_masks,
    prepare_longcat_image,
    resize_to_bucket,
)


@pytest.mark.parametrize(
    ("size", "resolution", "bucket"),
    [
        ((1241, 799), "480p", (512, 768)),  # ratio 0.6438 (spec: man.png) -> 0.67
        ((1280, 720), "480p", (480, 832)),  # 0.5625 -> 0.58 (MultiTalk's table: 448 x 896)
        ((1024, 1024), "480p", (608, 640)),  # 1.0 -> 0.95, the first of the two nearest keys
        ((1280, 720), "720p", (704, 1312)),
        ((720, 1280), "720p", (1248, 736)),
    ],
)
def test_bucket_is_the_closest_key(size: tuple[int, int], resolution: str, bucket: tuple[int, int]) -> None:
    assert longcat_bucket(size[1], size[0], resolution) == bucket


def test_tie_goes_to_the_first_key() -> None:
    """1.0 lies 0.05 from both 0.95 and 1.05: the table's first wins, as the reference's stable sort."""
    assert longcat_bucket(100, 100, "480p") == LONGCAT_480P["0.95"]


def test_unknown_resolution_is_refused() -> None:
    with pytest.raises(InvalidInput, match="480p"):
        longcat_bucket(480, 832, "1080p")


def test_cover_and_paste_geometry() -> None:
    """A 1280x720 picture to 480x832: scaled to 853x480 (floor division), pasted at x = 416 − 426 = −10, so
    columns 10...841 of the scaled picture are kept; a picture at its bucket is unchanged."""
    stripes = np.zeros((720, 1280, 3), dtype=np.uint8)
    stripes[:, 640:] = 255  # the right half white
    out = resize_to_bucket(Image.fromarray(stripes), (480, 832))
    assert out.shape == (480, 832, 3)
    edge = int(np.argmax(out[240, :, 0] > 127))
    assert edge == 853 // 2 - 10  # the edge sits at x = 426 of the scaled picture, 10 columns cropped
    same = (np.arange(48 * 64 * 3) % 256).astype(np.uint8).reshape(48, 64, 3)
    assert np.array_equal(resize_to_bucket(Image.fromarray(same), (48, 64)), same)


def test_pixels_are_2x_minus_1() -> None:
    same = (np.arange(48 * 64 * 3) % 256).astype(np.uint8).reshape(48, 64, 3)
    prepared = prepare_longcat_image(Image.fromarray(same), "tiny")
    assert prepared.bucket == (48, 64) and prepared.pixels.shape == (1, 3, 1, 48, 64)
    expected = 2.0 * (same.astype(np.float32) / 255.0) - 1.0
    assert np.array_equal(prepared.pixels[0, :, 0].permute(1, 2, 0).numpy(), expected)


def test_person_masks_follow_the_bilinear_cover_and_crop() -> None:
    """A 720x1280 source to 480x832 (scaled by 2/3 to 480x853, 10 columns cropped): each box lands where the
    geometry puts it, the background between them, every pixel in at least one class (the exact values are
    the checkout's: tests/test_parity_longcat.py)."""
    boxes = [(0, 0, 720, 600), (0, 660, 720, 1280)]  # columns 600-659 are background only
    masks = longcat_person_masks(boxes, (720, 1280), (480, 832))
    assert masks.shape == (3, 480, 832) and set(masks.unique().tolist()) <= {0.0, 1.0}
    row = masks[:, 240]
    # box 1 ends at source column 600 = scaled 400 -> bucket column 390
    last_left = int(row[0].nonzero().max())
    first_right = int(row[1].nonzero().min())
    assert 389 <= last_left <= 391 and 429 <= first_right <= 431
    gap = row[2].nonzero().flatten()
    assert gap.min() <= last_left + 1 and gap.max() >= first_right - 1 and (row.sum(0) >= 1).all()
    assert not row[2, :380].any() and not row[2, 440:].any()


def test_default_boxes_use_the_multi_scripts_margin() -> None:
    """Without regions LongCat's multi script frames each half with `face_scale` 0.1 (MultiTalk: 0.05)."""
    from multitalk_worker.pipeline.image import person_boxes
    from multitalk_worker.pipeline.longcat_image import FACE_MARGIN

    assert person_boxes([None, None], 720, 1280, margin=FACE_MARGIN) == [
        (72, 64, 648, 576),
        (72, 704, 648, 1216),
    ]
