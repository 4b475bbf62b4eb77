"""data.py: the ADM centre crop (square bit for bit with the reference, H x W covering then centred)
and the resumable sampler's split and skip."""

import numpy as np
import pytest
from PIL import Image

import data
import tiny_dit

tiny_dit.register()


# ------------------------------------------------------------------ the crop
def reference_adm_crop(image, image_size):
    """The reference repo's center_crop_arr (square only), restated on PIL images."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


@pytest.mark.parametrize("height, width, size", [(400, 600, 100), (333, 250, 64), (50, 80, 64), (97, 97, 32),
                                                 (1000, 130, 64)])
def test_square_crop_is_the_reference_bit_for_bit(height, width, size):
    image = Image.fromarray(np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8))
    np.testing.assert_array_equal(np.asarray(data.adm_center_crop(image, size)), reference_adm_crop(image, size))
    np.testing.assert_array_equal(np.asarray(data.adm_center_crop(image, [size, size])),
                                  reference_adm_crop(image, size))


def test_height_by_width_crop_covers_then_takes_the_centre():
    rng = np.random.default_rng(0)
    square = rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)
    # 100x100 already covers 50 high x 100 wide: no resize, the middle 50 rows.
    out = data.adm_center_crop(Image.fromarray(square), [50, 100])
    np.testing.assert_array_equal(np.asarray(out), square[25:75])
    tall = data.adm_center_crop(Image.fromarray(square), [100, 50])
    np.testing.assert_array_equal(np.asarray(tall), square[:, 25:75])
    # 400 high x 800 wide to 100 x 200: two box halvings (4x4 block means), nothing cut.
    wide = rng.integers(0, 256, (400, 800), dtype=np.uint8)
    halved = np.asarray(data.adm_center_crop(Image.fromarray(wide), [100, 200]), dtype=np.float64)
    np.testing.assert_allclose(halved, wide.reshape(100, 4, 200, 4).mean(axis=(1, 3)), atol=2)  # PIL rounds each halving
    # A small image is enlarged until it covers the target, whichever side is short.
    assert data.adm_center_crop(Image.fromarray(wide[:20, :30]), [16, 48]).size == (48, 16)  # PIL: (w, h)


def test_adm_center_crop_matches_box_halving_and_centre():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (400, 600, 3), dtype=np.uint8))  # 600 wide, 400 high
    out = data.adm_center_crop(image, 100)
    # 400 -> 200 -> 100 by two box halvings (4x4 block means, up to rounding), then the centre 100 columns.
    blocks = np.asarray(image, dtype=np.float64).reshape(100, 4, 150, 4, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(np.asarray(out, dtype=np.float64), blocks[:, 25:125], atol=2)
    small = data.adm_center_crop(Image.fromarray(rng.integers(0, 256, (50, 80), dtype=np.uint8)), 64)
    assert small.size == (64, 64)  # upscaled by bicubic, then cropped


def test_sampler_split_and_skip():
    dataset = list(range(20))
    full = list(data.ResumableSampler(dataset, 1, 0, seed=3))
    halves = [list(data.ResumableSampler(dataset, 2, r, seed=3)) for r in range(2)]
    for k in range(2):  # global batch k of 8 is the same set of images on one or two processes
        assert sorted(halves[0][4 * k:4 * k + 4] + halves[1][4 * k:4 * k + 4]) == sorted(full[8 * k:8 * k + 8])
    resumed = data.ResumableSampler(dataset, 2, 1, seed=3)
    resumed.set_epoch(0, skip=4)
    assert list(resumed) == halves[1][4:] and len(resumed) == 6
    resumed.set_epoch(1)
    assert list(resumed) != halves[1]  # a new permutation each epoch
