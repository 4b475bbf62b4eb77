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

import checkpoint as checkpoints  # noqa: E402  (the module; checkpoint() below reads a run's checkpoint)
import cli  # noqa: E402  (after the path is set)
from models import DiT  # noqa: E402
import tiny_dit  # noqa: E402
from tiny_dit import tiny  # noqa: E402
import tiny_vae  # noqa: E402
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


def write_eval_ref(path, count=40, size=8):
    """A random reference batch, as ADM's .npz holds them (uint8 N x H x W x 3), for --eval-ref."""
    np.savez(path, np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8))
    return path


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


def assert_runs_agree(ours, theirs, step):
    """Two runs' logged losses (rtol 1e-4) and their weights at `step` (atol 1e-5, rtol 1e-4) agree, as
    two ways of computing the same training should (e.g. stored latents against encoding on the fly).
    Returns both checkpoints for further checks."""
    np.testing.assert_allclose([r["loss"] for r in metrics(ours)], [r["loss"] for r in metrics(theirs)], rtol=1e-4)
    a, b = checkpoint(ours, step), checkpoint(theirs, step)
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], atol=1e-5, rtol=1e-4)
    return a, b


def metrics(results_dir):
    with open(os.path.join(results_dir, EXPERIMENT, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------ shared by several test files
TINY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5)
BLOCK_TINY = dict(input_size=8, **TINY)


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("pixels"))


@pytest.fixture(scope="module")
def latent_ckpt(tmp_path_factory):
    """A train.py checkpoint of a 4-channel, learned-sigma tiny DiT on 8x8 latents (64 px)."""
    path = tmp_path_factory.mktemp("latent") / "tiny.pt"
    tiny_dit.write_checkpoint(path, image_size=64, num_classes=1000)
    return str(path)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    return tiny_vae.save_tiny_vae(tmp_path_factory.mktemp("vae") / "vae")


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory, latent_ckpt, vae_folder):
    out = tmp_path_factory.mktemp("export") / "pipeline"
    checkpoints.export_diffusers(latent_ckpt, out, vae_path=vae_folder)
    return str(out)


def one_error_line(function, *args):
    """The message of the UserError function(*args) raises, checked to be one line (cli.run prints it)."""
    with pytest.raises(cli.UserError) as e:
        function(*args)
    assert len(str(e.value).strip().splitlines()) == 1, str(e.value)
    return str(e.value)


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


FLOW_ARGS = {"objective": "flow", "t_sampling": "uniform"}


@pytest.fixture(scope="module")
def random_flow_ckpt(tmp_path_factory):
    """A train.py-style checkpoint of a random tiny flow model (no training)."""
    path = tmp_path_factory.mktemp("flow") / "flow.pt"
    ckpt = tiny_dit.write_checkpoint(path, image_size=8, vae="none", in_channels=1, num_classes=10)
    ckpt["diffusion_args"] = dict(FLOW_ARGS)
    torch.save(ckpt, path)  # learn_sigma stays: the flow samplers read only the first C channels
    return str(path)


@pytest.fixture(scope="module")
def trained(pixels, tmp_path_factory):
    """Four steps of each new objective through train.py; the checkpoints by objective."""
    runs = {"v": ["--objective", "v"],
            "flow": ["--objective", "flow", "--t-sampling", "logit-normal", "--t-scale", "0.8",
                     "--sample-every", 4, "--num-sampling-steps", 2]}  # a grid with the flow's default sampler
    paths = {}
    for objective, flags in runs.items():
        results = tmp_path_factory.mktemp(objective)
        assert run_main(pixel_args(pixels, results, "--max-steps", 4, *flags)) is None
        paths[objective] = os.path.join(results, EXPERIMENT, "checkpoints", "0000004.pt")
    assert os.path.exists(os.path.join(os.path.dirname(os.path.dirname(paths["flow"])), "samples", "0000004.png"))
    return paths


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


def random_model(**kwargs):
    """A tiny DiT whose every output depends on every weight (the release zero-initialises the last layers)."""
    torch.manual_seed(0)
    model = tiny(input_size=8, in_channels=4, num_classes=10, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return model
