"""train.py on CPU: DDP over two gloo processes against one process, exact resumption after
SIGKILL, the ADM crop and data handling, and one-line errors for bad input.

A tiny named config (tests/tiny_dit.py, also used as a launcher for subprocesses) keeps every
run to a few seconds; images are 8x8 greyscale in pixel space.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import data
import tiny_dit
import train
from conftest import ROOT

tiny_dit.register()
MODEL = tiny_dit.TINY_MODEL
EXPERIMENT = "000-" + MODEL.replace("/", "-")
STEPS = 8  # 24 images, batch 8: three steps an epoch, so the checkpoint at 4 sits mid-epoch


def pixel_args(data_path, results_dir, *extra):
    return ["--model", MODEL, "--vae", "none", "--in-channels", "1", "--image-size", "8", "--num-classes", "3",
            "--data-path", str(data_path), "--results-dir", str(results_dir), "--global-batch-size", "8",
            "--log-every", "1", "--ckpt-every", "4", "--cpu-threads", "1", *map(str, extra)]


def write_images(folder, per_class=8, classes=3, size=8, mode="L", seed=0):
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    for c in range(classes):
        os.makedirs(folder / f"class{c}", exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"class{c}" / f"{i}.png")
    return folder


def subprocess_env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def torchrun(*args, env=None, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "tests/tiny_dit.py", *map(str, args)]
    result = subprocess.run(cmd, cwd=ROOT, env=env or subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def run_main(argv, capsys=None):
    """train.main in this process, through cli.run as the command line does; returns stderr on failure."""
    try:
        cli.run(lambda: train.main(list(map(str, argv))))
    except SystemExit as e:
        assert e.code == 2
        return capsys.readouterr().err if capsys else "failed"
    return None


def checkpoint(results_dir, step):
    return torch.load(os.path.join(results_dir, EXPERIMENT, "checkpoints", f"{step:07d}.pt"), weights_only=True)


def metrics(results_dir):
    with open(os.path.join(results_dir, EXPERIMENT, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("pixels"))


@pytest.fixture(scope="module")
def reference(pixels, tmp_path_factory):
    """An uninterrupted one-process run of STEPS steps."""
    results = tmp_path_factory.mktemp("reference")
    assert run_main(pixel_args(pixels, results, "--max-steps", STEPS)) is None
    return results


def test_reference_run_layout(reference):
    ckpt = checkpoint(reference, STEPS)
    assert set(ckpt) >= {"model", "ema", "opt", "args", "train_steps", "epoch", "batches_in_epoch"}
    assert ckpt["train_steps"] == STEPS and ckpt["epoch"] == 2 and ckpt["batches_in_epoch"] == 2
    args = ckpt["args"]
    assert (args["model"], args["image_size"], args["in_channels"], args["vae"], args["num_classes"]) == \
           (MODEL, 8, 1, "none", 3)
    assert os.path.exists(os.path.join(reference, EXPERIMENT, "checkpoints", "0000004.pt"))
    records = metrics(reference)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) and r["images_per_sec"] > 0 and r["peak_mem_gib"] > 0 for r in records)
    log = open(os.path.join(reference, EXPERIMENT, "log.txt")).read()
    assert "Train Loss" in log and "Saved checkpoint" in log
    # The EMA moved away from the initial weights, slowly (decay 0.9999).
    model, ema = ckpt["model"], ckpt["ema"]
    moved = model["final_layer.linear.weight"].abs().max()
    assert 0 < ema["final_layer.linear.weight"].abs().max() < 0.01 * moved


def test_two_processes_match_one(pixels, reference, tmp_path):
    torchrun("train.py", *pixel_args(pixels, tmp_path, "--max-steps", STEPS, "--sample-every", STEPS,
                                     "--num-sampling-steps", 4, "--keep-last", 1))
    assert os.listdir(os.path.join(tmp_path, EXPERIMENT, "checkpoints")) == [f"{STEPS:07d}.pt"]
    ours, ref = checkpoint(tmp_path, STEPS), checkpoint(reference, STEPS)
    for key in ("model", "ema"):
        for name in ref[key]:
            torch.testing.assert_close(ours[key][name], ref[key][name], atol=2e-6, rtol=1e-5, msg=f"{key}.{name}")
    np.testing.assert_allclose([r["loss"] for r in metrics(tmp_path)], [r["loss"] for r in metrics(reference)],
                               rtol=1e-5)
    grid = Image.open(os.path.join(tmp_path, EXPERIMENT, "samples", f"{STEPS:07d}.png"))
    assert grid.width > 8 * 64 and grid.height >= 64  # eight enlarged 8x8 samples in a row


def test_sigkill_then_resume_auto_is_exact(pixels, reference, tmp_path):
    cmd = [sys.executable, "tests/tiny_dit.py", "train.py", *pixel_args(pixels, tmp_path, "--max-steps", 100_000)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt_dir = os.path.join(tmp_path, EXPERIMENT, "checkpoints")
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(ckpt_dir, "0000004.pt")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint within two minutes"
        time.sleep(0.01)
    proc.kill()  # SIGKILL: no clean-up runs
    proc.wait()
    proc.stderr.close()
    # Restart from step 4 whatever the killed run reached after it (its later checkpoints go).
    for name in os.listdir(ckpt_dir):
        if name.endswith(".pt") and int(name[:7]) > 4:
            os.remove(os.path.join(ckpt_dir, name))
    assert run_main(pixel_args(pixels, tmp_path, "--max-steps", STEPS, "--resume", "auto")) is None
    ours, ref = checkpoint(tmp_path, STEPS), checkpoint(reference, STEPS)
    for key in ("model", "ema"):
        assert all(torch.equal(ours[key][k], ref[key][k]) for k in ref[key]), key
    assert [s["step"] for s in ours["opt"]["state"].values()] == [s["step"] for s in ref["opt"]["state"].values()]
    # The loss carries on exactly, and steps the killed run logged past 4 are not repeated.
    assert [(r["step"], r["loss"]) for r in metrics(tmp_path)] == [(r["step"], r["loss"]) for r in metrics(reference)]


def test_resume_with_another_model_names_both(pixels, reference, tmp_path, capsys):
    resume = os.path.join(reference, EXPERIMENT, "checkpoints", "0000004.pt")
    args = pixel_args(pixels, tmp_path, "--max-steps", 5, "--resume", resume)
    args[args.index("--image-size") + 1] = "16"
    err = run_main(args, capsys)
    assert err.count("\n") == 1 and "input 8x8x1" in err and "input 16x16x1" in err, err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(pixels, tmp_path, capsys):
    err = run_main(pixel_args(pixels, tmp_path, "--max-steps", 6, "--ckpt-every", 1, "--lr", 1e30), capsys)
    assert "NaN or infinite" in err and "0000001.pt" in err, err
    ckpts = sorted(os.listdir(os.path.join(tmp_path, EXPERIMENT, "checkpoints")))
    assert ckpts == ["0000001.pt"]
    good = checkpoint(tmp_path, 1)
    assert all(torch.isfinite(v).all() for v in good["model"].values())


@pytest.mark.parametrize("problem", ["missing", "empty", "classes", "size", "batch", "both"])
def test_bad_input_one_line(problem, pixels, tmp_path, capsys):
    args = pixel_args(pixels, tmp_path / "results", "--max-steps", 1)
    expected = {"missing": "is not a folder", "empty": "holds no images", "classes": "--num-classes 3",
                "size": "not divisible by 8", "batch": "fewer than one global batch", "both": "exactly one of"}
    if problem == "missing":
        args[args.index("--data-path") + 1] = str(tmp_path / "nowhere")
    elif problem == "empty":
        (tmp_path / "empty" / "a").mkdir(parents=True)
        args[args.index("--data-path") + 1] = str(tmp_path / "empty")
    elif problem == "classes":
        args[args.index("--num-classes") + 1] = "2"
    elif problem == "size":
        args = [a for a in args if a not in ("--vae", "none")] + ["--image-size", "12"]
    elif problem == "batch":
        args[args.index("--global-batch-size") + 1] = "32"
    else:
        args += ["--feature-path", str(tmp_path)]
    err = run_main(args, capsys)
    assert err.startswith("error: ") and err.count("\n") == 1 and expected[problem] in err, err


def test_global_batch_must_divide():
    assert train.local_batch_size(256, 8) == 32
    with pytest.raises(cli.UserError, match="multiple of 3"):
        train.local_batch_size(256, 3)


def test_unreadable_and_non_image_files(tmp_path):
    folder = write_images(tmp_path / "imgs", per_class=3, classes=2)
    (folder / "class0" / "broken.png").write_bytes(b"not a png")
    (folder / "class1" / "notes.txt").write_text("hello")
    with pytest.warns(UserWarning) as caught:
        in_memory = data.ImageFolder(str(folder), 8, channels=1, in_memory=True)
    text = " ".join(str(w.message) for w in caught)
    assert "broken.png" in text and "notes.txt" in text
    assert len(in_memory) == 6 and in_memory.images.shape == (6, 1, 8, 8)
    lazy = data.ImageFolder(str(folder), 8, channels=1, in_memory=False, quiet=True)
    assert len(lazy) == 7  # the broken file keeps its place, replaced by the next readable image
    broken = next(i for i, p in enumerate(lazy.paths) if p.endswith("broken.png"))
    image, label = lazy[broken]
    assert torch.equal(image, lazy[broken + 1][0]) and image.shape == (1, 8, 8)


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


def test_eval_every_logs_fid(pixels, tmp_path, monkeypatch):
    import evaluate
    import inception_stub

    # A cheap 16-dimensional stand-in for the Inception network, so a few dozen samples give a proper FID.
    monkeypatch.setattr(evaluate, "load_inception", lambda device: inception_stub.TinyFeatures(cache_key=None))
    ref = tmp_path / "ref.npz"
    np.savez(ref, np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8))
    assert run_main(pixel_args(pixels, tmp_path, "--max-steps", 2, "--eval-every", 2, "--eval-ref", ref,
                               "--eval-num-samples", 24, "--num-sampling-steps", 2)) is None
    evals = [r for r in metrics(tmp_path) if "fid" in r]
    assert len(evals) == 1 and evals[0]["step"] == 2 and evals[0]["eval_num_samples"] == 24
    assert np.isfinite(evals[0]["fid"]) and evals[0]["fid"] > 0
