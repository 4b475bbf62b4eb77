"""--aspect-buckets (train.py, extract_features.py): images of several aspect ratios, each cropped to
the bucket nearest its ratio, every global batch from one bucket.

Checks: images go to the nearest bucket (by log aspect ratio) at its size; the sampler gives every
rank of a step the same bucket, takes every full batch of each bucket once an epoch, and
splits a global batch over ranks as one process would; two gloo processes train with one shape
per step on both ranks and match one process; a bucketed run resumes exactly (rope, sincos,
none); sample.py draws at every bucket (a sincos model warns only off them); extract_features.py's
bucketed latents train with --feature-path as encoding on the fly; the default run is untouched (no
bucket flag, single-size features unchanged).
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import extract_features
import sample
import tiny_vae
from conftest import EXPERIMENT, MODEL, assert_runs_agree, checkpoint, metrics, pixel_args, run_main, torchrun

BUCKETS = "8x8,8x16,16x8"
# (height, width) of the images written: 7x13 and 9x20 are nearest 8x16, 20x9 nearest 16x8
SHAPES = [(8, 8), (8, 16), (16, 8), (7, 13), (12, 12), (20, 9), (9, 20), (16, 8)]
EXPECTED_BUCKET = [0, 1, 2, 1, 0, 2, 1, 2]


def write_shaped_images(folder, shapes=SHAPES, per_shape=2, classes=2, mode="L", seed=0):
    """Random images of the given shapes in class folders; returns the folder."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(folder / f"class{c}", exist_ok=True)
        for i, (height, width) in enumerate(shapes * per_shape):
            shape = (height, width) if mode == "L" else (height, width, 3)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels, mode).save(folder / f"class{c}" / f"{i:02d}.png")
    return folder


def bucket_args(images, results, *extra):
    """pixel_args without --image-size (the first bucket becomes it), 2 classes, buckets BUCKETS."""
    args = pixel_args(images, results, "--num-classes", 2, "--aspect-buckets", BUCKETS, *extra)
    at = args.index("--image-size")
    return args[:at] + args[at + 2:]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_shaped_images(tmp_path_factory.mktemp("buckets") / "images")  # 32 images, batch 8


def test_nearest_bucket_by_log_aspect_ratio():
    buckets = [256, [192, 320], [320, 192]]  # as --aspect-buckets 256x256,192x320,320x192 parses
    assert data.aspect_buckets("256x256,192x320,320x192") == buckets
    assert data.nearest_bucket(500, 500, buckets) == 0
    assert data.nearest_bucket(800, 400, buckets) == 1  # wide (width, height): the 192 high, 320 wide bucket
    assert data.nearest_bucket(400, 800, buckets) == 2
    # 1.29 is nearer 1 than 5/3 by log ratio (0.25 against 0.26), though not by plain ratio
    assert data.nearest_bucket(129, 100, buckets) == 0
    assert data.nearest_bucket(130, 100, buckets) == 1


def test_images_go_to_the_nearest_bucket_at_its_size(images):
    dataset = data.BucketedImages(images, data.aspect_buckets(BUCKETS), channels=1)
    assert len(dataset) == 2 * 2 * len(SHAPES)
    assert dataset.bucket_of.tolist() == EXPECTED_BUCKET * 4
    for i in range(len(dataset)):
        image, _ = dataset[i]
        assert tuple(image.shape) == (1, *[(8, 8), (8, 16), (16, 8)][EXPECTED_BUCKET[i % len(SHAPES)]])
    on_the_fly = data.BucketedImages(images, data.aspect_buckets(BUCKETS), channels=1, in_memory=False)
    batch, labels = on_the_fly.__getitems__([1, 3, 6])
    assert batch.shape == (3, 1, 8, 16) and torch.equal(batch, dataset.__getitems__([1, 3, 6])[0])
    with pytest.raises(RuntimeError, match="mixes buckets"):
        dataset.__getitems__([0, 1])


def test_an_image_that_fails_to_decode_gives_the_next_of_its_bucket(tmp_path):
    """Its header reads (so it keeps its bucket and place); its pixels do not: the next image of the
    same bucket, wrapping round, stands in, with a warning."""
    folder = write_shaped_images(tmp_path / "images", shapes=[(8, 16), (8, 8), (8, 16)], per_shape=1, classes=1)
    last = folder / "class0" / "02.png"
    last.write_bytes(last.read_bytes()[:60])  # the PNG header and a cut-off image
    images = data.BucketedImages(str(folder), [(8, 8), (8, 16)], channels=1, in_memory=False)
    assert images.bucket_of.tolist() == [1, 0, 1]
    with pytest.warns(UserWarning, match="02.png.*next image of its bucket"):
        image, _ = images[2]
    assert torch.equal(image, images[0][0]) and image.shape == (1, 8, 16)


def test_the_sampler_gives_every_rank_one_bucket_and_each_bucket_its_share():
    bucket_of = torch.tensor([0] * 10 + [1] * 21 + [2] * 5)  # full batches of 4: 2, 5 and 1
    one = data.BucketSampler(bucket_of, 4, 1, 0, seed=3)
    two = [data.BucketSampler(bucket_of, 4, 2, rank, seed=3) for rank in range(2)]
    assert one.num_batches == 8 and len(one) == 32 and len(two[0]) == 16
    for epoch in range(3):
        for sampler in (one, *two):
            sampler.set_epoch(epoch)
        whole = torch.tensor(list(one)).view(-1, 4)
        ranks = [torch.tensor(list(s)).view(-1, 2) for s in two]
        for step, batch in enumerate(whole):
            assert len(bucket_of[batch].unique()) == 1
            # rank r holds positions r, r + 2 of the global batch, as step_randomness slices the draws
            assert torch.equal(ranks[0][step], batch[0::2]) and torch.equal(ranks[1][step], batch[1::2])
        assert torch.bincount(bucket_of[whole[:, 0]]).tolist() == [2, 5, 1]
        assert len(set(whole.flatten().tolist())) == 32  # no image twice in an epoch
    one.set_epoch(2, skip=3 * 4)  # a resume after three batches of epoch 2
    assert torch.equal(torch.tensor(list(one)), whole[3:].flatten())
    one.set_epoch(1)
    assert not torch.equal(torch.tensor(list(one)).view(-1, 4), whole)  # each epoch its own order


RECORD_SHAPES = """
import json, os
import cli, train

shapes, micro_batches = [], train.micro_batches

def recording(run, batch, *rest):
    shapes.append(list(batch[0].shape))
    return micro_batches(run, batch, *rest)

train.micro_batches = recording
try:
    cli.run(train.main)
finally:
    with open(os.path.join(os.environ["SHAPES_DIR"], os.environ["RANK"] + ".json"), "w") as f:
        json.dump(shapes, f)
"""


@pytest.mark.slow
def test_two_processes_train_one_bucket_per_step_and_match_one(images, tmp_path):
    script = tmp_path / "record_shapes.py"
    script.write_text(RECORD_SHAPES)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SHAPES_DIR=str(tmp_path))
    torchrun(script, *bucket_args(images, tmp_path / "two", "--max-steps", 6, "--pos", "rope"), env=env)
    shapes = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert len(shapes[0]) == 6 and shapes[0] == shapes[1]
    assert {tuple(s[-2:]) for s in shapes[0]} == {(8, 8), (8, 16), (16, 8)}
    assert all(s[0] == 4 for s in shapes[0])  # half of the global batch of 8 each
    assert run_main(bucket_args(images, tmp_path / "one", "--max-steps", 6, "--pos", "rope")) is None
    ours, ref = checkpoint(tmp_path / "two", 6), checkpoint(tmp_path / "one", 6)
    for name in ref["model"]:
        torch.testing.assert_close(ours["model"][name], ref["model"][name], atol=2e-6, rtol=1e-5, msg=name)
    np.testing.assert_allclose([r["loss"] for r in metrics(tmp_path / "two")],
                               [r["loss"] for r in metrics(tmp_path / "one")], rtol=1e-5)


@pytest.mark.parametrize("pos", ["rope", "sincos", "none"])
def test_a_bucketed_run_resumes_exactly(images, tmp_path, pos):
    """Six steps straight against three, then a resume to six (mid-epoch: four steps an epoch)."""
    assert run_main(bucket_args(images, tmp_path / "straight", "--max-steps", 6, "--pos", pos)) is None
    first = bucket_args(images, tmp_path / "resumed", "--max-steps", 3, "--ckpt-every", 3, "--pos", pos)
    assert run_main(first) is None
    assert run_main(bucket_args(images, tmp_path / "resumed", "--max-steps", 6, "--resume", "auto")) is None
    ours, ref = checkpoint(tmp_path / "resumed", 6), checkpoint(tmp_path / "straight", 6)
    for key in ("model", "ema"):
        for name in ref[key]:
            assert torch.equal(ours[key][name], ref[key][name]), f"{key}.{name}"
    assert ref["args"]["image_size"] == 8 and ref["args"]["aspect_buckets"] == [8, [8, 16], [16, 8]]
    losses = [[r["loss"] for r in metrics(tmp_path / run)] for run in ("resumed", "straight")]
    assert losses[0][3:] == losses[1][3:]


def test_sample_py_draws_at_every_bucket_and_warns_only_off_them(images, tmp_path, capsys):
    """A sincos model trained on buckets samples at each of them as at its trained size (no warning);
    at a size it did not train at, the one-line warning names its buckets."""
    assert run_main(bucket_args(images, tmp_path, "--max-steps", 2, "--pos", "sincos")) is None
    ckpt = os.path.join(tmp_path, EXPERIMENT, "checkpoints", "0000002.pt")
    capsys.readouterr()
    for size, shape in (("8", (8, 8)), ("8x16", (8, 16)), ("16x8", (16, 8)), ("16", (16, 16))):
        drawn = sample.main(["--ckpt", ckpt, "--image-size", size, "--num-sampling-steps", "2", "--class-labels",
                             "1", "--output", str(tmp_path / "x.png")])
        assert drawn.shape == (1, *shape, 1) and drawn.std() > 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "trained at 8, 8x16, 16x8 px" in warnings[0] and "at 16 px" in warnings[0]


def test_a_resume_keeps_the_checkpoints_buckets(images, tmp_path, capsys):
    """Without the flag a resume trains at the recorded buckets; other buckets, or buckets for a single-size
    run, are refused in one line before any training."""
    assert run_main(bucket_args(images, tmp_path / "buckets", "--max-steps", 2)) is None
    plain = [a for a in bucket_args(images, tmp_path / "buckets", "--max-steps", 3, "--resume", "auto")
             if a not in ("--aspect-buckets", BUCKETS)]
    assert run_main(plain) is None
    assert checkpoint(tmp_path / "buckets", 3)["args"]["aspect_buckets"] == [8, [8, 16], [16, 8]]
    err = run_main(bucket_args(images, tmp_path / "buckets", "--max-steps", 4, "--resume", "auto",
                               "--aspect-buckets", "8x8,8x16"), capsys)
    assert err.count("\n") == 1 and "--aspect-buckets 8,8x16,16x8" in err, err
    assert run_main(pixel_args(images, tmp_path / "single", "--num-classes", 2, "--max-steps", 2)) is None
    err = run_main(bucket_args(images, tmp_path / "single", "--max-steps", 3, "--resume", "auto"), capsys)
    assert "none (one --image-size)" in err, err


def test_bucket_sizes_must_fit_the_patches(images, tmp_path, capsys):
    err = run_main(bucket_args(images, tmp_path, "--max-steps", 1, "--aspect-buckets", "8x8,8x15"), capsys)
    assert "8x15" in err and "multiples of 2" in err, err


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """Bucketed features of 24 RGB images (32x32, 32x64 and 64x32 buckets) through a tiny VAE."""
    root = tmp_path_factory.mktemp("bucket_latents")
    shapes = [(32, 32), (32, 64), (64, 32), (30, 70)]
    images = write_shaped_images(root / "images", shapes=shapes, per_shape=3, classes=2, mode="RGB", seed=2)
    vae_path = tiny_vae.save_tiny_vae(root / "vae")
    features = root / "features"
    extract_features.main(["--data-path", str(images), "--feature-path", str(features), "--shard-size", "5",
                           "--num-workers", "0", "--dtype", "float32", "--vae-path", vae_path,
                           "--aspect-buckets", "32x32,32x64,64x32", "--device", "cpu"])
    return {"images": images, "vae_path": vae_path, "features": features}


def latent_args(results, *extra):
    return ["--model", MODEL, "--num-classes", "2", "--results-dir", str(results), "--global-batch-size", "4",
            "--log-every", "1", "--ckpt-every", "100", "--max-steps", "5", "--cpu-threads", "1", "--pos", "rope",
            *map(str, extra)]


def test_extracted_buckets_record_their_shapes(latents):
    meta = json.loads((latents["features"] / data.FEATURES_META).read_text())
    assert meta["image_size"] == 32 and meta["num_images"] == 24
    assert meta["buckets"] == [{"image_size": 32, "latent_shape": [4, 4, 4]},
                               {"image_size": [32, 64], "latent_shape": [4, 4, 8]},
                               {"image_size": [64, 32], "latent_shape": [4, 8, 4]}]
    counts = [0, 0, 0]
    for entry in meta["shards"]:
        shard = torch.load(latents["features"] / entry["file"], weights_only=True)
        assert tuple(shard["mean"].shape[2:]) == tuple(meta["buckets"][entry["bucket"]]["latent_shape"])
        counts[entry["bucket"]] += entry["count"]
    assert counts == [6, 12, 6]  # 30x70 goes to 32x64


def test_bucketed_latents_train_with_feature_path_as_on_the_fly(latents, tmp_path):
    assert run_main(latent_args(tmp_path / "features", "--feature-path", latents["features"])) is None
    assert run_main(latent_args(tmp_path / "fly", "--data-path", latents["images"], "--vae-path", latents["vae_path"],
                                "--aspect-buckets", "32x32,32x64,64x32")) is None
    assert len(metrics(tmp_path / "features")) == 5
    a, _ = assert_runs_agree(tmp_path / "features", tmp_path / "fly", 5)
    assert a["args"]["aspect_buckets"] == [32, [32, 64], [64, 32]]


def test_features_refuse_other_buckets(latents, tmp_path, capsys):
    err = run_main(latent_args(tmp_path, "--feature-path", latents["features"], "--aspect-buckets", "32x32"), capsys)
    assert "--aspect-buckets differs" in err and "32,32x64,64x32" in err, err


def test_the_default_run_has_no_buckets(tmp_path):
    args = pixel_args(tmp_path / "images", tmp_path / "results")
    from train import parse_args
    assert parse_args(args).aspect_buckets is None


def test_a_bucket_smaller_than_a_batch_is_named(images, tmp_path, capsys):
    args = bucket_args(images, tmp_path, "--max-steps", 1, "--aspect-buckets", "8x8,8x16,16x8,4x16")
    assert run_main(args) is None
    assert "bucket(s) 4x16" not in capsys.readouterr().err  # no 1:4 image: an empty bucket is no mistake
    thin = write_shaped_images(tmp_path / "thin", shapes=[(4, 16)], per_shape=1)
    for c in range(2):  # the 32 images plus one 1:4 image per class
        for name in os.listdir(images / f"class{c}"):
            os.link(images / f"class{c}" / name, thin / f"class{c}" / f"x{name}")
    args[args.index("--data-path") + 1] = str(thin)
    args[args.index("--results-dir") + 1] = str(tmp_path / "thin_results")
    assert run_main(args) is None
    assert "bucket(s) 4x16 (2) hold fewer images than one global batch of 8" in capsys.readouterr().err
