"""sample.py and sampling.py: the original's image for the same seed, the samplers, guidance,
the DPM-Solver wiring, and one-line errors for bad input."""
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import sample
import sampling
import tiny_dit
import tiny_vae
from conftest import ROOT
from diffusion import create_diffusion, samplers
from diffusion.dpm_solver import dpm_solver_sample_loop

tiny_dit.register()
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


def loaded(ckpt):
    args = SimpleNamespace(model=None, image_size=None, num_classes=None, vae=None, vae_path=None, ckpt=ckpt)
    return sampling.load_model(args, torch.device("cpu"))


def test_cfg_scale_one_runs_the_plain_conditional_model(pixel_ckpt):
    model, settings = loaded(pixel_ckpt)
    assert (settings.model, settings.image_size, settings.in_channels, settings.vae) == (
        tiny_dit.TINY_MODEL, 8, 1, "none")
    noise = torch.randn(3, 1, 8, 8)
    labels = [4, 5, 6]
    sampler = sampling.make_sampler("ddim", 5)
    ours, _ = sampling.generate(model, sampler, labels, 1.0, noise)
    direct = sampler.diffusion.ddim_sample_loop(model, noise.shape, noise, clip_denoised=False,
                                                model_kwargs=dict(y=torch.tensor(labels)), device="cpu")
    torch.testing.assert_close(ours, direct, rtol=0, atol=0)
    guided, _ = sampling.generate(model, sampler, labels, 4.0, noise)
    assert guided.shape == ours.shape and (guided - ours).abs().max() > 1e-3


def test_seeded_ddpm_equals_the_ancestral_loop_for_the_same_noise(pixel_ckpt):
    model, _ = loaded(pixel_ckpt)
    noise = torch.randn(2, 1, 8, 8)
    sampler = sampling.make_sampler("ddpm", 8)
    torch.manual_seed(5)
    reference, _ = sampling.generate(model, sampler, [3, 7], 1.0, noise)  # global RNG, as the original
    torch.manual_seed(5)
    seeded, _ = sampling.generate(model, sampler, [3, 7], 1.0, noise, step_noise=lambda: torch.randn(2, 1, 8, 8))
    torch.testing.assert_close(seeded, reference, rtol=0, atol=1e-6)


def test_generate_from_checkpoint_seeds_each_sample_by_its_index(pixel_ckpt):
    labels = [3, 1, 4, 1]
    images = sampling.generate_from_checkpoint(pixel_ckpt, labels, cfg_scale=2.0, sampler="ddpm",
                                               num_sampling_steps=3, seed=7, batch_size=2)
    assert images.dtype == np.uint8 and images.shape == (4, 8, 8, 1)
    first = sampling.generate_from_checkpoint(pixel_ckpt, labels[:2], cfg_scale=2.0, sampler="ddpm",
                                              num_sampling_steps=3, seed=7, batch_size=2)
    np.testing.assert_array_equal(first, images[:2])
    other_seed = sampling.generate_from_checkpoint(pixel_ckpt, labels[:2], cfg_scale=2.0, sampler="ddpm",
                                                   num_sampling_steps=3, seed=8, batch_size=2)
    assert (other_seed != first).any()


def gaussian_eps_model(mu, std, channels=4, variance_junk=0.0):
    """The exact noise prediction for data ~ N(mu, std^2): its probability-flow ODE has a closed form."""
    alphas_cumprod = torch.tensor(create_diffusion("").alphas_cumprod, dtype=torch.float32)

    def model(x, t):
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * std ** 2 + 1 - a)
        return torch.cat([eps, torch.full_like(eps, variance_junk)], 1)

    def exact(noise):
        a = alphas_cumprod[-1]
        return mu + std * (noise - a.sqrt() * mu) / (a * std ** 2 + 1 - a).sqrt()
    return model, exact


def test_dpm_solver_converges_to_the_exact_ode_solution_far_faster_than_ddim():
    """Gaussian data: the exact ODE endpoint is known. A solver fed shifted timesteps or another
    schedule's alphas misses it by 0.15 or more at 25 steps."""
    model, exact = gaussian_eps_model(mu=0.5, std=0.5)
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    target = exact(noise)
    betas = sampling.make_sampler("dpm-solver", 25).diffusion.betas
    solver_25 = (dpm_solver_sample_loop(model, noise, betas, 25) - target).abs().max()
    solver_50 = (dpm_solver_sample_loop(model, noise, betas, 50) - target).abs().max()
    ddim = sampling.make_sampler("ddim", 25).diffusion
    ddim_25 = (ddim.ddim_sample_loop(model, noise.shape, noise, clip_denoised=False, device="cpu")
               - target).abs().max()
    assert solver_25 < 0.08 and solver_25 < ddim_25 / 3 and solver_50 < 0.01, (solver_25, solver_50, ddim_25)


def test_dpm_solver_uses_all_noise_channels_and_ignores_the_variance_half():
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    betas = create_diffusion("").betas
    model, _ = gaussian_eps_model(mu=0.2, std=0.5)
    junk, _ = gaussian_eps_model(mu=0.2, std=0.5, variance_junk=1e3)
    clean = dpm_solver_sample_loop(model, noise, betas, 10)
    torch.testing.assert_close(dpm_solver_sample_loop(junk, noise, betas, 10), clean, rtol=0, atol=0)

    def fourth_channel_off(x, t):  # a solver that read only three channels would not notice
        out = model(x, t)
        out[:, 3] = 0
        return out
    assert (dpm_solver_sample_loop(fourth_channel_off, noise, betas, 10) - clean)[:, 3].abs().max() > 0.1


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


def test_nonfinite_cfg_scale_is_refused_from_python_too():
    for value in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(cli.UserError, match="finite"):
            sampling.check_cfg_scale(value)


def test_a_sampler_is_one_entry_of_the_table(tmp_path, pixel_ckpt, monkeypatch):
    """An entry added to diffusion/samplers.py's table is a --sampler choice of sample.py, runs
    through generate with its own default steps, and counts its model evaluations."""
    def one_step(process, job):  # x_0 from a single noise prediction at the noisiest timestep
        t = torch.full((len(job.noise),), process.num_timesteps - 1, dtype=torch.long)
        eps = job.model(job.noise, t, **job.model_kwargs)[:, :job.noise.shape[1]]
        return process._predict_xstart_from_eps(job.noise, t, eps)
    monkeypatch.setitem(samplers.SAMPLERS, "one-step", samplers.SamplerEntry(
        "one-step", ("eps",), one_step, "a test's toy", steps=1, process=samplers._respaced("{}")))
    sampler = sampling.make_sampler("one-step", None)
    assert (sampler.name, sampler.steps, sampler.diffusion.num_timesteps) == ("one-step", 1, 1)
    model, _ = loaded(pixel_ckpt)
    latents, stats = sampling.generate(model, sampler, [1, 2], 3.0, torch.randn(2, 1, 8, 8))
    assert latents.shape == (2, 1, 8, 8) and stats.nfe == 1
    images = sample.main(["--ckpt", pixel_ckpt, "--sampler", "one-step", "--class-labels", "1 2",
                          "--output", str(tmp_path / "x.png")])
    assert images.shape == (2, 8, 8, 1) and images.std() > 0


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
