"""diffusion/: schedules, respacing, losses and sampling loops against the reference outputs in
tests/golden; the flow integrators against known solutions; the v/eps/x0 conversions and losses
against their formulas; DPM-Solver; the process record."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import checkpoint
import diffusion
import sampling
import tiny_dit
from conftest import FLOW_ARGS, GOLDEN, assert_close_to_golden
from diffusion import create_diffusion, create_process, flow
from diffusion.dpm_solver import dpm_solver_sample_loop
from diffusion.respace import space_timesteps
from models import DiT

tiny_dit.register()


@pytest.fixture(scope="module")
def p2_model():
    g = torch.load(GOLDEN / "model_p2_sigma.pt", weights_only=True)
    model = DiT(**g["config"]).eval()
    model.load_state_dict(g["state_dict"])
    return model


def test_schedules_and_respacing_match_reference():
    expected = json.loads((GOLDEN / "diffusion_schedules.json").read_text())
    assert len(expected) == 16
    for key, ref in expected.items():
        schedule, respacing = key.split("|")
        diffusion = create_diffusion(respacing, noise_schedule=schedule)
        assert diffusion.timestep_map == ref["timestep_map"], key
        # float64 from exact IEEE arithmetic: the same on every CPU, so no float32 tolerance here.
        np.testing.assert_allclose(diffusion.betas, ref["betas"], rtol=1e-10, atol=0, err_msg=key)


@pytest.mark.parametrize("key, kwargs", [
    ("losses_default", {}),
    ("losses_learn_sigma_rescaled", {"rescale_learned_sigmas": True}),
    ("losses_kl", {"use_kl": True}),
    ("losses_xstart", {"predict_xstart": True}),
])
def test_training_losses_match_reference(p2_model, key, kwargs):
    g = torch.load(GOLDEN / "diffusion_losses.pt", weights_only=True)
    diffusion = create_diffusion("", **kwargs)
    with torch.no_grad():
        terms = diffusion.training_losses(p2_model, g["x_start"], g["t"], dict(y=g["y"]), noise=g["noise"])
    assert set(terms) == set(g[key])
    for name, value in g[key].items():
        assert_close_to_golden(terms[name], value)


def test_q_sample_matches_reference():
    g = torch.load(GOLDEN / "diffusion_losses.pt", weights_only=True)
    assert_close_to_golden(create_diffusion("").q_sample(g["x_start"], g["t"], g["noise"]), g["q_sample"])


@pytest.mark.parametrize("respacing", ["10", "ddim10"])
@pytest.mark.parametrize("loop", ["p_sample_loop", "p_sample_loop_cfg4", "ddim_sample_loop_eta0.0",
                                  "ddim_sample_loop_eta0.5"])
def test_sampling_loops_match_reference(p2_model, loop, respacing):
    g = torch.load(GOLDEN / "diffusion_sampling.pt", weights_only=True)
    diffusion = create_diffusion(respacing)
    z, labels = g["z"], g["labels"]
    if loop.startswith("p_sample_loop_cfg"):
        z = torch.cat([z, z])
        y = torch.cat([labels, torch.full_like(labels, p2_model.num_classes)])
        fn, kwargs = p2_model.forward_with_cfg, dict(y=y, cfg_scale=4.0)
    else:
        fn, kwargs = p2_model, dict(y=labels)
    torch.manual_seed(int(g["seed_before_loop"]))
    if loop.startswith("ddim"):
        eta = float(loop.split("eta")[1])
        out = diffusion.ddim_sample_loop(fn, z.shape, z, clip_denoised=False, model_kwargs=kwargs, eta=eta,
                                         device="cpu")
    else:
        out = diffusion.p_sample_loop(fn, z.shape, z, clip_denoised=False, model_kwargs=kwargs, device="cpu")
    assert_close_to_golden(out, g[f"{loop}|{respacing}"])


def test_progressive_loop_yields_every_step(p2_model):
    diffusion = create_diffusion("5")
    z = torch.randn(2, 4, 8, 8)
    steps = list(diffusion.p_sample_loop_progressive(p2_model, z.shape, z, model_kwargs=dict(y=torch.tensor([1, 2]))))
    assert len(steps) == 5 and all(s["sample"].shape == z.shape for s in steps)
    assert all(s["pred_xstart"].abs().max() <= 1 for s in steps)  # clip_denoised defaults to True


def test_respaced_model_sees_original_timesteps():
    seen = []

    def model(x, t, **kwargs):
        seen.append(t.tolist())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    diffusion = create_diffusion("ddim10")
    diffusion.ddim_sample_loop(model, (1, 1, 2, 2), torch.zeros(1, 1, 2, 2), device="cpu")
    assert [s[0] for s in seen] == list(range(900, -1, -100))


@pytest.mark.parametrize("spec, words", [
    ("ddim999", "integer stride"),
    ("2000", "cannot divide"),
    ("fast", "cannot parse"),
    ("0", "keeps no steps"),
])
def test_impossible_respacing_is_a_clear_value_error(spec, words):
    with pytest.raises(ValueError, match=words):
        space_timesteps(1000, spec)


def test_respacing_forms():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert len(space_timesteps(1000, "250")) == 250
    assert len(space_timesteps(1000, "10,20,30")) == 60
    assert space_timesteps(100, [1]) == {0}


def test_squaredcos_schedule_and_unknown_schedule():
    d = create_diffusion("", noise_schedule="squaredcos_cap_v2")
    assert d.betas.max() <= 0.999 and d.num_timesteps == 1000
    with pytest.raises(ValueError, match="unknown noise schedule"):
        create_diffusion("", noise_schedule="quadratic")


# Every configuration create_diffusion can build: (kwargs, the model's output channels per input channel).
CONFIGS = [
    ({}, 2),
    ({"rescale_learned_sigmas": True}, 2),
    ({"use_kl": True}, 2),
    ({"predict_xstart": True}, 2),
    ({"learn_sigma": False}, 1),
    ({"learn_sigma": False, "sigma_small": True}, 1),
]


@pytest.mark.parametrize("kwargs, outputs_per_channel", CONFIGS)
def test_no_lookup_leaves_the_inputs_device(kwargs, outputs_per_channel):
    """With every tensor on the meta device, a host round trip (.cpu(), .numpy(), .item(), or a
    table built on the CPU) raises: the whole process must run where its inputs are."""
    meta = torch.device("meta")
    seen = []

    def model(x, t, y):
        seen.append(t.device)
        return torch.cat([x * t.view(-1, 1, 1, 1)] * outputs_per_channel, 1) + y.view(-1, 1, 1, 1)

    with pytest.raises(NotImplementedError):
        torch.zeros(1, device=meta).cpu()  # the failure a host round trip would hit
    diffusion = create_diffusion("10", **kwargs)
    x, y = torch.empty(2, 3, 4, 4, device=meta), torch.zeros(2, dtype=torch.long, device=meta)
    t = torch.zeros(2, dtype=torch.long, device=meta)
    outputs = [diffusion.q_sample(x, t), *diffusion.training_losses(model, x, t, dict(y=y)).values(),
               *diffusion.p_mean_variance(model, x, t, model_kwargs=dict(y=y)).values(),
               diffusion.p_sample_loop(model, x.shape, model_kwargs=dict(y=y), device=meta),
               diffusion.ddim_sample_loop(model, x.shape, x, model_kwargs=dict(y=y), device=meta, eta=0.5)]
    assert all(out.device == meta for out in outputs) and set(seen) == {meta}


def test_tables_are_float64_and_copied_to_a_device_once():
    diffusion = create_diffusion("10")
    meta = torch.device("meta")
    table = diffusion._tables.get("sqrt_alphas_cumprod", meta)
    assert table.device == meta and table.dtype == torch.float64 and table.shape == (10,)
    assert diffusion._tables.get("sqrt_alphas_cumprod", meta) is table
    timestep_map = diffusion._original_timesteps.get("timestep_map", meta)
    assert diffusion._original_timesteps.get("timestep_map", meta) is timestep_map


@pytest.mark.parametrize("sigma_small", [False, True])
def test_fixed_variances(sigma_small):
    """learn_sigma=False: beta_t (FIXED_LARGE) or the posterior variance (FIXED_SMALL). At t = 0
    the log-variance is the posterior's at t = 1 in both; FIXED_LARGE's variance too, while
    FIXED_SMALL keeps the posterior's true 0 there."""
    diffusion = create_diffusion("", learn_sigma=False, sigma_small=sigma_small)
    betas = np.linspace(1e-4, 0.02, 1000)
    alpha_bar = np.cumprod(1 - betas)
    posterior = betas[1:] * (1 - alpha_bar[:-1]) / (1 - alpha_bar[1:])  # for t = 1 ... 999
    variance = np.concatenate([[0.0 if sigma_small else posterior[0]], posterior if sigma_small else betas[1:]])
    log_variance = np.log(np.concatenate([posterior[:1], variance[1:]]))
    t = torch.tensor([0, 1, 2, 500, 999])
    out = diffusion.p_mean_variance(lambda x, t: x, torch.zeros(5, 1, 2, 2), t)
    for name, expected in [("variance", variance), ("log_variance", log_variance)]:
        torch.testing.assert_close(out[name][:, 0, 0, 0], torch.tensor(expected[t.numpy()], dtype=torch.float32))


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_a_one_step_process_samples(learn_sigma):
    """One sampling step (e.g. --num-sampling-steps 1): the sample is the predicted mean at t = 0."""
    diffusion = create_diffusion("1", learn_sigma=learn_sigma)
    z = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def model(x, t):
        return torch.cat([x * 0.1] * (2 if learn_sigma else 1), 1)

    out = diffusion.p_sample_loop(model, z.shape, z, device="cpu")
    mean = diffusion.p_mean_variance(model, z, torch.zeros(2, dtype=torch.long))["mean"]
    assert torch.isfinite(out).all() and out.abs().max() > 0.01
    torch.testing.assert_close(out, mean, rtol=0, atol=0)


@pytest.mark.parametrize("diffusion_args, respacing, model_t, level", [
    (None, "", 250, 0.25),  # the release's process: timestep / 1000
    (None, "ddim10", 900, 0.9),  # respaced: the model sees original timesteps
    ({"diffusion_steps": 500}, "", 250, 0.5),  # another step count: its own scale
    ({"objective": "flow"}, "", 400.0, 0.4),  # flow: the model sees t * 1000
])
def test_the_process_reads_the_noise_level_of_a_model_timestep(diffusion_args, respacing, model_t, level):
    """--cfg-interval and --cache-above compare these levels, whatever the process."""
    process = create_process(diffusion_args, respacing)
    assert process.noise_level(torch.tensor([model_t, model_t])) == pytest.approx(level, abs=1e-12)


def test_training_times_are_the_releases_draw_and_flows_t():
    """The Gaussian draw is the release's randint over the 1000 steps (the same generator calls);
    flow's are in [0, 1], and its model has no sigma channels."""
    gaussian, flow = create_process(None), create_process({"objective": "flow", "t_sampling": "uniform"})
    ours = gaussian.training_times(16, torch.Generator().manual_seed(3))
    assert torch.equal(ours, torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(3)))
    t = flow.training_times(16, torch.Generator().manual_seed(3))
    assert torch.equal(t, torch.rand(16, generator=torch.Generator().manual_seed(3)))
    assert (gaussian.learns_sigma, flow.learns_sigma) == (True, False)


# ------------------------------------------------------------------ the integrators
def decay(x, t):
    """dx/dt = x cos t: x(0) = x(1) exp(sin 0 - sin 1)."""
    return x * math.cos(float(t))


def test_flow_velocity_feeds_the_model_t_times_1000_in_float32_known_on_the_host_for_grid_times():
    seen = []
    velocity = flow.LinearFlow.velocity_field(lambda x, t: seen.append(t) or x, {}, 2)
    x = torch.zeros(3, 2, 4, 4)
    for steps in (7, 33, 250):
        for t in flow.time_grid(steps):
            velocity(x, t)
            expected = torch.tensor(t, dtype=torch.float32).mul(flow.TIMESTEP_SCALE).expand(3)
            assert torch.equal(seen[-1], expected) and seen[-1].dtype == torch.float32
            assert seen[-1].host_timestep == float(expected[0])  # no device read for --cfg-interval / caching
    velocity(x, torch.tensor(0.25, dtype=torch.float64))  # dopri5's time, on the device: read from there
    assert torch.equal(seen[-1], torch.full((3,), 250.0)) and not hasattr(seen[-1], "host_timestep")


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
