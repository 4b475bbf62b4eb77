"""diffusion/ against the reference outputs in tests/golden."""
import json

import numpy as np
import pytest
import torch

from conftest import GOLDEN, assert_close_to_golden
from diffusion import create_diffusion, create_process
from diffusion.respace import space_timesteps
from models import DiT


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
