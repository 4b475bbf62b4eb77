"""sample.py: the original's image for the same seed, one-line errors for bad input, checkpoints
from train.py (every block, the modern options, non-square, flow) sampled with no model flags, and
the block-cache flags."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import sample
import sampling
import tiny_dit
import tiny_vae
from conftest import EXPERIMENT, ROOT, pixel_args, run_main, train_pixels
from diffusion import create_diffusion

tiny_dit.register()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("block", ["adaLN", "cross-attention", "in-context", "mm-dit"])
def test_checkpoint_rebuilds_the_block_in_sample_py(block, pixels, tmp_path):
    assert run_main(pixel_args(pixels, tmp_path, "--max-steps", 2, "--block", block, "--context-tokens", 3)) is None
    ckpt = os.path.join(tmp_path, EXPERIMENT, "checkpoints", "0000002.pt")
    assert torch.load(ckpt, weights_only=True)["model_args"]["block"] == block
    images = sample.main(["--ckpt", ckpt, "--sampler", "ddim", "--num-sampling-steps", "2", "--output",
                          str(tmp_path / "grid.png")])
    assert images.shape == (3, 8, 8, 1)
    args = sample.parse_args(["--ckpt", ckpt])
    model, _ = sampling.load_model(args, torch.device("cpu"))
    assert (model.config.block, model.model_args["context_tokens"]) == (block, 3)
    # resuming keeps training the same variant; another --block is refused in one line
    assert run_main(pixel_args(pixels, tmp_path, "--max-steps", 3, "--block", block, "--context-tokens", 3,
                               "--resume", "auto")) is None
    wrong = "adaLN-Zero"
    with pytest.raises(cli.UserError, match=f"block {block}"):
        sampling.load_model(sample.parse_args(["--ckpt", ckpt, "--block", wrong]), torch.device("cpu"))


def test_flags_reach_sample_py(pixel_ckpt, tmp_path):
    argv = ["--ckpt", pixel_ckpt, "--device", "cpu", "--sampler", "ddim", "--num-sampling-steps", "6",
            "--class-labels", "1", "2", "--output", str(tmp_path / "grid.png")]
    plain = sample.main(argv)
    cached = sample.main(argv + ["--cache-interval", "2"])
    again = sample.main(argv + ["--cache-interval", "2", "--cache-start", "0"])
    assert (cached != plain).any()
    np.testing.assert_array_equal(cached, again)


def test_a_start_past_the_last_block_is_one_line(pixel_ckpt, tmp_path, capsys):
    argv = ["--ckpt", pixel_ckpt, "--device", "cpu", "--sampler", "ddim", "--num-sampling-steps", "3",
            "--cache-interval", "2", "--cache-start", "2", "--output", str(tmp_path / "grid.png")]
    with pytest.raises(SystemExit):
        cli.run(lambda: sample.main(argv))
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --cache-start 2 leaves nothing to reuse") and "\n" not in err
    with pytest.raises(SystemExit):
        cli.run(lambda: sample.main(argv[:-4] + ["--cache-interval", "0", "--output", str(tmp_path / "g.png")]))
    assert "--cache-interval: must be at least 1" in capsys.readouterr().err


MODERN_FLAGS = ["--pos", "rope", "--rope-base", "100", "--qk-norm", "--mlp", "swiglu", "--norm", "rmsnorm"]


@pytest.mark.usefixtures("one_thread")
def test_checkpoint_rebuilds_the_modern_model_in_sample_py(pixels, tmp_path):
    assert run_main(pixel_args(pixels, tmp_path, "--max-steps", 2, *MODERN_FLAGS)) is None
    ckpt = os.path.join(tmp_path, EXPERIMENT, "checkpoints", "0000002.pt")
    recorded = torch.load(ckpt, weights_only=True)["model_args"]
    assert {k: recorded[k] for k in ("pos", "rope_base", "qk_norm", "mlp", "norm")} == \
        dict(pos="rope", rope_base=100.0, qk_norm=True, mlp="swiglu", norm="rmsnorm")
    images = sample.main(["--ckpt", ckpt, "--sampler", "ddim", "--num-sampling-steps", "2", "--output",
                          str(tmp_path / "grid.png")])
    assert images.shape == (3, 8, 8, 1)
    model, _ = sampling.load_model(sample.parse_args(["--ckpt", ckpt]), torch.device("cpu"))
    assert (model.config.pos, model.config.rope_base, model.model_args["qk_norm"]) == ("rope", 100.0, True)
    # resuming keeps the options; a sampling flag that changes the weights is refused in one line
    assert run_main(pixel_args(pixels, tmp_path, "--max-steps", 3, *MODERN_FLAGS, "--resume", "auto")) is None
    with pytest.raises(cli.UserError, match="qk-norm"):
        sampling.load_model(sample.parse_args(["--ckpt", ckpt, "--no-qk-norm"]), torch.device("cpu"))
    # flags that change no shapes would run the same weights as another network: refused too
    for flags, words in ((["--norm", "layernorm"], "trained with --norm rmsnorm"),
                         (["--rope-base", "10000"], "trained with --rope-base 100.0"),
                         (["--pos", "none"], "trained with --pos rope")):
        with pytest.raises(cli.UserError, match=words):
            sampling.load_model(sample.parse_args(["--ckpt", ckpt, *flags]), torch.device("cpu"))
    model, _ = sampling.load_model(sample.parse_args(["--ckpt", ckpt, "--norm", "rmsnorm"]), torch.device("cpu"))
    assert model.model_args["norm"] == "rmsnorm"  # the checkpoint's own value is fine


def test_a_sampler_that_does_not_fit_is_one_line(trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: sample.main(["--ckpt", trained["flow"], "--sampler", "ddim",
                                     "--output", str(tmp_path / "x.png")]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and lines == ["error: --sampler ddim needs an eps or v checkpoint; this one was trained "
                                           "with flow: use heun, euler, dopri5 or sde"]


LABELS = [1, 2, 3, 4, 5, 6, 7, 0]


def run_cli(main, argv, capsys):
    """cli.run(main) in-process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: main(argv))
    return e.value.code, capsys.readouterr().err


def test_sample_py_writes_the_original_image(tmp_path):
    """sample.py in a subprocess (tiny VAE under the real hub id, offline) against the original
    sample.py's steps run directly: same seed, same PNG bytes."""
    ckpt = tiny_dit.write_checkpoint(tmp_path / "tiny.pt", image_size=32)
    env = {**os.environ, **tiny_vae.hub_cache(tmp_path), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    seed, steps, cfg = 3, 10, 4.0
    subprocess.run([sys.executable, str(ROOT / "tests" / "tiny_dit.py"), str(ROOT / "sample.py"),
                    "--ckpt", str(tmp_path / "tiny.pt"), "--seed", str(seed), "--num-sampling-steps", str(steps),
                    "--class-labels", " ".join(map(str, LABELS)), "--output", str(tmp_path / "sample.png")],
                   env=env, check=True, cwd=tmp_path)

    # The original sample.py, step by step.
    from diffusers.models import AutoencoderKL
    from torchvision.utils import save_image

    torch.manual_seed(seed)
    model = tiny_dit.tiny(input_size=4, num_classes=10)
    model.load_state_dict(ckpt["ema"])
    model.eval()
    diffusion = create_diffusion(str(steps))
    vae = AutoencoderKL.from_pretrained(os.path.join(tmp_path, "hub", "models--stabilityai--sd-vae-ft-ema",
                                                     "snapshots", tiny_vae.COMMIT))
    n = len(LABELS)
    z = torch.randn(n, 4, 4, 4)
    y = torch.tensor(LABELS)
    z = torch.cat([z, z], 0)
    y = torch.cat([y, torch.tensor([10] * n)], 0)
    with torch.no_grad():
        samples = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                          model_kwargs=dict(y=y, cfg_scale=cfg), progress=False, device="cpu")
        samples, _ = samples.chunk(2, dim=0)
        samples = vae.decode(samples / 0.18215).sample
    save_image(samples, tmp_path / "reference.png", nrow=4, normalize=True, value_range=(-1, 1))

    ours = np.asarray(Image.open(tmp_path / "sample.png"))
    reference = np.asarray(Image.open(tmp_path / "reference.png"))
    assert ours.shape == reference.shape == (2 + 2 * 34, 2 + 4 * 34, 3)
    assert ours.std() > 5  # a real image, not a constant
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("sampler, steps", [("ddpm", 6), ("ddim", 5), ("dpm-solver", 5)])
def test_sample_returns_images_and_saves_grid_and_singles(tmp_path, pixel_ckpt, sampler, steps):
    out = str(tmp_path / "grid.png")
    images = sample.main(["--ckpt", pixel_ckpt, "--sampler", sampler, "--num-sampling-steps", str(steps),
                          "--class-labels", "0 1 2 9", "--output", out, "--save-individual", "--seed", "1"])
    assert images.dtype == np.uint8 and images.shape == (4, 8, 8, 1)  # size and channels from the checkpoint
    assert images.std() > 0
    assert Image.open(out).size == (2 + 4 * 10, 2 + 10)
    for i in range(4):
        single = np.asarray(Image.open(tmp_path / f"grid-{i:03d}.png"))
        np.testing.assert_array_equal(single, images[i, ..., 0])
    again = sample.main(["--ckpt", pixel_ckpt, "--sampler", sampler, "--num-sampling-steps", str(steps),
                         "--class-labels", "0 1 2 9", "--output", out, "--seed", "1"])
    np.testing.assert_array_equal(again, images)


def test_bad_input_gives_one_line_errors(tmp_path, pixel_ckpt, capsys):
    base = ["--ckpt", pixel_ckpt, "--output", str(tmp_path / "x.png"), "--num-sampling-steps", "2"]
    cases = [
        (["--class-labels", "3 10"], ["class label 10", "[0, 9]"]),
        (["--sampler", "ddim", "--num-sampling-steps", "300"], ["300", "ddim", '"ddimN"', "comma-separated"]),
        (["--num-sampling-steps", "0"], ["at least 1"]),
        (["--image-size", "9"], ["--image-size 9", "multiples of 2"]),
        (["--model", "DiT-S/2"], ["--model DiT-S/2 does not match the checkpoint", "DiT-TestTiny/2", "drop --model"]),
        (["--model", "DiT-Q/2"], ["'DiT-Q/2'", "DiT-XL/2", "DiT-S/8"]),
    ]
    for extra, expected in cases:
        code, err = run_cli(sample.main, base + extra, capsys)
        lines = [line for line in err.splitlines() if "error:" in line]  # ours, or argparse's after its usage
        assert code == 2 and len(lines) == 1, (extra, err)
        for text in expected:
            assert text in lines[0], (extra, lines[0])


def test_cfg_scale_below_one_warns(tmp_path, pixel_ckpt):
    with pytest.warns(UserWarning, match="below 1"):
        sample.main(["--ckpt", pixel_ckpt, "--cfg-scale", "0.5", "--num-sampling-steps", "2",
                     "--output", str(tmp_path / "x.png")])


def test_checkpoint_with_pickled_code_is_refused_by_sample_py(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))
    torch.save({"ema": {}, "args": {"model": Payload()}}, tmp_path / "evil.pt")
    code, err = run_cli(sample.main, ["--ckpt", str(tmp_path / "evil.pt"), "--output", str(tmp_path / "x.png")],
                        capsys)
    assert code == 2 and "refused" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_class_labels_as_separate_arguments_quoted_or_with_commas(tmp_path, pixel_ckpt):
    """The tutorials' `--class-labels 207 360 ...` (separate arguments) and the quoted forms agree."""
    base = ["--ckpt", pixel_ckpt, "--num-sampling-steps", "2", "--seed", "4", "--output", str(tmp_path / "x.png")]
    separate = sample.main(base + ["--class-labels", "3", "1", "4"])
    assert separate.shape[0] == 3
    np.testing.assert_array_equal(sample.main(base + ["--class-labels", "3 1 4"]), separate)
    np.testing.assert_array_equal(sample.main(base + ["--class-labels", "3,1,4"]), separate)
    assert (sample.main(base + ["--class-labels", "3", "1", "5"])[2] != separate[2]).any()  # the labels count


def one_error_line(main, argv, capsys):
    """(exit code, the one error line) of a command-line run; argparse's own errors count too."""
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: main(argv))
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return e.value.code, lines[0]


@pytest.mark.parametrize("extra, expected", [
    (["--cfg-scale", "nan"], ["--cfg-scale", "finite"]),
    (["--cfg-scale", "inf"], ["--cfg-scale", "finite"]),
    (["--image-size", "-8"], ["--image-size", "-8"]),
    (["--image-size", "0"], ["--image-size", "0"]),
    (["--nrow", "0"], ["--nrow", "at least 1"]),
    (["--vae-batch-size", "0"], ["--vae-batch-size", "at least 1"]),
    (["--output", "grid.xyz"], ["--output", ".xyz", ".png"]),
    (["--output", "grid"], ["--output", "no extension"]),
    (["--output", "{file}/grid.png"], ["--output", "{file}", "is a file, not a folder"]),
    (["--output", "{file}/sub/grid.png"], ["--output", "cannot write", "{file}"]),
])
def test_values_that_would_fail_after_sampling_are_refused_first(tmp_path, capsys, extra, expected):
    """The checkpoint does not exist: an error about it would mean the check came too late."""
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the output folder should be")
    extra = [x.replace("{file}", str(blocker)) for x in extra]
    code, line = one_error_line(sample.main, ["--ckpt", str(tmp_path / "missing.pt"), "--output",
                                              str(tmp_path / "x.png"), *extra], capsys)
    assert code == 2
    for text in expected:
        assert text.replace("{file}", str(blocker)) in line, line


# ------------------------------------------------------------------ issue 24: faults
def nan_checkpoint(tmp_path, pixel_ckpt, name="blocks.1.mlp.fc2.weight"):
    ckpt = torch.load(pixel_ckpt, weights_only=True)
    ckpt["ema"][name][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(ckpt, path)
    return str(path)


def test_nan_weights_are_refused_at_load_naming_the_tensor(tmp_path, pixel_ckpt, capsys):
    bad = nan_checkpoint(tmp_path, pixel_ckpt)
    code, err = run_cli(sample.main, ["--ckpt", bad, "--output", str(tmp_path / "x.png")], capsys)
    assert code == 2 and bad in err and "NaN or infinite weights" in err and "blocks.1.mlp.fc2.weight" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "x.png").exists()
    with pytest.raises(cli.UserError, match="blocks.1.mlp.fc2.weight"):  # digits.py score's way in
        sampling.generate_from_checkpoint(bad, [0, 1])


def test_a_huge_cfg_scale_stops_in_one_line_before_saving(tmp_path, pixel_ckpt, capsys):
    code, err = run_cli(sample.main, ["--ckpt", pixel_ckpt, "--cfg-scale", "1e30", "--num-sampling-steps", "3",
                                      "--output", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "NaN or infinite values" in err and "--cfg-scale 1e+30" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists()


def test_an_output_that_is_a_folder_is_refused_before_sampling(tmp_path, pixel_ckpt, capsys, monkeypatch):
    (tmp_path / "out.png").mkdir()
    monkeypatch.setattr(sampling, "load_model", lambda *a: pytest.fail("loaded the model first"))
    code, err = run_cli(sample.main, ["--ckpt", pixel_ckpt, "--output", str(tmp_path / "out.png")], capsys)
    assert code == 2 and "is a folder, not a file" in err and "out.png" in err and err.count("\n") == 1, err


def test_vae_on_a_pixel_checkpoint_names_the_space_not_the_size(tmp_path, pixel_ckpt, capsys):
    code, err = run_cli(sample.main, ["--ckpt", pixel_ckpt, "--vae", "ema", "--output", str(tmp_path / "x.png")],
                        capsys)
    assert code == 2 and "pixel-space model" in err and "drop --vae" in err and "--image-size" not in err, err


@pytest.mark.parametrize("sampler,steps", [(None, 250), ("ddpm", 250), ("ddim", 50), ("dpm-solver", 25)])
def test_each_sampler_runs_its_own_default_step_count(sampler, steps, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # --help unwrapped
    args = sample.parse_args([] if sampler is None else ["--sampler", sampler])
    chosen = sampling.make_sampler(args.sampler, args.num_sampling_steps, None, **sampling.sampler_options(args))
    assert (chosen.name, chosen.steps) == (sampler or "ddpm", steps)
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    assert "ddpm 250, ddim 50, dpm-solver 25" in capsys.readouterr().out


def test_offline_hub_id_is_one_quick_line_naming_the_network(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    for ckpt in ("facebook/DiT-XL-2-256", str(tmp_path / "tiny.pt")):  # the DiT from the hub; the VAE from it
        tiny_dit.write_checkpoint(tmp_path / "tiny.pt", image_size=16)
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "tiny_dit.py"), str(ROOT / "sample.py"), "--ckpt",
                               ckpt, "--output", str(tmp_path / "x.png")], env=env, capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "HF_HUB_OFFLINE is set" in done.stderr and "no copy is cached" in done.stderr, done.stderr


def test_an_unresolvable_hub_host_is_one_line_without_asking_it(tmp_path, monkeypatch):
    import socket

    import huggingface_hub.constants

    import vae as vae_lib

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))

    def no_name_lookup(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_name_lookup)
    with pytest.raises(cli.UserError, match="no network: the hub's host .* does not resolve.*--vae-path"):
        vae_lib.load_vae("mse")


def test_sample_py_needs_no_flags_for_a_non_square_checkpoint(pixel_run, tmp_path, capsys):
    _, ckpt = pixel_run
    images = sample.main(["--ckpt", ckpt, "--num-sampling-steps", "3", "--class-labels", "0", "1",
                          "--output", str(tmp_path / "grid.png"), "--save-individual"])
    assert images.shape == (2, 8, 16, 1)
    assert Image.open(tmp_path / "grid-000.png").size == (16, 8)  # 8 high, 16 wide
    assert "warning" not in capsys.readouterr().err


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
