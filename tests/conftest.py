"""Shared test setup and helpers: import the project from the repository root, keep CPU threads
modest, golden-file tolerances, and running train.py on a tiny model in pixel space."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(ROOT))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import cli  # noqa: E402  (after the path is set)
from models import DiT  # noqa: E402
import tiny_dit  # noqa: E402
import train  # noqa: E402


@pytest.fixture
def golden():
    def load(name):
        return torch.load(GOLDEN / name, weights_only=True)
    return load


def assert_close_to_golden(actual, expected):
    """Match a float32 reference tensor as tests/golden/README.md asks: rtol 1e-4, and an absolute
    tolerance scaled by the reference's magnitude, since float32 rounding differs between CPUs."""
    atol = 1e-5 * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol)


# ------------------------------------------------------------------ train.py runs (test_train, test_extract_features)
tiny_dit.register()
MODEL = tiny_dit.TINY_MODEL
EXPERIMENT = "000-" + MODEL.replace("/", "-")
STEPS = 8  # 24 images, batch 8: three steps an epoch, so the checkpoint at 4 sits mid-epoch


def pixel_args(data_path, results_dir, *extra):
    return ["--model", MODEL, "--vae", "none", "--in-channels", "1", "--image-size", "8", "--num-classes", "3",
            "--data-path", str(data_path), "--results-dir", str(results_dir), "--global-batch-size", "8",
            "--log-every", "1", "--ckpt-every", "4", "--cpu-threads", "1", *map(str, extra)]


@pytest.fixture(scope="module")
def pixel_ckpt(tmp_path_factory):
    """A tiny random pixel-space checkpoint (8x8, one channel)."""
    path = tmp_path_factory.mktemp("pixel") / "tiny.pt"
    tiny_dit.write_checkpoint(path, image_size=8, vae="none", in_channels=1)
    return str(path)


@pytest.fixture
def one_thread():
    """Ops this small run faster on one thread; two only contend (10x slower on a busy 2-core machine).
    A test module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_dit(seed=0, randomise=True, **model_args):
    """A DiT(**model_args) in eval mode; randomise: every trainable weight drawn from N(0, 0.2), as after
    training (a fresh one outputs zero, which would hide most differences)."""
    torch.manual_seed(seed)
    model = DiT(**model_args)
    if randomise:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.2)
    return model.eval()


def assert_checkpointing_keeps_the_gradients(model, x, t, y):
    """Every trainable weight gets a finite gradient (DDP needs every weight used), and gradient
    checkpointing gives the same gradients. Leaves the model with checkpointing on."""
    drop = torch.tensor([i % 2 for i in range(len(x))])
    model(x, t, y, force_drop_ids=drop).square().sum().backward()
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trained)
    reference = [p.grad.clone() for _, p in trained]
    model.zero_grad()
    model.gradient_checkpointing = True
    model(x, t, y, force_drop_ids=drop).square().sum().backward()
    for (name, p), grad in zip(trained, reference):
        torch.testing.assert_close(p.grad, grad, msg=name)


def write_images(folder, per_class=8, classes=3, size=8, mode="L", seed=0):
    """Random images in class folders; size: N or (height, width)."""
    rng = np.random.default_rng(seed)
    height, width = (size, size) if isinstance(size, int) else size
    shape = (height, width) if mode == "L" else (height, width, 3)
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


