"""train.py on CPU: DDP over two gloo processes against one process, exact resumption after
SIGKILL, the ADM crop and data handling, and one-line errors for bad input.

A tiny named config (tests/tiny_dit.py, also used as a launcher for subprocesses) keeps every
run to a few seconds; images are 8x8 greyscale in pixel space.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image

import cli
import data
import diffusion
import distributed
import finetune
import models
import runs
import sample
import sampling
import tiny_dit
import train
from conftest import (BLOCK_TINY, EXPERIMENT, FLOW_ARGS, MODEL, ROOT, STEPS, TINY, assert_close_to_golden,
                      checkpoint, metrics, pixel_args, random_model, run_main, subprocess_env, torchrun, train_pixels,
                      write_eval_ref, write_images)
from diffusion import create_process, samplers
from models import BLOCKS, DiT

tiny_dit.register()


@pytest.mark.usefixtures("one_thread")
def test_every_block_is_a_training_flag_that_reaches_the_model():
    """--block's choices and default come from models.DiTConfig: each parses and builds its block."""
    for block in BLOCKS:
        args = train.parse_args(["--data-path", "x", "--block", block])
        assert cli.model_variant_args(args)["block"] == block and DiT(**BLOCK_TINY, block=block).config.block == block
    assert train.apply_checkpoint_settings(train.parse_args(["--data-path", "x"]), None).block == "adaLN-Zero"
    with pytest.raises(SystemExit):
        train.parse_args(["--data-path", "x", "--block", "adaLN-zero"])


def test_train_passes_dist_timeout_min_default_30(monkeypatch, tmp_path):
    seen = []

    def record(device=None, timeout_min=None):
        seen.append(timeout_min)
        raise cli.UserError("stop before joining")

    monkeypatch.setattr(distributed, "setup", record)
    for extra, expected in (((), 30), (("--dist-timeout-min", "90"), 90)):
        with pytest.raises(cli.UserError, match="stop"):
            train.main(["--data-path", str(tmp_path), "--results-dir", str(tmp_path / "r"), *extra])
        assert seen[-1] == expected
    with pytest.raises(SystemExit):
        train.parse_args(["--dist-timeout-min", "0"])


# ------------------------------------------------------------------ part 3: the optimiser state's place
def fused_resume_state():
    """A CPU run's checkpoint (foreach AdamW, one step), and a State to restore it into on the meta
    device (a stand-in for CUDA) with --compile, which picks the fused kernel."""
    kwargs = dict(input_size=8, in_channels=1, num_classes=3)
    model = tiny_dit.tiny(**kwargs)
    opt = torch.optim.AdamW(model.parameters(), **train.adamw_kernel(torch.device("cpu")))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    ckpt = {"model_args": dict(model.model_args), "model": model.state_dict(), "ema": model.state_dict(),
            "opt": opt.state_dict(), "train_steps": 1}
    on_meta = tiny_dit.tiny(**kwargs).to("meta")
    args = argparse.Namespace(lr=1e-4, weight_decay=0.0, compile=True)
    state = train.State(on_meta, tiny_dit.tiny(**kwargs).to("meta"),
                        torch.optim.AdamW(on_meta.parameters(), **train.adamw_kernel(torch.device("meta"), True)),
                        torch.amp.GradScaler("cpu", enabled=False))
    return state, ckpt, args


@pytest.mark.filterwarnings("ignore:.*to a meta parameter")  # the weights themselves do not matter here
def test_a_cpu_checkpoint_resumed_for_the_fused_kernel_has_its_state_where_the_kernel_reads_it():
    state, ckpt, args = fused_resume_state()
    train.restore(state, ckpt, "ckpt.pt", args, steps_per_epoch=10)
    assert all(group["fused"] for group in state.opt.param_groups)
    for param in state.model.parameters():
        found = state.opt.state[param]
        assert found["step"].device == param.device and found["step"].dtype == torch.float32
        for key in ("exp_avg", "exp_avg_sq"):
            assert found[key].device == param.device and found[key].dtype == param.dtype
        param.grad = torch.zeros_like(param)
    state.opt.step()  # the fused kernel runs on the restored state
    assert all(state.opt.state[p]["step"].device == p.device for p in state.model.parameters())


def test_a_fused_checkpoint_resumed_for_foreach_keeps_step_on_the_cpu():
    """The other way (a GPU run's checkpoint resumed on CPU without --compile): foreach reads step on
    the CPU, as PyTorch's own loading leaves it."""
    kwargs = dict(input_size=8, in_channels=1, num_classes=3)
    model = tiny_dit.tiny(**kwargs)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    fresh = tiny_dit.tiny(**kwargs)
    other = torch.optim.AdamW(fresh.parameters(), foreach=True)
    other.load_state_dict(opt.state_dict())
    other.param_groups[0].update(train.adamw_kernel(torch.device("cpu")))
    train.place_optimizer_state(other)
    assert all(other.state[p]["step"].device.type == "cpu" for p in fresh.parameters())
    for p in fresh.parameters():
        p.grad = torch.ones_like(p)
    other.step()


# ------------------------------------------------------------------ flags and checkpoints
@pytest.mark.usefixtures("one_thread")
def test_flags_are_the_constructor_arguments():
    given = train.parse_args(["--data-path", "x", "--pos", "rope", "--mlp", "swiglu", "--norm", "rmsnorm", "--qk-norm",
                              "--rope-base", "100", "--context-tokens", "2", "--block", "mm-dit"])
    built = DiT(**TINY, **cli.model_variant_args(given)).model_args
    assert {k: built[k] for k in cli.model_variant_args(given)} == dict(
        pos="rope", mlp="swiglu", norm="rmsnorm", qk_norm=True, rope_base=100.0, context_tokens=2, block="mm-dit")
    defaults = cli.model_variant_args(train.apply_checkpoint_settings(train.parse_args(["--data-path", "x"]), None))
    assert defaults  # every variant flag gets the release's value
    assert DiT(**TINY, **defaults).model_args == DiT(**TINY).model_args  # training defaults: the release's
    args = sample.parse_args(["--ckpt", "x.pt"])
    assert cli.model_variant_args(args) == {}  # sampling keeps every option of the checkpoint
    assert cli.model_variant_args(sample.parse_args(["--ckpt", "x.pt", "--no-qk-norm"])) == {"qk_norm": False}


def test_each_objective_is_recorded_and_samples_from_the_checkpoint_alone(trained, tmp_path):
    expected = {"v": ({"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True, "objective": "v"},
                      True),
                "flow": ({"objective": "flow", "t_sampling": "logit-normal", "t_mean": 0.0, "t_scale": 0.8}, False)}
    for objective, path in trained.items():
        ckpt = torch.load(path, weights_only=True)
        assert (ckpt["diffusion_args"], ckpt["model_args"]["learn_sigma"]) == expected[objective]
        images = sample.main(["--ckpt", path, "--output", str(tmp_path / f"{objective}.png")])
        assert images.shape == (3, 8, 8, 1) and images.std() > 0


@pytest.mark.parametrize("flags, words", [
    (["--sampler", "heun"], "--sampler heun needs a flow checkpoint; this one was trained with eps"),
    (["--objective", "v", "--t-sampling", "uniform"], "--t-sampling only apply to --objective flow"),
    (["--objective", "flow", "--t-mean", "1"], "add --t-sampling logit-normal"),
    (["--objective", "flow", "--t-sampling", "logit-normal", "--t-scale", "0"], "--t-scale 0.0 must be positive"),
])
def test_train_refuses_objective_flags_that_do_not_fit_before_starting(pixels, tmp_path, flags, words, capsys):
    err = run_main(pixel_args(pixels, tmp_path, "--max-steps", 1, *flags), capsys)
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / EXPERIMENT)


# ------------------------------------------------------------------ resuming keeps the process
def copy_with_process(path, folder, diffusion_args=None):
    """The checkpoint at `path` copied into `folder` (outside any experiment folder), its recorded
    process replaced by diffusion_args where given."""
    ckpt = torch.load(path, weights_only=True)
    if diffusion_args is not None:
        ckpt["diffusion_args"] = diffusion_args
    copy = os.path.join(folder, f"resume-{len(os.listdir(folder))}.pt")
    torch.save(ckpt, copy)
    return copy


@pytest.mark.parametrize("objective", ["v", "flow"])
def test_a_resume_without_process_flags_continues_the_checkpoints_process(trained, pixels, tmp_path, objective):
    """--resume alone: the checkpoint's objective (and flow's logit-normal t) carry on, recorded
    again; repeating the flags changes nothing, bit for bit."""
    recorded = torch.load(trained[objective], weights_only=True)
    repeated = {"v": ["--objective", "v"], "flow": ["--objective", "flow", "--t-sampling", "logit-normal",
                                                    "--t-scale", "0.8"]}[objective]
    ema = {}
    for name, flags in (("alone", []), ("repeated", repeated)):
        results = tmp_path / name
        resume = copy_with_process(trained[objective], tmp_path)
        assert run_main(pixel_args(pixels, results, "--max-steps", 5, "--resume", resume, *flags)) is None
        ckpt = torch.load(os.path.join(results, EXPERIMENT, "checkpoints", "0000005.pt"), weights_only=True)
        assert ckpt["diffusion_args"] == recorded["diffusion_args"] and ckpt["model_args"] == recorded["model_args"]
        ema[name] = ckpt["ema"]
    assert all(torch.equal(ema["alone"][k], ema["repeated"][k]) for k in ema["repeated"])


@pytest.mark.parametrize("process, flags, words", [
    ({"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True}, ["--objective", "v"],
     "--objective v contradicts the checkpoint, trained with --objective eps; drop --objective (a resume continues "
     "the checkpoint's process)"),
    ({"objective": "flow", "t_sampling": "uniform"}, ["--t-sampling", "logit-normal"],
     "--t-sampling logit-normal contradicts the checkpoint, trained with --t-sampling uniform; drop --t-sampling"),
    ({"objective": "flow", "t_sampling": "uniform"}, ["--t-mean", "0.5"],
     "--t-mean 0.5 contradicts the checkpoint, trained with --objective flow --t-sampling uniform (no --t-mean)"),
    (None, ["--objective", "flow", "--t-sampling", "logit-normal", "--t-scale", "1.0"],
     "--t-scale 1.0 contradicts the checkpoint, trained with --t-scale 0.8; drop --t-scale"),
])
def test_a_resume_refuses_process_flags_that_contradict_the_checkpoint(trained, pixels, tmp_path, capsys, process,
                                                                       flags, words):
    """One line naming the flag, the checkpoint's value and the given one, before any folder is made."""
    resume = copy_with_process(trained["flow" if process is None else "v"], tmp_path, process)
    err = run_main(pixel_args(pixels, tmp_path / "results", "--max-steps", 5, "--resume", resume, *flags), capsys)
    assert err is not None and len(err.strip().splitlines()) == 1 and words in err, err
    assert not os.path.exists(tmp_path / "results" / EXPERIMENT)


# ------------------------------------------------------------------ eps as it was
def run_args(world_size, rank, objective="eps"):
    """(run, process) of a fresh run with --objective."""
    args = train.parse_args(["--model", "DiT-S/2", "--data-path", "x", "--global-batch-size", "8",
                             "--image-size", "8", "--vae", "none", "--objective", objective])
    args.input_size, args.in_channels = 8, 3
    train.apply_checkpoint_settings(args, None)
    run = SimpleNamespace(args=args, rank=rank, world_size=world_size, device=torch.device("cpu"))
    return run, create_process(args.diffusion_args)


def randomness(world_size, rank, objective, step):
    run, process = run_args(world_size, rank, objective)
    return train.step_randomness(run, step, 0.1, (3, 8, 8), process)


def test_eps_draws_are_the_releases_and_every_objective_splits_over_processes():
    flip, drop, t, latent_noise, noise = randomness(1, 0, "eps", 7)
    gen = torch.Generator().manual_seed(train.step_seed(0, 7))
    expected = [torch.rand(8, generator=gen) < 0.5, (torch.rand(8, generator=gen) < 0.1).long(),
                torch.randint(0, 1000, (8,), generator=gen), torch.randn((8, 4, 8, 8), generator=gen),
                torch.randn((8, 3, 8, 8), generator=gen)]
    for ours, theirs in zip((flip, drop, t, latent_noise, noise), expected):
        assert torch.equal(ours, theirs)
    for objective in ("eps", "v", "flow"):
        whole = randomness(1, 0, objective, 3)
        halves = [randomness(2, rank, objective, 3) for rank in (0, 1)]
        for i, draw in enumerate(whole):
            assert torch.equal(draw[0::2], halves[0][i]) and torch.equal(draw[1::2], halves[1][i])
    assert whole[2].dtype == torch.float32 and 0 <= whole[2].min() and whole[2].max() <= 1  # flow's t


def test_eps_defaults_are_unchanged():
    args = train.apply_checkpoint_settings(train.parse_args(["--model", "DiT-S/2", "--data-path", "x"]), None)
    assert args.diffusion_args == {"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True}
    assert diffusion.process_model_args(args.diffusion_args) == {"learn_sigma": True}  # DiT's default
    sampler = sampling.make_sampler(args.sampler, args.num_sampling_steps, args.diffusion_args,
                                    **sampling.sampler_options(args))
    assert (sampler.name, sampler.steps, sampler.objective, sampler.cfg_interval) == ("ddpm", 250, "eps", None)
    assert not sampler.guide_all_channels  # the release's quirk: three channels guided
    digits_sampler = sampling.make_sampler(None, None, None, default=("ddim", 50))
    assert (digits_sampler.name, digits_sampler.steps) == ("ddim", 50)
    flow_sampler = sampling.make_sampler(None, None, FLOW_ARGS, default=("ddim", 50))
    assert (flow_sampler.name, flow_sampler.steps) == ("heun", samplers.SAMPLERS["heun"].steps)


def test_non_square_checkpoint_records_its_size(pixel_run):
    _, ckpt_path = pixel_run
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["model_args"]["input_size"] == [8, 16] and ckpt["args"]["image_size"] == [8, 16]


def test_square_runs_record_what_they_always_did(pixel_run, tmp_path):
    root, _ = pixel_run
    ckpt = torch.load(train_pixels(root / "photos", tmp_path / "a", "8x8"), weights_only=True)
    assert ckpt["args"]["image_size"] == 8 and ckpt["args"]["input_size"] == 8
    assert ckpt["model_args"]["input_size"] == 8
    same = torch.load(train_pixels(root / "photos", tmp_path / "b", "8"), weights_only=True)
    for name, value in ckpt["ema"].items():
        assert torch.equal(value, same["ema"][name]), name


def adamw_steps(kernel):
    model = random_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **kernel)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return model.state_dict()


def test_adamw_kernels_match_the_default_loop():
    """Default CPU: foreach, bit for bit the loop; the fast mode's fused kernel within float32 rounding."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert train.adamw_kernel(cpu) == {"foreach": True, "fused": None}
    assert train.adamw_kernel(cuda)["fused"] and train.adamw_kernel(cpu, fast=True)["fused"]
    loop, foreach, fused = (adamw_steps(kernel) for kernel in ({}, train.adamw_kernel(cpu),
                                                                 train.adamw_kernel(cpu, fast=True)))
    for name in loop:
        assert torch.equal(loop[name], foreach[name]), name
        assert_close_to_golden(fused[name], loop[name])


def test_ddp_over_gloo_uses_small_buckets_and_the_same_gradients(tmp_path):
    """train.wrap_ddp: GLOO_BUCKET_MB buckets on CPU (a one-rank gloo group stands in for the ranks), and
    the gradients, views of those buckets, equal the plain model's bit for bit."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    plain = nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(4)))  # 16 MB of gradients: several buckets
    model = nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(4)))
    model.load_state_dict(plain.state_dict())
    x = torch.randn(8, 1024)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = train.wrap_ddp(SimpleNamespace(world_size=2, device=torch.device("cpu")), model)
        assert ddp.bucket_bytes_cap == train.GLOO_BUCKET_MB * 1024 * 1024
        ddp(x).square().mean().backward()
    finally:
        dist.destroy_process_group()
    plain(x).square().mean().backward()
    for p, q in zip(plain.parameters(), model.parameters()):
        assert torch.equal(p.grad, q.grad)
    one_rank = SimpleNamespace(world_size=1, device=torch.device("cpu"))
    assert train.wrap_ddp(one_rank, plain) is plain


@pytest.mark.slow
def test_train_compile_matches_the_default_run(tmp_path):
    pixels = write_images(tmp_path / "pixels")
    for flags, folder in (((), "plain"), (("--compile",), "fast")):
        assert run_main(pixel_args(pixels, tmp_path / folder, "--max-steps", 2, *flags)) is None
    ours, ref = checkpoint(tmp_path / "fast", 2), checkpoint(tmp_path / "plain", 2)
    for key in ("model", "ema"):
        for name in ref[key]:
            assert_close_to_golden(ours[key][name], ref[key][name])
    assert ref["opt"]["param_groups"][0]["foreach"] is True and ours["opt"]["param_groups"][0]["fused"] is True


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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_nan_stop_names_a_checkpoint_that_resumes(pixels, tmp_path, capsys):
    assert run_main(pixel_args(pixels, tmp_path, "--max-steps", 2)) is None
    ckpt_dir = os.path.join(tmp_path, EXPERIMENT, "checkpoints")
    # The first update at lr 1e30 ruins the weights, though the loss computed before it was finite.
    err = run_main(pixel_args(pixels, tmp_path, "--max-steps", 6, "--ckpt-every", 1, "--lr", 1e30,
                              "--resume", "auto"), capsys)
    named = os.path.join(ckpt_dir, "0000002.pt")
    assert "NaN or infinite" in err and named in err and err.count("\n") == 1, err
    assert sorted(os.listdir(ckpt_dir)) == ["0000002.pt"]  # no checkpoint of the ruined weights
    assert run_main(pixel_args(pixels, tmp_path, "--max-steps", 4, "--resume", named)) is None
    assert all(np.isfinite(r["loss"]) for r in metrics(tmp_path))
    assert all(torch.isfinite(v).all() for v in checkpoint(tmp_path, 4)["model"].values())


def test_nan_before_any_checkpoint_says_so(pixels, tmp_path, capsys):
    err = run_main(pixel_args(pixels, tmp_path, "--max-steps", 6, "--ckpt-every", 1, "--lr", 1e30), capsys)
    assert "none (none was written yet)" in err, err
    assert os.listdir(os.path.join(tmp_path, EXPERIMENT, "checkpoints")) == []


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


def test_eval_every_logs_fid(pixels, tmp_path, monkeypatch):
    import evaluate
    import inception_stub

    # A cheap 16-dimensional stand-in for the Inception network, so a few dozen samples give a proper FID.
    monkeypatch.setattr(evaluate, "load_inception", lambda device: inception_stub.TinyFeatures(cache_key=None))
    ref = write_eval_ref(tmp_path / "ref.npz")
    assert run_main(pixel_args(pixels, tmp_path, "--max-steps", 2, "--eval-every", 2, "--eval-ref", ref,
                               "--eval-num-samples", 24, "--num-sampling-steps", 2)) is None
    evals = [r for r in metrics(tmp_path) if "fid" in r]
    assert len(evals) == 1 and evals[0]["step"] == 2 and evals[0]["eval_num_samples"] == 24
    assert np.isfinite(evals[0]["fid"]) and evals[0]["fid"] > 0


def test_resume_from_an_earlier_checkpoint_keeps_the_first_run(pixels, reference, tmp_path):
    import shutil

    first = tmp_path / "results"
    shutil.copytree(reference, first)
    experiment = first / EXPERIMENT
    before = {p: p.read_bytes() for p in experiment.rglob("*") if p.is_file() and p.name != "log.txt"}
    resume = experiment / "checkpoints" / "0000004.pt"
    assert run_main(pixel_args(pixels, first, "--max-steps", 6, "--ckpt-every", 1, "--keep-last", 1,
                               "--resume", resume)) is None
    after = {p: p.read_bytes() for p in before}
    assert after == before  # nothing of the first run deleted or overwritten
    new = first / ("001-" + MODEL.replace("/", "-"))
    assert sorted(os.listdir(new / "checkpoints")) == ["0000006.pt"]
    assert "new folder" in (new / "log.txt").read_text()
    assert [r["step"] for r in metrics_in(new)] == [5, 6]


def metrics_in(experiment):
    with open(experiment / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_resume_auto_takes_the_highest_number_and_skips_a_truncated_checkpoint(pixels, reference, tmp_path, capsys):
    import shutil

    results = tmp_path / "results"
    for number in ("999", "1000"):
        shutil.copytree(reference / EXPERIMENT, results / f"{number}-{EXPERIMENT[4:]}")
    newest = results / f"1000-{EXPERIMENT[4:]}" / "checkpoints"
    whole = (newest / "0000008.pt").read_bytes()
    (newest / "0000008.pt").write_bytes(whole[: len(whole) // 2])  # cut off by a crash
    (newest / ".tmp-abc123.pt").write_bytes(b"partial")  # left by a save killed mid-write
    assert run_main(pixel_args(pixels, results, "--max-steps", 8, "--resume", "auto")) is None
    err = capsys.readouterr().err
    assert "0000008.pt" in err and "skipping" in err, err
    assert not (newest / ".tmp-abc123.pt").exists()
    assert (newest / "0000008.pt").read_bytes() == whole[: len(whole) // 2]  # left for the user to inspect
    continued = results / f"1001-{EXPERIMENT[4:]}"
    ours, ref = torch.load(continued / "checkpoints" / "0000008.pt", weights_only=True), checkpoint(reference, STEPS)
    assert all(torch.equal(ours["ema"][k], ref["ema"][k]) for k in ref["ema"])  # resumed at 4, exact


@pytest.mark.parametrize("flag,value,words", [("--ema-decay", 2, "--ema-decay 2.0 is out of range"),
                                              ("--lr", -1, "--lr -1.0 is out of range"),
                                              ("--image-size", -8, "--image-size: must be at least 1"),
                                              ("--cfg-scale", "nan", "--cfg-scale: must be a finite number")])
def test_nonsense_values_name_the_flag(pixels, tmp_path, capsys, flag, value, words):
    args = pixel_args(pixels, tmp_path, "--max-steps", 1)
    if flag in args:
        args[args.index(flag) + 1] = str(value)
    else:
        args += [flag, str(value)]
    try:
        err = run_main(args, capsys)
    except SystemExit:  # argparse's own one-line error
        err = capsys.readouterr().err
    assert words in err and err.strip().splitlines()[-1].count("error") == 1, err
    assert not os.path.exists(tmp_path / EXPERIMENT)


def test_full_disk_during_a_save_is_one_line(pixels, tmp_path, capsys, monkeypatch):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("train_steps") == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    err = run_main(pixel_args(pixels, tmp_path, "--max-steps", 3, "--ckpt-every", 1), capsys)
    assert "the disk is full" in err and "0000002.pt" in err and "intact" in err and err.count("\n") == 1, err
    ckpt_dir = os.path.join(tmp_path, EXPERIMENT, "checkpoints")
    assert os.listdir(ckpt_dir) == ["0000001.pt"]  # the temp file of the failed save is gone too


def test_results_dir_that_is_a_file(pixels, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    for results in (tmp_path / "file", tmp_path / "file" / "below"):
        err = run_main(pixel_args(pixels, results, "--max-steps", 1), capsys)
        assert err.startswith("error: ") and err.count("\n") == 1 and "--results-dir" in err, err


def test_tensorboard_logger_gets_the_metrics_and_grids(pixels, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run_main(pixel_args(pixels, tmp_path, "--max-steps", 2, "--logger", "tensorboard", "--sample-every", 2,
                               "--num-sampling-steps", 2)) is None
    events = EventAccumulator(str(tmp_path / EXPERIMENT / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    logged = metrics(tmp_path)
    assert [e.step for e in events.Scalars("loss")] == [r["step"] for r in logged] == [1, 2]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    assert [e.step for e in events.Images("samples")] == [2]


def test_eval_ref_at_another_resolution_is_refused_up_front(pixels, tmp_path, capsys):
    ref = tmp_path / "ref32.npz"
    np.savez(ref, np.zeros((4, 32, 32, 3), dtype=np.uint8))
    err = run_main(pixel_args(pixels, tmp_path, "--max-steps", 2, "--eval-every", 2, "--eval-ref", ref), capsys)
    assert "32x32 images but this run samples 8x8" in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / EXPERIMENT)


def test_checkpoints_of_the_earlier_format_resume_and_sample(pixels, reference, tmp_path, capsys):
    import sample

    old = checkpoint(reference, 4)
    for key in ("model_args", "diffusion_args", "format"):  # what checkpoints held before model_args existed
        old.pop(key)
    path = tmp_path / "old" / "0000004.pt"
    path.parent.mkdir()
    torch.save(old, path)
    assert run_main(pixel_args(pixels, tmp_path / "results", "--max-steps", STEPS, "--resume", path), capsys) is None
    resumed = torch.load(tmp_path / "results" / EXPERIMENT / "checkpoints" / f"{STEPS:07d}.pt", weights_only=True)
    ref = checkpoint(reference, STEPS)
    assert all(torch.equal(resumed["ema"][k], ref["ema"][k]) for k in ref["ema"])
    images = sample.main(["--ckpt", str(path), "--num-sampling-steps", "2", "--output", str(tmp_path / "s.png"),
                          "--class-labels", "0", "1"])
    assert images.shape == (2, 8, 8, 1)


# ------------------------------------------------------------------ a resume keeps the model
def bare_args(pixels, results, *extra):
    """pixel_args without any model flag: what `--resume auto` alone needs."""
    return ["--data-path", str(pixels), "--results-dir", str(results), "--global-batch-size", "8", "--log-every",
            "1", "--ckpt-every", "4", "--cpu-threads", "1", *map(str, extra)]


VARIANT = ("--block", "mm-dit", "--context-tokens", "2", "--pos", "rope", "--norm", "rmsnorm", "--qk-norm",
           "--mlp", "swiglu", "--objective", "v")


def test_resume_auto_alone_continues_the_checkpoints_model_and_process(pixels, tmp_path, capsys):
    """No --model or variant flag: the checkpoint's model_args (and diffusion_args) are the run's, and
    the next checkpoint records them unchanged, bit for bit the run that repeats every flag."""
    assert run_main(pixel_args(pixels, tmp_path / "flags", "--max-steps", 2, *VARIANT)) is None
    assert run_main(pixel_args(pixels, tmp_path / "flags", "--max-steps", 3, *VARIANT, "--resume", "auto")) is None
    assert run_main(pixel_args(pixels, tmp_path / "bare", "--max-steps", 2, *VARIANT)) is None
    assert run_main(bare_args(pixels, tmp_path / "bare", "--max-steps", 3, "--resume", "auto")) is None
    first, ours, theirs = (checkpoint(tmp_path / "bare", 2), checkpoint(tmp_path / "bare", 3),
                           checkpoint(tmp_path / "flags", 3))
    assert ours["model_args"] == first["model_args"] and ours["diffusion_args"] == first["diffusion_args"]
    assert ours["model_args"]["block"] == "mm-dit" and ours["diffusion_args"]["objective"] == "v"
    assert all(torch.equal(ours["ema"][k], theirs["ema"][k]) for k in theirs["ema"])


@pytest.mark.parametrize("flags, words", [
    (("--block", "adaLN-Zero"), "--block adaLN-Zero does not match the checkpoint, which was trained with --block mm-dit"),
    (("--num-classes", "5"), "--num-classes 5 does not match the checkpoint, which was trained with --num-classes 3"),
    (("--model", "DiT-S/2"), f"--model DiT-S/2 does not match the checkpoint, which was trained with --model {MODEL}"),
    (("--no-qk-norm",), "--qk-norm False does not match the checkpoint, which was trained with --qk-norm True"),
])
def test_resume_refuses_a_model_flag_that_contradicts_the_checkpoint(flags, words, pixels, tmp_path, capsys):
    """(--resume auto with --model X continues X's latest run: another model's is no contradiction there.)"""
    assert run_main(pixel_args(pixels, tmp_path, "--max-steps", 2, *VARIANT)) is None
    path = tmp_path / EXPERIMENT / "checkpoints" / "0000002.pt"
    err = run_main(bare_args(pixels, tmp_path, "--max-steps", 3, "--resume", path, *flags), capsys)
    assert err.count("\n") == 1 and words in err and "drop" in err, err
    assert sorted(os.listdir(tmp_path / EXPERIMENT / "checkpoints")) == ["0000002.pt"]  # nothing trained


# ------------------------------------------------------------------ issue 24: faults
@pytest.mark.parametrize("flag,value,words", [("--max-steps", 0, "--max-steps 0 is out of range"),
                                              ("--global-seed", 10**30, "--global-seed 1000000000000000000000000000000 "
                                                                        "is out of range")])
def test_max_steps_zero_and_a_huge_seed_are_one_line(pixels, tmp_path, capsys, flag, value, words):
    err = run_main(pixel_args(pixels, tmp_path, flag, value), capsys)
    assert words in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / EXPERIMENT)  # nothing written


@pytest.mark.parametrize("flag", ["--num-workers", "--cpu-threads"])
def test_negative_workers_and_threads_are_argparse_errors(pixels, tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as e:
        train.parse_args(pixel_args(pixels, tmp_path, flag, -1))
    assert e.value.code == 2 and f"{flag}: must be 0 or more, got -1" in capsys.readouterr().err


def test_a_finished_run_says_so_and_writes_nothing(pixels, tmp_path, capsys):
    assert run_main(pixel_args(pixels, tmp_path, "--max-steps", 2)) is None
    folder = tmp_path / EXPERIMENT
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(pixel_args(pixels, tmp_path, "--max-steps", 2, "--resume", "auto"))
    out = capsys.readouterr()
    assert e.value.code == 0 and "already complete at step 2" in out.err and "Training for" not in out.out, out
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before
    assert sorted(os.listdir(tmp_path)) == [EXPERIMENT]


def test_resume_on_other_data_is_refused_unless_allowed(pixels, tmp_path, capsys):
    results = tmp_path / "results"
    assert run_main(pixel_args(pixels, results, "--max-steps", 2)) is None
    other = write_images(tmp_path / "other", per_class=9, seed=1)
    err = run_main(pixel_args(other, results, "--max-steps", 3, "--resume", "auto"), capsys)
    assert "was trained on" in err and str(pixels) in err and str(other) in err and "--allow-data-change" in err, err
    assert "24 images" in err and "27 images" in err and err.count("\n") == 1, err
    assert not (results / EXPERIMENT / "checkpoints" / "0000003.pt").exists()
    assert run_main(pixel_args(other, results, "--max-steps", 3, "--resume", "auto", "--allow-data-change")) is None
    assert "continuing on the new data" in capsys.readouterr().err
    ckpt = checkpoint(results, 3)
    assert ckpt["args"]["data_identity"] == {"path": os.path.realpath(other), "images": 27,
                                             "classes": ["class0", "class1", "class2"]}


def test_a_folder_with_an_unreadable_image_resumes_as_the_same_data(tmp_path, capsys):
    """The run loads the images (and drops the broken one); the resume check only lists the folder: both
    count the same image files, so the resume is not taken for other data."""
    folder = write_images(tmp_path / "images")
    (folder / "class0" / "broken.png").write_bytes(b"not a png")
    results = tmp_path / "results"
    for steps, resume in ((2, ()), (3, ("--resume", "auto"))):
        with pytest.warns(UserWarning, match="skipping unreadable image .*broken.png"):
            assert run_main(pixel_args(folder, results, "--max-steps", steps, *resume), capsys) is None
    assert checkpoint(results, 3)["args"]["data_identity"]["images"] == 25  # 24 readable and the broken one


def test_a_second_run_cannot_take_a_locked_folder(pixels, tmp_path, capsys):
    assert run_main(pixel_args(pixels, tmp_path, "--max-steps", 2)) is None
    lock = tmp_path / EXPERIMENT / runs.LOCK_FILE
    host = __import__("socket").gethostname()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{host} {alive.pid}\n")
        err = run_main(pixel_args(pixels, tmp_path, "--max-steps", 3, "--resume", "auto"), capsys)
        assert f"in use by another training run (pid {alive.pid} on this host" in err and str(lock) in err, err
        assert not (tmp_path / EXPERIMENT / "checkpoints" / "0000003.pt").exists()
    finally:
        alive.kill()
        alive.wait()
    # The same lock, its process gone (killed: nothing removed it): taken over, saying so.
    assert run_main(pixel_args(pixels, tmp_path, "--max-steps", 3, "--resume", "auto")) is None
    assert f"taking over {lock}" in capsys.readouterr().err
    assert (tmp_path / EXPERIMENT / "checkpoints" / "0000003.pt").exists()
    assert lock.read_text() == f"{host} {os.getpid()}\n"  # this process's until it exits


# ------------------------------------------------------------------ accumulation, LR schedules, fine-tuning, unconditional
ACCUM_STEPS = 4  # steps of the accumulation runs: 24 images at batch 16, one step an epoch


def largest_difference(ours, theirs, key):
    return max((ours[key][k] - theirs[key][k]).abs().max().item() for k in theirs[key])


def assert_same_training(ours, theirs, report):
    """Weights within float rounding of each other (2e-6, as test_two_processes_match_one), after
    updates that moved them by far more (Adam's steps at lr 1e-4: about 1e-4 each)."""
    moved = largest_difference(theirs, {"model": theirs["ema"]}, "model")  # the EMA is near the start
    assert moved > 1e-4
    for key in ("model", "ema"):
        print(f"{report}: largest {key} difference {largest_difference(ours, theirs, key):.3g} (moved {moved:.3g})")
        for name in theirs[key]:
            torch.testing.assert_close(ours[key][name], theirs[key][name], atol=2e-6, rtol=1e-5, msg=f"{key}.{name}")


@pytest.fixture(scope="module")
def batch16(pixels, tmp_path_factory):
    """One process, global batch 16 in one go: the large batch that accumulation must match."""
    results = tmp_path_factory.mktemp("batch16")
    assert run_main(pixel_args(pixels, results, "--max-steps", ACCUM_STEPS, "--global-batch-size", 16)) is None
    return results


def test_grad_accumulation_matches_the_large_batch(pixels, batch16, tmp_path):
    """1 process x 4 micro-batches of 4 = 1 process x batch 16: weights and the logged loss."""
    assert run_main(pixel_args(pixels, tmp_path, "--max-steps", ACCUM_STEPS, "--global-batch-size", 16,
                               "--grad-accum-steps", 4)) is None
    assert_same_training(checkpoint(tmp_path, ACCUM_STEPS), checkpoint(batch16, ACCUM_STEPS), "1 process x 4")
    np.testing.assert_allclose([r["loss"] for r in metrics(tmp_path)], [r["loss"] for r in metrics(batch16)],
                               rtol=1e-5)


@pytest.mark.slow
def test_grad_accumulation_over_two_processes_matches_the_large_batch(pixels, batch16, tmp_path):
    """2 gloo processes x 2 micro-batches of 4 (DDP all-reduces after the second only) = batch 16."""
    torchrun("train.py", *pixel_args(pixels, tmp_path, "--max-steps", ACCUM_STEPS, "--global-batch-size", 16,
                                     "--grad-accum-steps", 2))
    assert_same_training(checkpoint(tmp_path, ACCUM_STEPS), checkpoint(batch16, ACCUM_STEPS), "2 processes x 2")
    np.testing.assert_allclose([r["loss"] for r in metrics(tmp_path)], [r["loss"] for r in metrics(batch16)],
                               rtol=1e-5)


def test_micro_batches_must_split_each_process_batch():
    import argparse
    import types

    # 12 images split into 4 micro-batches, but not each process's 6 (2 processes)
    run = types.SimpleNamespace(args=argparse.Namespace(global_batch_size=12, grad_accum_steps=4), local_batch=6,
                                world_size=2)
    with pytest.raises(cli.UserError, match="gives 6 images per process.*multiple of 8"):
        train.micro_batch_size(run)
    run.args.grad_accum_steps = 3
    assert train.micro_batch_size(run) == 2


def test_lr_schedule_values():

    args = train.parse_args(["--data-path", "x", "--lr", "1e-3", "--lr-warmup-steps", "4", "--lr-schedule", "cosine",
                             "--lr-min", "1e-5"])
    lrs = [train.lr_at(args, step, 14) for step in range(14)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear from 0: the k-th update k/4 of --lr
    assert lrs[4] == 1e-3 and lrs[9] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 2)))
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] > 1e-5
    args.lr_schedule = "linear"
    assert train.lr_at(args, 9, 14) == pytest.approx((1e-3 + 1e-5) / 2)
    assert train.lr_at(args, 99, 14) == pytest.approx(1e-5)
    release = train.parse_args(["--data-path", "x"])
    assert {train.lr_at(release, step, 10) for step in range(10)} == {1e-4}  # constant: --lr itself


def test_resume_with_accumulation_and_lr_schedule_is_exact(pixels, tmp_path):
    """The LR is a function of the step (no scheduler state): a run resumed at step 4 logs the same LR,
    loss and weights as the uninterrupted run, with gradient accumulation on."""
    flags = ("--max-steps", STEPS, "--grad-accum-steps", 2, "--lr", 1e-3, "--lr-warmup-steps", 2,
             "--lr-schedule", "cosine", "--lr-min", 1e-5)
    assert run_main(pixel_args(pixels, tmp_path / "full", *flags)) is None
    full = metrics(tmp_path / "full")
    args = train.parse_args(pixel_args(pixels, tmp_path, *flags))
    assert [r["lr"] for r in full] == pytest.approx([train.lr_at(args, step, STEPS) for step in range(STEPS)])
    assert full[0]["lr"] == pytest.approx(5e-4)
    assert full[-1]["lr"] < full[3]["lr"] < full[2]["lr"] == full[1]["lr"] == 1e-3
    start = tmp_path / "full" / EXPERIMENT / "checkpoints" / "0000004.pt"
    assert run_main(pixel_args(pixels, tmp_path / "resumed", *flags, "--resume", start)) is None
    ours, theirs = checkpoint(tmp_path / "resumed", STEPS), checkpoint(tmp_path / "full", STEPS)
    for key in ("model", "ema"):
        assert all(torch.equal(ours[key][k], theirs[key][k]) for k in theirs[key]), key
    resumed = [(r["step"], r["lr"], r["loss"]) for r in metrics(tmp_path / "resumed")]
    assert resumed == [(r["step"], r["lr"], r["loss"]) for r in full[4:]]


@pytest.mark.parametrize("flags, words", [
    (("--lr-min", "1e-5"), "--lr-min is where a decaying --lr-schedule ends"),
    (("--lr-schedule", "cosine", "--lr-min", "1"), "--lr-min 1.0 is out of range"),
    (("--grad-accum-steps", "3"), "does not split into --grad-accum-steps 3"),
    (("--init-from", "x.pt", "--resume", "auto"), "pass only one of them"),
    (("--class-map", "map.json"), "--class-map maps the classes of an --init-from checkpoint"),
])
def test_schedule_accumulation_and_init_flags_refused_in_one_line(flags, words, pixels, tmp_path, capsys):
    err = run_main(pixel_args(pixels, tmp_path, "--max-steps", 1, *flags), capsys)
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert not os.path.exists(tmp_path / EXPERIMENT)


TABLE = "y_embedder.embedding_table.weight"


def test_init_from_rebuilds_the_class_table_and_samples(pixels, reference, tmp_path):
    """Fine-tuning the trained 3-class model to 4 classes, new 0 <- old 2 and new 1 <- old 0: those rows
    copied, new classes 2 and 3 at the mean of the old rows, the null row kept; everything else from
    the source's EMA; a new run (step 1 after one step, a fresh optimizer) that records its start."""
    import sample

    source_path = reference / EXPERIMENT / "checkpoints" / f"{STEPS:07d}.pt"
    (tmp_path / "map.json").write_text(json.dumps({"0": 2, "1": 0}))
    args = pixel_args(pixels, tmp_path / "tuned", "--max-steps", 1, "--init-from", source_path, "--class-map",
                      tmp_path / "map.json")
    args[args.index("--num-classes") + 1] = "4"
    assert run_main(args) is None
    source, tuned = checkpoint(reference, STEPS)["ema"], checkpoint(tmp_path / "tuned", 1)
    assert tuned["train_steps"] == 1 and tuned["model_args"]["num_classes"] == 4
    assert tuned["args"]["init_from"] == str(source_path)
    assert all(s["step"] == 1 for s in tuned["opt"]["state"].values())  # a fresh optimizer
    old, new = source[TABLE], tuned["ema"][TABLE]  # the EMA moved ~1e-8 in one step at decay 0.9999
    expected = torch.stack([old[2], old[0], old[:3].mean(0), old[:3].mean(0), old[3]])
    torch.testing.assert_close(new, expected, atol=1e-6, rtol=0)
    assert (old[2] - old[0]).abs().max() > 1e-3  # rows that a wrong copy would not match
    for name in source:
        if name != TABLE:
            torch.testing.assert_close(tuned["ema"][name], source[name], atol=1e-6, rtol=0, msg=name)
    out = tmp_path / "tuned" / EXPERIMENT / "checkpoints" / "0000001.pt"
    images = sample.main(["--ckpt", str(out), "--num-sampling-steps", "2", "--output", str(tmp_path / "s.png"),
                          "--class-labels", "0", "3"])
    assert images.shape == (2, 8, 8, 1)


def test_init_from_at_another_image_size_rebuilds_the_position_table(pixels, reference, tmp_path):

    source_path = reference / EXPERIMENT / "checkpoints" / f"{STEPS:07d}.pt"
    args = pixel_args(pixels, tmp_path, "--max-steps", 1, "--init-from", source_path)
    args[args.index("--image-size") + 1] = "16"
    assert run_main(args) is None
    tuned, source = checkpoint(tmp_path, 1)["ema"], checkpoint(reference, STEPS)["ema"]
    assert torch.equal(tuned["pos_embed"], models.sincos_pos_embed_2d(32, 8).unsqueeze(0))  # the 8x8 token grid
    torch.testing.assert_close(tuned[TABLE], source[TABLE], atol=1e-6, rtol=0)


@pytest.mark.parametrize("flags, words", [
    (("--model", "DiT-S/2"), "does not match the checkpoint, which was trained with --model"),
    (("--in-channels", "3"), "cannot carry over"),
])
def test_init_from_refuses_what_cannot_carry_over(flags, words, pixels, reference, tmp_path, capsys):
    source_path = reference / EXPERIMENT / "checkpoints" / f"{STEPS:07d}.pt"
    args = [a for a in pixel_args(pixels, tmp_path, "--max-steps", 1, "--init-from", source_path)]
    for flag in ("--model", "--in-channels"):  # the source's, unless the test gives another
        i = args.index(flag)
        del args[i:i + 2]
    err = run_main(args + list(flags), capsys)
    assert err.count("\n") == 1 and words in err, err
    assert not os.path.exists(tmp_path / EXPERIMENT)


def test_unconditional_model_trains_and_samples_without_guidance(pixels, tmp_path, capsys):
    import sample

    args = pixel_args(pixels, tmp_path, "--max-steps", 2, "--sample-every", 2, "--num-sampling-steps", 2)
    args[args.index("--num-classes") + 1] = "0"
    assert run_main(args) is None
    ckpt = checkpoint(tmp_path, 2)
    assert ckpt["model_args"]["num_classes"] == 0 and ckpt["ema"][TABLE].shape[0] == 1  # the null row alone
    path = str(tmp_path / EXPERIMENT / "checkpoints" / "0000002.pt")
    flags = ["--ckpt", path, "--num-sampling-steps", "2", "--output", str(tmp_path / "s.png")]
    assert sample.main(flags + ["--cfg-scale", "1", "--class-labels", "0", "0", "0"]).shape == (3, 8, 8, 1)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.run(lambda: sample.main(flags))  # sample.py's default --cfg-scale 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unconditional" in err and "--cfg-scale 1" in err, err


def test_fp16_counts_the_steps_grad_scaler_skipped():
    """A finite loss with overflowing gradients: GradScaler skips the update and lowers its scale; the
    window counts it (on the device) though no loss was non-finite. Divergence only once every step of
    a window was skipped with the scale below 1."""
    import argparse
    import types

    p = torch.nn.Parameter(torch.ones(3))
    opt, scaler = torch.optim.SGD([p], lr=0.1), torch.amp.GradScaler("cpu", init_scale=4.0)
    window = train.Window.new(torch.device("cpu"))
    for overflow in (True, False, True):
        loss = p.sum()
        scaler.scale(loss).backward()
        if overflow:
            p.grad[0] = float("inf")
        before = p.detach().clone()
        skipped = train.scaled_step(scaler, opt)
        window.add(loss.detach(), skipped)
        assert bool(skipped) == overflow and torch.equal(p.detach(), before) == overflow
        opt.zero_grad()
    assert window.skipped_steps.item() == 2 and window.bad_steps.item() == 0
    assert train.scaled_step(torch.amp.GradScaler("cpu", enabled=False), opt) is None
    run = types.SimpleNamespace(device=torch.device("cpu"), args=argparse.Namespace(precision="fp16"))
    state = types.SimpleNamespace(scaler=scaler, train_steps=3, last_ckpt=None)
    all_skipped = train.Window.new(run.device)
    all_skipped.add(torch.tensor(1.0), torch.tensor(True))
    assert train.check_window(run, state, all_skipped) == 1.0  # scale 1: a high scale may still be to blame
    scaler.update(0.5)
    with pytest.raises(cli.UserError, match="NaN or infinite"):
        train.check_window(run, state, all_skipped)


def test_ddp_keeps_the_gradients_as_bucket_views():
    """With several processes (DDP, gradient_as_bucket_view) the gradients are zeroed, not freed, so
    they stay the same tensors (DDP's bucket views) from step to step; one process frees them."""
    import argparse
    import types

    import tiny_dit
    from diffusion import DEFAULT_DIFFUSION_ARGS, create_process

    diffusion = create_process(dict(DEFAULT_DIFFUSION_ARGS))
    for world_size in (2, 1):
        torch.manual_seed(0)
        model = tiny_dit.tiny(input_size=8, in_channels=1, num_classes=3)
        state = train.State(model, tiny_dit.tiny(input_size=8, in_channels=1, num_classes=3),
                            torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False), model)
        run = types.SimpleNamespace(world_size=world_size, device=torch.device("cpu"), args=argparse.Namespace(
            grad_accum_steps=1, precision="fp32", max_grad_norm=None, ema_decay=0.9))
        x, noise = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
        inputs = (x, torch.tensor([3, 500]), dict(y=torch.tensor([0, 1])), noise)
        pointers = []
        for _ in range(2):
            train.train_step(run, state, diffusion, [inputs])
            trained = [p for p in model.parameters() if p.requires_grad]
            pointers.append([None if p.grad is None else p.grad.data_ptr() for p in trained])
        if world_size > 1:
            assert None not in pointers[0] and pointers[0] == pointers[1]
            assert all(not p.grad.any() for p in model.parameters() if p.requires_grad)
        else:
            assert set(pointers[0]) == {None}


def test_init_from_rebuilds_mm_dit_class_tokens_too():
    import argparse
    import types

    import tiny_dit

    source = tiny_dit.tiny(input_size=8, in_channels=1, num_classes=3, block="mm-dit", context_tokens=2)
    init = types.SimpleNamespace(model_args=source.model_args, state_dict=tiny_dit.random_state_dict(
        0, input_size=8, in_channels=1, num_classes=3, block="mm-dit", context_tokens=2))
    model = tiny_dit.tiny(input_size=8, in_channels=1, num_classes=2, block="mm-dit", context_tokens=2)
    finetune.start_from(model, init, argparse.Namespace(init_from="source.pt", class_map=None))
    for name in finetune.CLASS_TABLES:
        old, new = init.state_dict[name], model.state_dict()[name]
        assert torch.equal(new, torch.stack([old[0], old[1], old[3]])), name  # classes 0 and 1, then the null row
