"""extract_features.py and latent-space training through a tiny Stable-Diffusion-shaped VAE that
lives in a temporary Hugging Face cache (the real hub loading path, offline).

Checks: shards written by two gloo processes (through a local VAE folder) hold the encoder's mean and std of each image and
its mirror image; an interrupted extraction resumes without redoing finished shards; training
from the features gives the same losses and weights as encoding on the fly (same images,
flips and noise); and two-process on-the-fly training matches one process.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import data
import extract_features
import sample_ddp
import tiny_dit
import tiny_vae
import vae as vae_lib
from conftest import (EXPERIMENT, MODEL, assert_runs_agree, metrics, run_main, torchrun, write_images,
                      write_photos)

tiny_dit.register()


IMAGES = 12  # 3 classes x 4 images of 32x32 -> 4x4x4 latents; shards of 5 -> 5, 5, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    images = write_images(root / "images", per_class=4, classes=3, size=32, mode="RGB", seed=1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **tiny_vae.hub_cache(root / "hf"))
    vae_path = tiny_vae.save_tiny_vae(root / "vae_folder")  # the same weights, for in-process runs
    features = root / "features"
    torchrun(*extract_args(images, features, vae_path, "--batch-size", 3), env=env)
    return {"root": root, "images": images, "env": env, "vae_path": vae_path, "features": features}


def extract_args(images, features, vae_path, *extra):
    return ["extract_features.py", "--data-path", str(images), "--feature-path", str(features), "--image-size", "32",
            "--shard-size", "5", "--num-workers", "0", "--dtype", "float32", "--vae-path", str(vae_path),
            *map(str, extra)]


def latent_args(results, *extra):
    return ["--model", MODEL, "--image-size", "32", "--num-classes", "3", "--results-dir", str(results),
            "--global-batch-size", "4", "--log-every", "1", "--ckpt-every", "100", "--max-steps", "4",
            "--cpu-threads", "1", *map(str, extra)]


def test_shards_hold_both_flips(setup):
    meta = json.loads((setup["features"] / data.FEATURES_META).read_text())
    assert meta["num_images"] == IMAGES and meta["num_classes"] == 3 and meta["latent_shape"] == [4, 4, 4]
    assert [s["count"] for s in meta["shards"]] == [5, 5, 2]
    dataset = data.ImageFolder(str(setup["images"]), 32, in_memory=True)
    vae = vae_lib.load_vae(vae_path=setup["vae_path"])
    x = dataset.images.float() / 127.5 - 1
    for flip, images in enumerate([x, x.flip(-1)]):
        mean, std = vae_lib.encode_distribution(vae, images)
        for entry in meta["shards"]:
            shard = torch.load(setup["features"] / entry["file"], weights_only=True)
            idx = shard["indices"]
            assert torch.equal(shard["labels"], dataset.labels[idx])
            torch.testing.assert_close(shard["mean"][:, flip], mean[idx], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(shard["std"][:, flip], std[idx], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(mean, vae_lib.encode_distribution(vae, x)[0])  # the flip matters


def test_interrupted_extraction_resumes(setup, tmp_path, capsys):
    features = tmp_path / "features"
    shutil.copytree(setup["features"], features)
    before = {name: (features / name).stat().st_mtime_ns for name in ("shard-00000.pt", "shard-00002.pt")}
    removed = torch.load(features / "shard-00001.pt", weights_only=True)
    (features / "shard-00001.pt").unlink()
    (features / data.FEATURES_META).unlink()
    (features / ".tmp-abc123.pt").write_bytes(b"half a shard")  # what a killed save leaves behind
    with pytest.raises(Exception, match="no features.json"):
        data.FeatureShards(str(features))
    extract_features.main(extract_args(setup["images"], features, setup["vae_path"])[1:])
    assert "2 already done" in capsys.readouterr().out
    assert {name: (features / name).stat().st_mtime_ns for name in before} == before
    rebuilt = torch.load(features / "shard-00001.pt", weights_only=True)
    assert torch.equal(rebuilt["indices"], removed["indices"])
    torch.testing.assert_close(rebuilt["mean"], removed["mean"], atol=1e-6, rtol=1e-5)
    assert not (features / ".tmp-abc123.pt").exists() and (features / data.FEATURES_META).exists()
    # Other settings into the same folder are refused, naming what differs.
    args = extract_args(setup["images"], features, setup["vae_path"])[1:]
    args[args.index("--image-size") + 1] = "64"
    with pytest.raises(SystemExit):
        cli.run(lambda: extract_features.main(args))
    assert "(image_size differ)" in capsys.readouterr().err


@pytest.mark.slow
def test_features_train_like_on_the_fly_encoding(setup, tmp_path):
    assert run_main(latent_args(tmp_path / "features", "--feature-path", setup["features"])) is None
    assert run_main(latent_args(tmp_path / "fly", "--data-path", setup["images"], "--vae-path",
                                setup["vae_path"])) is None
    assert len(metrics(tmp_path / "fly")) == 4
    a, _ = assert_runs_agree(tmp_path / "features", tmp_path / "fly", 4)
    assert a["args"]["in_channels"] == 4 and a["args"]["vae_path"] == setup["vae_path"] and a["args"]["image_size"] == 32

    # Two gloo processes encoding on the fly through the VAE found in the hub cache: the same training.
    torchrun("train.py", *latent_args(tmp_path / "ddp", "--data-path", setup["images"]), env=setup["env"])
    assert_runs_agree(tmp_path / "ddp", tmp_path / "fly", 4)


def test_feature_flags_must_agree(setup, tmp_path, capsys):
    args = latent_args(tmp_path, "--feature-path", setup["features"])
    args[args.index("--image-size") + 1] = "64"
    err = run_main(args, capsys)
    assert "64 differs from the 32" in err, err
    args = latent_args(tmp_path, "--feature-path", setup["features"])
    args[args.index("--num-classes") + 1] = "2"
    err = run_main(args, capsys)
    assert "--num-classes 3" in err, err


def test_large_feature_sets_are_memory_mapped(setup, monkeypatch):
    small = data.FeatureShards(str(setup["features"]))
    monkeypatch.setattr(data, "IN_MEMORY_LIMIT", 0)
    mapped = data.FeatureShards(str(setup["features"]))
    assert len(small.shards) == 1 and len(mapped.shards) == 3 and len(mapped) == IMAGES
    order = [11, 0, 5, 4, 7, 10, 3]  # across all three shards, out of order
    for a, b in zip(small.__getitems__(order), mapped.__getitems__(order)):
        assert torch.equal(a, b)
    assert torch.equal(mapped[6][0], small.shards[0]["mean"][6])


@pytest.mark.parametrize("mapped", [False, True])
def test_a_corrupt_feature_shard_says_to_extract_it_again(setup, tmp_path, monkeypatch, mapped):
    features = tmp_path / "features"
    shutil.copytree(setup["features"], features)
    (features / "shard-00001.pt").write_bytes(b"half a shard")
    if mapped:
        monkeypatch.setattr(data, "IN_MEMORY_LIMIT", 0)
    with pytest.raises(cli.UserError, match=r"shard-00001.pt.*corrupt.*delete it and re-run extract_features.py"):
        data.FeatureShards(str(features))


# ------------------------------------------------------------------ image folders: what is read, what is refused


@pytest.mark.parametrize("in_memory", [True, False])
def test_image_folders_skip_hidden_files_and_folders(tmp_path, in_memory):
    """A complete temp PNG left by a kill between write and rename, a notebook's checkpoint folder and a
    hidden sub-folder: none of them is read (nor a class)."""

    root = write_images(tmp_path / "images", per_class=4, classes=3, size=8)
    pixel = Image.new("L", (8, 8), 255)
    pixel.save(root / "class0" / ".tmp-abc123.png")
    (root / ".ipynb_checkpoints").mkdir()
    pixel.save(root / ".ipynb_checkpoints" / "0.png")
    (root / "class1" / ".cache").mkdir()
    pixel.save(root / "class1" / ".cache" / "1.png")
    dataset = data.ImageFolder(str(root), 8, channels=1, in_memory=in_memory)
    assert dataset.classes == ["class0", "class1", "class2"] and len(dataset) == 12
    assert not any(os.sep + "." in path for path in dataset.paths)


@pytest.mark.parametrize("content", [[], [".tmp-only-hidden.png"]], ids=["empty", "hidden-only"])
def test_an_empty_class_folder_is_named(tmp_path, content):
    root = write_images(tmp_path / "images", per_class=2, classes=3, size=8)
    (root / "cats").mkdir()
    for name in content:
        (root / "cats" / name).write_bytes(b"x")
    with pytest.raises(cli.UserError) as info:
        data.ImageFolder(str(root), 8, channels=1)
    message = str(info.value)
    assert f"class folder {str(root / 'cats')!r} holds no images" in message and "check the path" not in message


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_decompression_bomb_is_skipped_like_an_unreadable_image(tmp_path, monkeypatch, in_memory):
    """PIL refuses images over twice MAX_IMAGE_PIXELS (DecompressionBombError, not an OSError): lowered
    here so a 16x16 image is one, and skipped with the warning of every unreadable image."""

    root = write_images(tmp_path / "images", per_class=3, classes=2, size=8)
    Image.new("L", (16, 16)).save(root / "class1" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 8x8 = 64 pixels pass, 16x16 = 256 > 200
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*bomb\.png .*decompression bomb"):
        dataset = data.ImageFolder(str(root), 8, channels=1, in_memory=in_memory)
        items = [dataset[i] for i in range(len(dataset))]
    assert len(dataset) == (6 if in_memory else 7) and all(image.shape == (1, 8, 8) for image, _ in items)


def test_bad_extraction_flags_are_refused_before_the_work(tmp_path, capsys):
    images = write_images(tmp_path / "images", per_class=2, classes=2, size=32, mode="RGB")
    with pytest.raises(SystemExit) as info:
        extract_features.main(["--data-path", str(images), "--feature-path", str(tmp_path / "f"),
                               "--num-workers", "-1"])
    assert info.value.code == 2 and "--num-workers: must be 0 or more, got -1" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit) as info:
        cli.run(lambda: extract_features.main(["--data-path", str(images), "--feature-path", str(tmp_path / "a_file"),
                                               "--vae-path", str(tmp_path / "no_vae_needed_yet")]))
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert "--feature-path" in err and "is a file, not a folder" in err


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
