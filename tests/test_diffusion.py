"""diffusion/ against the reference outputs in tests/golden."""
import json

import numpy as np
import pytest
import torch

from conftest import GOLDEN
from diffusion import create_diffusion
from diffusion.respace import space_timesteps
from models import DiT

ATOL, RTOL = 1e-5, 1e-4


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
        torch.testing.assert_close(terms[name], value, atol=ATOL, rtol=RTOL, msg=f"{key}/{name}")


def test_q_sample_matches_reference():
    g = torch.load(GOLDEN / "diffusion_losses.pt", weights_only=True)
    torch.testing.assert_close(create_diffusion("").q_sample(g["x_start"], g["t"], g["noise"]), g["q_sample"],
                               atol=ATOL, rtol=RTOL)


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
    torch.testing.assert_close(out, g[f"{loop}|{respacing}"], atol=ATOL, rtol=RTOL)


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


def test_calc_bpd_loop_shapes_and_consistency(p2_model):
    torch.manual_seed(0)
    diffusion = create_diffusion("4")
    x = torch.rand(2, 4, 8, 8) * 2 - 1
    out = diffusion.calc_bpd_loop(p2_model, x, model_kwargs=dict(y=torch.tensor([0, 1])))
    assert out["vb"].shape == (2, 4) and out["mse"].shape == (2, 4)
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    assert torch.isfinite(out["total_bpd"]).all() and (out["prior_bpd"] >= 0).all()


def test_squaredcos_schedule_and_unknown_schedule():
    d = create_diffusion("", noise_schedule="squaredcos_cap_v2")
    assert d.betas.max() <= 0.999 and d.num_timesteps == 1000
    with pytest.raises(ValueError, match="unknown noise schedule"):
        create_diffusion("", noise_schedule="quadratic")
