"""Non-square images end to end: `--image-size N` or `HxW` (height x width), the H x W centre
crop, and a non-square model through every script: train.py -> checkpoint -> sample.py (PNG of
H x W) -> sample_ddp.py (npz of exactly N x H x W x 3), in pixel space (8x16) and through the
tiny VAE (extract_features.py on non-square photos at 16x32 -> train from the features ->
sample_ddp.py). Also: sampling at another size than the training size (a sine-cosine model
warns, a RoPE model does not), and square runs recording exactly what they always did.
"""
import argparse
import glob
import os

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import data
import extract_features
import sample
import sample_ddp
import tiny_dit
import tiny_vae
import train
from conftest import EXPERIMENT, MODEL, run_main, write_images

tiny_dit.register()


# ------------------------------------------------------------------ the flag
@pytest.mark.parametrize("text, size", [("256", 256), ("256x384", [256, 384]), ("384x256", [384, 256]),
                                        ("64X64", 64), (" 8x16 ", [8, 16])])
def test_image_size_parses_n_and_height_by_width(text, size):
    assert cli.image_size(text) == size
    assert cli.height_width(size) == ((size, size) if isinstance(size, int) else tuple(size))
    assert cli.image_size(cli.size_text(size)) == size


@pytest.mark.parametrize("text", ["256x", "x384", "abc", "256x384x3", "0", "0x8", "8x0", "-8", "2.5", "256*384", ""])
def test_bad_image_sizes_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="image size|at least 1"):
        cli.image_size(text)


@pytest.mark.parametrize("script", [train.main, sample.main, sample_ddp.main, extract_features.main])
def test_bad_image_size_is_one_clear_line_in_every_script(script, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: script(["--image-size", "256x"]))
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert e.value.code == 2 and len(errors) == 1, errors
    assert "--image-size" in errors[0] and "height x width" in errors[0] and "256x384" in errors[0], errors[0]


def test_latent_sizes_must_divide_by_eight(tmp_path, capsys):
    err = run_main(["--model", MODEL, "--image-size", "256x260", "--data-path", str(tmp_path)], capsys)
    assert err.startswith("error: --image-size 256x260 is not divisible by 8") and err.count("\n") == 1, err


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


# ------------------------------------------------------------------ end to end in pixel space
def write_photos(folder, height, width, mode="L"):
    """Non-square photos (not the target's shape), so the crop has work to do."""
    return write_images(folder, per_class=4, classes=2, size=(height, width), mode=mode, seed=3)


def train_pixels(photos, results, size, *extra):
    argv = ["--model", MODEL, "--vae", "none", "--in-channels", "1", "--image-size", size, "--num-classes", "2",
            "--data-path", str(photos), "--results-dir", str(results), "--global-batch-size", "4", "--max-steps", "2",
            "--log-every", "1", "--ckpt-every", "100", "--cpu-threads", "1", *extra]
    assert run_main(argv) is None
    return os.path.join(results, EXPERIMENT, "checkpoints", "0000002.pt")


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    photos = write_photos(root / "photos", 12, 20)
    return root, train_pixels(photos, root / "results", "8x16")


def test_non_square_checkpoint_records_its_size(pixel_run):
    _, ckpt_path = pixel_run
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["model_args"]["input_size"] == [8, 16] and ckpt["args"]["image_size"] == [8, 16]


def test_sample_py_needs_no_flags_for_a_non_square_checkpoint(pixel_run, tmp_path, capsys):
    _, ckpt = pixel_run
    images = sample.main(["--ckpt", ckpt, "--num-sampling-steps", "3", "--class-labels", "0", "1",
                          "--output", str(tmp_path / "grid.png"), "--save-individual"])
    assert images.shape == (2, 8, 16, 1)
    assert Image.open(tmp_path / "grid-000.png").size == (16, 8)  # 8 high, 16 wide
    assert "warning" not in capsys.readouterr().err


def test_sample_ddp_npz_is_n_by_h_by_w(pixel_run, tmp_path):
    _, ckpt = pixel_run
    npz = sample_ddp.main(["--ckpt", ckpt, "--device", "cpu", "--num-fid-samples", "5", "--per-proc-batch-size", "2",
                           "--num-sampling-steps", "3", "--sample-dir", str(tmp_path)])
    assert "-size-8x16-" in os.path.basename(npz)
    arrays = np.load(npz)
    assert arrays["arr_0"].shape == (5, 8, 16, 3) and arrays["arr_0"].dtype == np.uint8
    assert arrays["arr_1"].shape == (5,)
    # A restart into the same folder (the settings, with their [8, 16], read back from JSON) completes it.
    os.remove(glob.glob(os.path.join(npz[:-len(".npz")], "000003.png"))[0])
    assert np.load(sample_ddp.main(["--ckpt", ckpt, "--device", "cpu", "--num-fid-samples", "5",
                                    "--per-proc-batch-size", "2", "--num-sampling-steps", "3",
                                    "--sample-dir", str(tmp_path)]))["arr_0"].shape == (5, 8, 16, 3)


def test_sincos_model_at_another_size_warns_in_one_line(pixel_run, tmp_path, capsys):
    _, ckpt = pixel_run
    images = sample.main(["--ckpt", ckpt, "--image-size", "16x8", "--num-sampling-steps", "2", "--class-labels", "0",
                          "--output", str(tmp_path / "x.png")])
    assert images.shape == (1, 16, 8, 1)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "8x16 px" in warnings[0] and "16x8 px" in warnings[0], warnings


def test_rope_model_samples_at_other_sizes_without_warning(pixel_run, tmp_path, capsys):
    root, _ = pixel_run
    ckpt = train_pixels(root / "photos", tmp_path / "results", "8", "--pos", "rope")
    assert torch.load(ckpt, weights_only=True)["model_args"]["pos"] == "rope"
    capsys.readouterr()
    for size, shape in (("8x16", (1, 8, 16, 1)), ("12", (1, 12, 12, 1))):
        images = sample.main(["--ckpt", ckpt, "--image-size", size, "--num-sampling-steps", "2", "--class-labels",
                              "1", "--output", str(tmp_path / "x.png")])
        assert images.shape == shape and images.std() > 0
    assert "warning" not in capsys.readouterr().err


def test_square_runs_record_what_they_always_did(pixel_run, tmp_path):
    root, _ = pixel_run
    ckpt = torch.load(train_pixels(root / "photos", tmp_path / "a", "8x8"), weights_only=True)
    assert ckpt["args"]["image_size"] == 8 and ckpt["args"]["input_size"] == 8
    assert ckpt["model_args"]["input_size"] == 8
    same = torch.load(train_pixels(root / "photos", tmp_path / "b", "8"), weights_only=True)
    for name, value in ckpt["ema"].items():
        assert torch.equal(value, same["ema"][name]), name


# ------------------------------------------------------------------ end to end through the tiny VAE
@pytest.mark.slow
def test_latent_non_square_extract_train_sample(tmp_path):
    photos = write_photos(tmp_path / "photos", 40, 50, mode="RGB")  # cropped to 16 high x 32 wide
    vae_path = tiny_vae.save_tiny_vae(tmp_path / "vae")
    features = tmp_path / "features"
    extract_features.main(["--data-path", str(photos), "--feature-path", str(features), "--image-size", "16x32",
                           "--vae-path", vae_path, "--num-workers", "0", "--dtype", "float32"])
    meta = data.FeatureShards.read_meta(str(features))
    assert meta["image_size"] == [16, 32] and meta["latent_shape"] == [4, 2, 4]

    assert run_main(["--model", MODEL, "--feature-path", str(features), "--num-classes", "2", "--results-dir",
                     str(tmp_path / "results"), "--global-batch-size", "4", "--max-steps", "2", "--log-every", "1",
                     "--ckpt-every", "100", "--cpu-threads", "1"]) is None
    ckpt = os.path.join(tmp_path, "results", EXPERIMENT, "checkpoints", "0000002.pt")
    saved = torch.load(ckpt, weights_only=True)
    assert saved["model_args"]["input_size"] == [2, 4] and saved["args"]["image_size"] == [16, 32]

    npz = sample_ddp.main(["--ckpt", ckpt, "--device", "cpu", "--num-fid-samples", "3", "--per-proc-batch-size", "2",
                           "--num-sampling-steps", "2", "--sample-dir", str(tmp_path / "samples")])
    assert np.load(npz)["arr_0"].shape == (3, 16, 32, 3)
