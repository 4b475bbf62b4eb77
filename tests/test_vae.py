"""vae.py: where the VAE comes from, latent sampling, chunked decoding, its precision, and --vae-tiling
(reaching the VAE in sample.py, sample_ddp.py and extract_features.py, off by default; a tiled
decode close to the untiled one).

How close: the tiny test VAE has random weights, so each tile's decoder sees zero padding and
its own GroupNorm statistics where the full decode sees the neighbours; diffusers blends the
seams linearly over a quarter of a tile. With 128 px tiles on a 192 px image the tiled decode's
RMS difference from the untiled one measured 0.14 to 0.18 of the image's standard deviation
(four seeds; the test allows 0.3), and the blend leaves no jump at the seam (row-to-row change
at most 1.25x the image's average there, 2 to 2.7x with the blending switched off; the test
allows 1.6x). That bounds tiling on this tiny VAE only: it says nothing about the trained
Stable Diffusion VAE's seams, which no test here can download.
"""

import argparse
import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cli
import extract_features
import sample
import sample_ddp
import tiny_dit
import tiny_vae
import train
import vae as vae_lib
from conftest import write_images

tiny_dit.register()


# ------------------------------------------------------------------ part 8: --vae-precision
def test_vae_precision_reaches_the_encoder_and_fp32_is_todays(tmp_path):
    vae = tiny_vae.make_tiny_vae()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    flip = torch.tensor([False, True, False, True])
    noise = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    latents = {}
    for precision in ("fp32", "bf16"):
        run = SimpleNamespace(device=torch.device("cpu"),
                              args=argparse.Namespace(feature_path=None, vae_precision=precision))
        latents[precision], _ = train.model_input(run, (images, torch.zeros(4, dtype=torch.long)), flip, noise, vae)
    x = images.float() / 127.5 - 1
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    mean, std = vae.encode(x).latent_dist.mean, vae.encode(x).latent_dist.std
    assert torch.equal(latents["fp32"], vae_lib.sample_latents(mean, std, noise=noise))  # the release's, exactly
    error = (latents["bf16"] - latents["fp32"]).pow(2).mean().sqrt() / latents["fp32"].pow(2).mean().sqrt()
    assert 0 < error < 0.05  # bf16's rounding (8 bits of mantissa), not another computation
    assert train.parse_args([]).vae_precision == "fp32"


def test_vae_source_hub_names_and_local_folders(tmp_path):
    assert vae_lib.vae_source("ema") == "stabilityai/sd-vae-ft-ema"
    assert vae_lib.vae_source("mse") == "stabilityai/sd-vae-ft-mse"
    assert vae_lib.vae_source("mse", vae_path=str(tmp_path)) == str(tmp_path)  # --vae-path wins
    assert vae_lib.vae_source("ema", vae_path="") == "stabilityai/sd-vae-ft-ema"  # an empty --vae-path is unset


def test_vae_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--vae-path .* is not a folder"):
        vae_lib.vae_source("ema", vae_path=str(tmp_path / "missing"))
    a_file = tmp_path / "config.json"
    a_file.write_text("{}")
    for bad in ("none", "xl", str(a_file), str(tmp_path), None):  # a local folder goes to --vae-path
        with pytest.raises(cli.UserError, match="is not one of ema, mse .*; pass a local diffusers folder with "
                                                "--vae-path"):
            vae_lib.vae_source(bad)


def test_sample_latents_arithmetic():
    mean = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    std = torch.tensor([[0.5, 1.0], [2.0, 0.0]])
    noise = torch.tensor([[2.0, -1.0], [0.5, 7.0]])
    expected = torch.tensor([[2.0, -3.0], [1.0, 3.0]]) * 0.18215
    assert torch.allclose(vae_lib.sample_latents(mean, std, noise=noise), expected)
    assert vae_lib.LATENT_SCALE == 0.18215


def test_sample_latents_draws_from_the_generator():
    mean, std = torch.randn(2, 4, 3, 3), torch.rand(2, 4, 3, 3)
    drawn = vae_lib.sample_latents(mean, std, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(drawn, (mean + std * noise) * vae_lib.LATENT_SCALE)
    other = vae_lib.sample_latents(mean, std, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(drawn, other)


def test_decode_in_chunks_equals_one_decode():
    import tiny_vae

    model = tiny_vae.make_tiny_vae()
    latents = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    whole = model.decode(latents / vae_lib.LATENT_SCALE).sample
    chunked = vae_lib.decode(model, latents, chunk_size=2)  # chunks of 2, 2 and 1
    assert chunked.shape == (5, 3, 32, 32) and chunked.dtype == torch.float32
    assert torch.allclose(chunked, whole, atol=1e-5)
    assert torch.allclose(vae_lib.decode(model, latents, chunk_size=64), whole, atol=1e-5)


@pytest.fixture
def spy(monkeypatch):
    """Records use_tiling of every VAE the scripts load."""
    seen = []
    real = vae_lib.load_vae

    def load_vae(*args, **kwargs):
        model = real(*args, **kwargs)
        seen.append(model.use_tiling)
        return model
    monkeypatch.setattr(vae_lib, "load_vae", load_vae)
    return seen


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiling")
    tiny_dit.write_checkpoint(root / "tiny.pt", image_size=32)
    return root, tiny_vae.save_tiny_vae(root / "vae")


@pytest.mark.parametrize("tiling", [False, True])
def test_sample_py_passes_the_flag(latent, spy, tmp_path, tiling):
    root, vae_path = latent
    sample.main(["--ckpt", str(root / "tiny.pt"), "--vae-path", vae_path, "--num-sampling-steps", "2",
                 "--class-labels", "1", "--output", str(tmp_path / "x.png"), *(["--vae-tiling"] * tiling)])
    assert spy == [tiling]


@pytest.mark.parametrize("tiling", [False, True])
def test_sample_ddp_passes_and_records_the_flag(latent, spy, tmp_path, tiling):
    root, vae_path = latent
    argv = ["--ckpt", str(root / "tiny.pt"), "--vae-path", vae_path, "--device", "cpu", "--num-fid-samples", "2",
            "--per-proc-batch-size", "2", "--num-sampling-steps", "2", "--sample-dir", str(tmp_path)]
    npz = sample_ddp.main(argv + ["--vae-tiling"] * tiling)
    assert spy == [tiling]
    with open(npz[:-len(".npz")] + ".json") as f:
        assert json.load(f)["vae_tiling"] is tiling
    # The other setting into the same folder would mix two kinds of samples: refused.
    with pytest.raises(ValueError, match="vae_tiling"):
        sample_ddp.main(argv + ["--vae-tiling"] * (not tiling))


def test_sample_ddp_folder_from_before_the_flag_counts_as_untiled(latent, tmp_path):
    root, vae_path = latent
    argv = ["--ckpt", str(root / "tiny.pt"), "--vae-path", vae_path, "--device", "cpu", "--num-fid-samples", "1",
            "--per-proc-batch-size", "1", "--num-sampling-steps", "2", "--sample-dir", str(tmp_path)]
    folder = sample_ddp.main(argv)[:-len(".npz")]
    with open(folder + ".json") as f:
        record = json.load(f)
    del record["vae_tiling"]  # as an older version wrote it
    with open(folder + ".json", "w") as f:
        json.dump(record, f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "does not record vae_tiling": its absence means untiled
        sample_ddp.main(argv)
    with pytest.raises(ValueError, match="vae_tiling"):  # so a tiled run into it is refused
        sample_ddp.main(argv + ["--vae-tiling"])


def test_vae_tiling_refused_for_pixel_space(tmp_path):
    tiny_dit.write_checkpoint(tmp_path / "pixel.pt", image_size=8, vae="none", in_channels=1)
    with pytest.raises(ValueError, match="--vae-tiling applies to the VAE"):
        sample.main(["--ckpt", str(tmp_path / "pixel.pt"), "--vae-tiling", "--output", str(tmp_path / "x.png")])


@pytest.mark.parametrize("tiling", [False, True])
def test_extract_features_passes_and_records_the_flag(latent, spy, tmp_path, tiling):
    _, vae_path = latent
    images = write_images(tmp_path / "images", per_class=2, classes=1, size=32, mode="RGB")
    extract_features.main(["--data-path", str(images), "--feature-path", str(tmp_path / "f"), "--image-size", "32",
                           "--vae-path", vae_path, "--num-workers", "0", *(["--vae-tiling"] * tiling)])
    assert spy == [tiling]
    config = json.loads((tmp_path / "f" / extract_features.CONFIG).read_text())
    assert config.get("vae_tiling", False) is tiling
    assert ("vae_tiling" in config) is tiling  # untiled folders keep the config they always had


def tiny_vae_with_tiles(tile_latent):
    vae = tiny_vae.make_tiny_vae()
    vae.tile_latent_min_size, vae.tile_sample_min_size = tile_latent, tile_latent * vae_lib.DOWNSAMPLE
    return vae


def test_tiled_decode_is_close_to_untiled():
    vae = tiny_vae_with_tiles(16)  # 128 px tiles
    z = torch.randn(2, 4, 24, 24, generator=torch.Generator().manual_seed(0))  # 192 px: four blended tiles
    untiled = vae_lib.decode(vae, z)
    vae.enable_tiling()
    tiled = vae_lib.decode(vae, z)
    assert tiled.shape == untiled.shape == (2, 3, 192, 192)
    relative_rms = ((tiled - untiled).pow(2).mean() / untiled.var()).sqrt().item()
    assert 0 < relative_rms < 0.3, relative_rms  # > 0: the tiled path ran
    # No seam left as a jump: where the two rows of tiles meet (rows 96..128 blend), neighbouring rows
    # differ hardly more than on average over the image.
    steps = (tiled[:, :, 1:] - tiled[:, :, :-1]).abs().mean(dim=(0, 1, 3))
    assert steps[90:130].max() < 1.6 * steps.mean(), steps[90:130] / steps.mean()


def test_tiling_changes_nothing_within_one_tile():
    vae = tiny_vae_with_tiles(8)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    untiled, untiled_mean = vae_lib.decode(vae, z), vae_lib.encode_distribution(vae, images)[0]
    vae.enable_tiling()
    torch.testing.assert_close(vae_lib.decode(vae, z), untiled, rtol=0, atol=0)
    torch.testing.assert_close(vae_lib.encode_distribution(vae, images)[0], untiled_mean, rtol=0, atol=0)


def test_tiled_encode_runs_above_the_tile():
    vae = tiny_vae_with_tiles(8)
    images = torch.rand(1, 3, 128, 96, generator=torch.Generator().manual_seed(3)) * 2 - 1  # non-square too
    plain = vae_lib.encode_distribution(vae, images)[0]
    vae.enable_tiling()
    tiled = vae_lib.encode_distribution(vae, images)[0]
    assert tiled.shape == plain.shape == (1, 4, 16, 12)
    assert np.isfinite(tiled.numpy()).all() and not torch.equal(tiled, plain)
