"""Training objectives (eps, v, flow) and the flow samplers: the integrators against known
solutions, the v/eps/x0 conversions and losses against their formulas, train.py -> sample.py
with no flags but --ckpt for each objective, one-line refusals, guidance intervals, and the
release's eps path left as it was."""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import checkpoint
import cli
import diffusion
import digits
import sample
import sample_ddp
import sampling
import tiny_dit
import train
from conftest import EXPERIMENT, pixel_args, run_main, write_images
from diffusion import create_diffusion, create_process, flow, samplers

tiny_dit.register()
FLOW_ARGS = {"objective": "flow", "t_sampling": "uniform"}


# ------------------------------------------------------------------ the integrators
def decay(x, t):
    """dx/dt = x cos t: x(0) = x(1) exp(sin 0 - sin 1)."""
    return x * math.cos(float(t))


def test_euler_is_exact_on_a_constant_velocity_field():
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    velocity = torch.randn_like(x)
    out = flow.euler_sample(lambda x, t: velocity, x, 8)
    torch.testing.assert_close(out, x - velocity, rtol=0, atol=1e-6)  # x(0) = x(1) - v, up to rounding


def test_heun_is_second_order_and_euler_first():
    x1 = torch.ones(1, dtype=torch.float64)
    exact = math.exp(-math.sin(1.0))
    for sample_loop, order in ((flow.heun_sample, 2), (flow.euler_sample, 1)):
        errors = [abs(sample_loop(decay, x1, n).item() - exact) for n in (8, 16, 32)]
        ratios = [errors[0] / errors[1], errors[1] / errors[2]]
        assert all(abs(r - 2 ** order) < 0.3 * order for r in ratios), (sample_loop.__name__, ratios)


def test_heun_counts_two_evaluations_a_step_but_one_on_the_last():
    calls = []
    flow.heun_sample(lambda x, t: calls.append(t) or x, torch.ones(1), 5)
    assert len(calls) == 2 * 5 - 1 and calls[0] == 1.0 and 0.0 not in calls


def test_dopri5_reaches_the_known_solution_within_tolerance():
    x1 = torch.full((2, 3), 2.0, dtype=torch.float64)
    out = flow.dopri5_sample(decay, x1, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(out, x1 * math.exp(-math.sin(1.0)), rtol=1e-6, atol=0)


def test_sde_with_zero_diffusion_equals_euler():
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))

    def velocity(x, t):
        return torch.tanh(x) * (1 + t)

    sde = flow.sde_sample(velocity, x, 6, 0.0, noise=lambda: torch.randn_like(x))
    assert torch.equal(sde, flow.euler_sample(velocity, x, 6))


def gaussian_velocity(data_std):
    """The exact velocity E[eps - x_0 | x_t] when x_0 ~ N(0, data_std^2)."""
    def velocity(x, t):
        t = float(t)
        return (t - (1 - t) * data_std ** 2) / ((1 - t) ** 2 * data_std ** 2 + t ** 2) * x
    return velocity


@pytest.mark.parametrize("name", ["euler", "heun", "sde", "dopri5"])
def test_each_flow_sampler_turns_noise_into_the_data_distribution(name):
    """With the exact velocity of Gaussian data, every sampler lands on the data's spread
    (the SDE too: a sign error in its score term would widen or collapse it)."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(20_000, dtype=torch.float64, generator=generator)
    velocity = gaussian_velocity(0.5)
    out = {"euler": lambda: flow.euler_sample(velocity, x, 200),
           "heun": lambda: flow.heun_sample(velocity, x, 20),
           "sde": lambda: flow.sde_sample(velocity, x, 200, 1.0, lambda: torch.randn(x.shape, dtype=x.dtype,
                                                                                          generator=generator)),
           "dopri5": lambda: flow.dopri5_sample(velocity, x, 1e-8, 1e-6)}[name]()
    assert abs(out.std().item() - 0.5) < 0.02, out.std()


# ------------------------------------------------------------------ conversions and losses
def test_v_eps_x0_conversions_are_consistent():
    diffusion = create_diffusion("", learn_sigma=False, predict_v=True)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(5, 2, 4, 4, generator=g), torch.randn(5, 2, 4, 4, generator=g)
    t = torch.tensor([0, 1, 250, 700, 999])
    x_t = diffusion.q_sample(x0, t, eps)
    v = diffusion.velocity_target(x0, t, eps)
    a = torch.tensor(diffusion.alphas_cumprod, dtype=torch.float32)[t].sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(v, a * eps - (1 - a ** 2).sqrt() * x0)
    torch.testing.assert_close(diffusion._predict_xstart_from_v(x_t, t, v), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diffusion._predict_eps_from_v(x_t, t, v), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diffusion._predict_eps_from_xstart(x_t, t, x0), eps, atol=1e-3, rtol=1e-3)
    # A v model and an eps model that agree give the same reverse step.
    eps_diffusion = create_diffusion("", learn_sigma=False)
    for key in ("mean", "pred_xstart"):
        torch.testing.assert_close(diffusion.p_mean_variance(lambda x, t: v, x_t, t, False)[key],
                                   eps_diffusion.p_mean_variance(lambda x, t: eps, x_t, t, False)[key],
                                   atol=1e-4, rtol=1e-4)


def toy_model(seen):
    def model(x, t, y):
        seen.append(t)
        return torch.sin(3 * x) + 0.001 * t.view(-1, 1, 1, 1) + 0.1 * y.view(-1, 1, 1, 1)
    return model


def test_flow_loss_is_the_velocity_mse_with_t_times_1000():
    g = torch.Generator().manual_seed(4)
    x0, eps, y = torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 1, 4, 4, generator=g), torch.arange(4)
    t = torch.tensor([0.0, 0.25, 0.6, 1.0])
    seen = []
    terms = create_process(FLOW_ARGS).training_losses(toy_model(seen), x0, t, dict(y=y), noise=eps)
    tt = t.view(-1, 1, 1, 1)
    prediction = torch.sin(3 * ((1 - tt) * x0 + tt * eps)) + 0.001 * 1000 * tt + 0.1 * y.view(-1, 1, 1, 1)
    torch.testing.assert_close(terms["loss"], ((eps - x0 - prediction) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(seen[0], t * 1000)


def test_v_loss_is_the_mse_to_v():
    g = torch.Generator().manual_seed(5)
    x0, eps, y = torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 1, 4, 4, generator=g), torch.arange(4)
    t = torch.tensor([0, 10, 500, 999])
    abar = torch.tensor(create_diffusion("").alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    target = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    model = toy_model([])
    prediction = model(x_t, t, y)
    fixed = create_process({"objective": "v", "learn_sigma": False})
    terms = fixed.training_losses(model, x0, t, dict(y=y), noise=eps)
    torch.testing.assert_close(terms["loss"], ((target - prediction) ** 2).mean(dim=(1, 2, 3)), atol=1e-5, rtol=1e-5)
    # With learned sigma (train.py's v), the same MSE plus the bound's variance term.
    hybrid = create_process({"objective": "v", "learn_sigma": True})
    terms = hybrid.training_losses(lambda x, t, y: torch.cat([model(x, t, y)] * 2, 1), x0, t, dict(y=y), noise=eps)
    torch.testing.assert_close(terms["mse"], ((target - prediction) ** 2).mean(dim=(1, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_logit_normal_times_follow_their_formula():
    process = create_process({"objective": "flow", "t_sampling": "logit-normal", "t_mean": 0.5, "t_scale": 2.0})
    t = process.training_times(5, torch.Generator().manual_seed(6))
    n = torch.randn(5, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(t, torch.sigmoid(0.5 + 2.0 * n))


# ------------------------------------------------------------------ the sampling wiring
class GaussianDataModel:
    """The exact eps (or v) prediction for data x_0 ~ N(0, std^2), as a class-conditional model."""
    num_classes = 10

    def __init__(self, target, std=0.5):
        self.target, self.std = target, std
        self.abar = torch.tensor(create_diffusion("").alphas_cumprod, dtype=torch.float32)

    def __call__(self, x, t, y):
        a = self.abar[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - a ** 2).sqrt()
        x0 = a * self.std ** 2 / (a ** 2 * self.std ** 2 + s ** 2) * x
        eps = (x - a * x0) / s
        return eps if self.target == "eps" else a * eps - s * x0


@pytest.mark.parametrize("name, steps", [("ddim", 10), ("dpm-solver", 10), ("ddpm", 10)])
def test_a_v_model_samples_as_the_eps_model_it_equals(name, steps):
    noise = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(7))
    out = {}
    for objective in ("eps", "v"):
        sampler = sampling.make_sampler(name, steps, {"objective": objective, "learn_sigma": False})
        step_noise = iter(torch.randn(steps, 4, 1, 4, 4, generator=torch.Generator().manual_seed(8)))
        out[objective], _ = sampling.generate(GaussianDataModel(objective), sampler, [0, 1, 2, 3], 1.0, noise,
                                              step_noise=lambda: next(step_noise))
    torch.testing.assert_close(out["v"], out["eps"], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def random_flow_ckpt(tmp_path_factory):
    """A train.py-style checkpoint of a random tiny flow model (no training)."""
    path = tmp_path_factory.mktemp("flow") / "flow.pt"
    ckpt = tiny_dit.write_checkpoint(path, image_size=8, vae="none", in_channels=1, num_classes=10)
    ckpt["diffusion_args"] = dict(FLOW_ARGS)
    torch.save(ckpt, path)  # learn_sigma stays: the flow samplers read only the first C channels
    return str(path)


def loaded(ckpt):
    args = SimpleNamespace(model=None, image_size=None, num_classes=None, vae=None, vae_path=None, ckpt=ckpt)
    return sampling.load_model(args, torch.device("cpu"))


@pytest.mark.parametrize("name, steps, inside", [("euler", 3, (0.4, 0.5)), ("ddim", 4, (1.0, 1.0))])
def test_guidance_outside_its_interval_is_the_conditional_prediction(random_flow_ckpt, name, steps, inside):
    """An interval no step's noise level falls in: exactly the unguided (cfg 1) samples, with one
    half-batch evaluation a step; an interval that holds some steps guides those."""
    model, settings = loaded(random_flow_ckpt)
    diffusion_args = settings.diffusion_args if name == "euler" else None
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    plain, _ = sampling.generate(model, sampling.make_sampler(name, steps, diffusion_args), [1, 2, 3], 1.0, noise)
    outside, stats = sampling.generate(model, sampling.make_sampler(name, steps, diffusion_args, cfg_interval=inside),
                                       [1, 2, 3], 4.0, noise)
    torch.testing.assert_close(outside, plain, rtol=0, atol=1e-6)
    assert stats.nfe == steps
    everywhere, _ = sampling.generate(model, sampling.make_sampler(name, steps, diffusion_args), [1, 2, 3], 4.0, noise)
    partly, _ = sampling.generate(model, sampling.make_sampler(name, steps, diffusion_args, cfg_interval=(0.5, 1.0)),
                                  [1, 2, 3], 4.0, noise)
    assert (partly - plain).abs().max() > 1e-4 and (partly - everywhere).abs().max() > 1e-4


@pytest.mark.parametrize("name, steps", [("sde", 4), ("dopri5", None)])
def test_seeded_flow_samples_do_not_depend_on_their_batch(random_flow_ckpt, name, steps):
    """sde: per-step noise from each sample's own generator; dopri5: each sample on its own
    adaptive steps. Either way a sample is the same alone or in a batch (as in sample_ddp.py)."""
    kwargs = dict(cfg_scale=2.0, sampler=name, num_sampling_steps=steps, seed=3, atol=1e-3, rtol=1e-2)
    both = sampling.generate_from_checkpoint(random_flow_ckpt, [1, 2], batch_size=2, **kwargs)
    alone = sampling.generate_from_checkpoint(random_flow_ckpt, [1], batch_size=1, **kwargs)
    np.testing.assert_array_equal(both[:1], alone)
    other = sampling.generate_from_checkpoint(random_flow_ckpt, [1], batch_size=1, **{**kwargs, "seed": 4})
    assert (other != alone).any()


def test_sample_ddp_records_the_flow_sampler_and_refuses_other_settings(random_flow_ckpt, tmp_path, capsys):
    argv = ["--ckpt", random_flow_ckpt, "--device", "cpu", "--num-fid-samples", "3", "--per-proc-batch-size", "2",
            "--sampler", "sde", "--num-sampling-steps", "3", "--sample-dir", str(tmp_path)]
    npz = sample_ddp.main(argv)
    with open(npz[:-len(".npz")] + ".json") as f:
        record = json.load(f)
    assert (record["sampler"], record["num_sampling_steps"], record["sde_diffusion"], record["atol"]) == (
        "sde", 3, 1.0, None)
    assert np.load(npz)["arr_0"].shape == (3, 8, 8, 3)
    with pytest.raises(SystemExit):
        cli.run(lambda: sample_ddp.main(argv + ["--sde-diffusion", "0.5"]))
    assert "other settings" in capsys.readouterr().err


# ------------------------------------------------------------------ train.py -> sample.py
@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("pixels"))


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


def test_each_objective_is_recorded_and_samples_from_the_checkpoint_alone(trained, tmp_path):
    expected = {"v": ({"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True, "objective": "v"},
                      True),
                "flow": ({"objective": "flow", "t_sampling": "logit-normal", "t_mean": 0.0, "t_scale": 0.8}, False)}
    for objective, path in trained.items():
        ckpt = torch.load(path, weights_only=True)
        assert (ckpt["diffusion_args"], ckpt["model_args"]["learn_sigma"]) == expected[objective]
        images = sample.main(["--ckpt", path, "--output", str(tmp_path / f"{objective}.png")])
        assert images.shape == (3, 8, 8, 1) and images.std() > 0


def test_digits_score_picks_the_flow_sampler(trained, capsys, monkeypatch):
    monkeypatch.setattr(digits, "DigitScorer", lambda: SimpleNamespace(
        score=lambda images, labels: {"accuracy": 0.0, "frechet_distance": 0.0}))
    monkeypatch.setattr(digits, "NUM_CLASSES", 3)
    digits.main(["score", "--ckpt", trained["flow"], "--per-class", "1"])
    assert capsys.readouterr().out.startswith(f"heun-{samplers.SAMPLERS['heun'].steps} cfg 4.0")


def test_a_sampler_that_does_not_fit_is_one_line(trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: sample.main(["--ckpt", trained["flow"], "--sampler", "ddim",
                                     "--output", str(tmp_path / "x.png")]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and lines == ["error: --sampler ddim needs an eps or v checkpoint; this one was trained "
                                           "with flow: use heun, euler, dopri5 or sde"]


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


@pytest.mark.parametrize("options, words", [
    (dict(cfg_interval=(0.8, 0.2)), "--cfg-interval 0.8 0.2"),
    (dict(atol=0.0), "--atol 0.0"),
    (dict(sde_diffusion=-1.0), "--sde-diffusion -1.0"),
])
def test_bad_sampler_options_are_one_line(options, words):
    with pytest.raises(cli.UserError, match=words.replace(".", r"\.")):
        sampling.make_sampler("sde", 4, FLOW_ARGS, **options)


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


def test_run_diffusion_args_keeps_every_field_of_the_record():
    """Fields no flag gives (learn_sigma, the schedule) come from the record, not the fresh run's
    defaults; a flag given for such a field would be compared too."""
    flags = SimpleNamespace(objective="v", t_sampling=None, t_mean=None, t_scale=None)
    record = {"noise_schedule": "squaredcos_cap_v2", "diffusion_steps": 500, "learn_sigma": False, "objective": "v"}
    assert diffusion.run_diffusion_args(flags, record) == record
    assert diffusion.run_diffusion_args(flags, None) == {**checkpoint.DEFAULT_DIFFUSION_ARGS, "objective": "v"}
    assert diffusion.process_model_args(record) == {"learn_sigma": False}
    with pytest.raises(diffusion.ProcessError, match="--objective flow contradicts the checkpoint, trained with "
                                                     "--objective v"):
        diffusion.run_diffusion_args(SimpleNamespace(objective="flow"), record)
    with pytest.raises(diffusion.ProcessError, match="--learn-sigma True contradicts the checkpoint, trained with "
                                                     "--learn-sigma False"):
        diffusion.run_diffusion_args(SimpleNamespace(objective=None, learn_sigma=True), record)


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
