"""sampling.py: load_model, generate and generate_from_checkpoint (seeded samples independent of their
batch, guidance and its interval), the samplers table, and block caching (BlockCache): interval 1 is
the default path exactly, cached samples stay close to the uncached."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cli
import sample
import sampling
import tiny_dit
from conftest import FLOW_ARGS, cuda_only
from diffusion import samplers
from models import BLOCKS

tiny_dit.register()


FLOW_PROCESS = {"objective": "flow", "t_sampling": "uniform", "t_mean": 0.0, "t_scale": 1.0}
V_ARGS = {"objective": "v"}


def random_model(block="adaLN-Zero", seed=0):
    """The tiny DiT (2 blocks) with every weight non-zero, so every block changes its input."""
    kwargs = dict(input_size=8, in_channels=1, num_classes=10, block=block)
    model = tiny_dit.tiny(**kwargs)
    model.load_state_dict(tiny_dit.random_state_dict(seed, **kwargs))
    return model.eval()


def count_blocks(model):
    calls = []
    for block in model.blocks:
        block.register_forward_hook(lambda *_: calls.append(1))
    return calls


def noise(n=3, seed=0):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("block", BLOCKS)
def test_a_cache_that_reuses_nothing_changes_no_bit(block):
    """The hook itself (entering, recording the residual) leaves the model's output bit for bit."""
    model = random_model(block)
    x, t, y = noise(4), torch.tensor([10, 500, 999, 3]), torch.tensor([1, 2, 10, 4])
    cache = sampling.BlockCache(interval=1, start=1)
    cache.next_call()
    assert torch.equal(cache(model, x, t, y), model(x, t, y))
    assert cache.block_evals == 2 and cache.residual.shape[0] == 4


def test_interval_1_is_the_default_sampler_exactly():
    model = random_model()
    default, _ = sampling.generate(model, sampling.make_sampler("ddim", 6), [1, 2, 3], 4.0, noise())
    sampler = sampling.make_sampler("ddim", 6, cache_interval=1, cache_start=1)
    assert torch.equal(sampling.generate(model, sampler, [1, 2, 3], 4.0, noise())[0], default)
    assert sampler.settings()["cache_interval"] == 1 and sampler.settings()["cache_start"] is None


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("block, name, steps", [(block, "ddim", 12) for block in BLOCKS])
def test_cached_samples_stay_close_to_the_uncached(block, name, steps):
    """Tolerance: relative L2 error below 25% at interval 2 (unguided, random weights, whose
    features vary far more between steps than a trained model's: on the trained digits model the
    scores do not move, see the README), and less than with more reuse (interval 4)."""
    model = random_model(block)
    exact, _ = sampling.generate(model, sampling.make_sampler(name, steps), [1, 2, 3], 1.0, noise())
    errors = [relative_error(sampling.generate(model, sampling.make_sampler(name, steps, cache_interval=interval),
                                               [1, 2, 3], 1.0, noise())[0], exact) for interval in (2, 4)]
    assert 0 < errors[0] < errors[1] and errors[0] < 0.25


@pytest.mark.parametrize("block", BLOCKS)
def test_a_reused_residual_is_exact_for_the_same_input_and_close_for_a_near_one(block):
    """Reusing at the input the residual came from gives the uncached output up to rounding; for
    nearby latents the error is small and grows with the distance. (The timestep stays: a random
    model's timestep embedding changes abruptly from one index to the next, a trained one's not.)"""
    model = random_model(block)
    x, y = noise(4), torch.tensor([1, 2, 10, 4])

    def reused(x2, t2):
        cache = sampling.BlockCache(interval=2, start=1)
        cache.next_call()
        cache(model, x, torch.full((4,), 500), y)
        cache.next_call()
        return cache(model, x2, t2, y)

    t = torch.full((4,), 500)
    exact = model(x, t, y)
    torch.testing.assert_close(reused(x, t), exact, rtol=1e-4, atol=1e-5 * exact.abs().max().item())
    errors = [relative_error(reused(x + d * noise(4, 1), t), model(x + d * noise(4, 1), t, y)) for d in (0.01, 0.1, 1)]
    assert 0 < errors[0] < errors[1] < errors[2] and errors[0] < 0.02


def expected_block_evals(calls, interval, start, depth=2):
    full = -(-calls // interval)  # every interval-th call, the first included
    return full * depth + (calls - full) * start


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("interval, start", [(2, 0), (3, 1)])
def test_block_evaluations_drop_as_designed_for_every_block(block, interval, start):
    model = random_model(block)
    calls = count_blocks(model)
    sampler = sampling.make_sampler("dpm-solver", 7, cache_interval=interval, cache_start=start)
    out, stats = sampling.generate(model, sampler, [1, 2, 3], 4.0, noise())  # guided: the doubled batch
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()
    assert len(calls) == stats.block_evals == expected_block_evals(7, interval, start)


@pytest.mark.parametrize("name, steps, diffusion_args, nfe", [
    ("ddpm", 5, None, 5), ("ddim", 5, V_ARGS, 5), ("dpm-solver", 5, V_ARGS, 5),
    ("euler", 4, FLOW_PROCESS, 4), ("heun", 3, FLOW_PROCESS, 5), ("sde", 4, FLOW_PROCESS, 4)])
def test_every_sampler_of_every_objective_caches(name, steps, diffusion_args, nfe):
    model = random_model()
    calls = count_blocks(model)
    sampler = sampling.make_sampler(name, steps, diffusion_args, cache_interval=2)
    cached, stats = sampling.generate(model, sampler, [1, 2, 3], 2.0, noise())
    assert stats.nfe == nfe and len(calls) == stats.block_evals == expected_block_evals(nfe, 2, 0)
    calls.clear()
    exact, _ = sampling.generate(model, sampling.make_sampler(name, steps, diffusion_args), [1, 2, 3], 2.0, noise())
    assert len(calls) == 2 * nfe and not torch.equal(cached, exact)


def test_a_batch_change_runs_every_block():
    """--cfg-interval switches between the guided (doubled) and the conditional batch: the residual
    kept for one batch is never added to the other."""
    model = random_model()
    calls = count_blocks(model)
    sampler = sampling.make_sampler("ddim", 4, cache_interval=3, cfg_interval=(0.5, 1.0))
    sampling.generate(model, sampler, [1, 2, 3], 4.0, noise())
    # ddim-4 levels 0.75, 0.5 (guided), 0.25, 0.0 (conditional): call 3 would reuse but has the new batch
    assert len(calls) == 2 + 0 + 2 + 2


def test_the_least_noisy_steps_run_every_block():
    model = random_model()
    calls = count_blocks(model)
    for above, expected in ((0.0, 2 + 0 + 0 + 0), (0.3, 2 + 0 + 2 + 2)):  # ddim-4 levels 0.75, 0.5, 0.25, 0.0
        calls.clear()
        sampling.generate(model, sampling.make_sampler("ddim", 4, cache_interval=4, cache_above=above), [1], 1.0,
                          noise(1))
        assert len(calls) == expected


def test_cached_seeded_samples_do_not_depend_on_their_batch(tmp_path):
    """Each sample's residual is its own: alone or in a batch, the same image (as sample_ddp.py promises)."""
    ckpt = str(tmp_path / "tiny.pt")
    tiny_dit.write_checkpoint(ckpt, image_size=8, vae="none", in_channels=1)
    kwargs = dict(cfg_scale=2.0, sampler="ddpm", num_sampling_steps=6, seed=3, cache_interval=3, cache_start=1)
    both = sampling.generate_from_checkpoint(ckpt, [1, 2], batch_size=2, **kwargs)
    alone = sampling.generate_from_checkpoint(ckpt, [1], batch_size=1, **kwargs)
    np.testing.assert_array_equal(both[:1], alone)


@pytest.mark.parametrize("options, words", [
    (dict(cache_interval=0), "--cache-interval 0"),
    (dict(cache_interval=2.5), "--cache-interval 2.5"),
    (dict(cache_start=-1), "--cache-start -1"),
    (dict(cache_above=1.0), "--cache-above 1.0"),
])
def test_bad_values_are_one_line(options, words):
    with pytest.raises(cli.UserError, match=words):
        sampling.make_sampler("ddim", 5, **options)


def test_dopri5_refuses_caching_in_one_line():
    with pytest.raises(cli.UserError, match="dopri5"):
        sampling.make_sampler("dopri5", None, FLOW_PROCESS, cache_interval=2)


# ------------------------------------------------------------------ part 9: sampling without host syncs
@pytest.mark.parametrize("name, steps, diffusion_args", [
    ("ddpm", 5, None), ("ddim", 5, None), ("dpm-solver", 5, None), ("euler", 4, FLOW_PROCESS), ("heun", 3, FLOW_PROCESS),
    ("sde", 4, FLOW_PROCESS)])
@pytest.mark.parametrize("seeded", [False, True])
def test_noise_level_decisions_read_no_timestep_back(name, steps, diffusion_args, seeded, monkeypatch):
    """--cfg-interval and --cache-interval decide by each call's noise level: from the host's copy of
    the timestep, so no float(t[0]) (a device-to-host sync on a GPU) per model call."""
    kwargs = dict(input_size=8, in_channels=1, num_classes=10)
    model = tiny_dit.tiny(**kwargs)
    model.load_state_dict(tiny_dit.random_state_dict(0, **kwargs))
    sampler = sampling.make_sampler(name, steps, diffusion_args, cfg_interval=(0.2, 0.8), cache_interval=2)
    generators = sampling.seeded_generators(0, [0, 1])
    step_noise = (lambda: sampling.draw(generators, (1, 8, 8))) if seeded else None
    reads = []
    real_float = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: (reads.append(self.shape), real_float(self))[1])
    out, stats = sampling.generate(model.eval(), sampler, [1, 2], 3.0, torch.randn(2, 1, 8, 8),
                                   step_noise=step_noise)
    assert reads == [] and stats.nfe > 0 and torch.isfinite(out).all()


def test_seeded_generators_live_on_a_cuda_device_and_stay_the_cpus_elsewhere(monkeypatch):
    made = []
    real_generator = torch.Generator

    class Recording:
        def __new__(cls, device="cpu"):
            made.append(torch.device(device))
            return real_generator()

    cpu = [g.initial_seed() for g in sampling.seeded_generators(5, [0, 7])]
    monkeypatch.setattr(torch, "Generator", Recording)
    sampling.seeded_generators(5, [0, 7], torch.device("cuda", 1))
    sampling.seeded_generators(5, [0, 7], "cpu")
    assert made == [torch.device("cuda", 1)] * 2 + [torch.device("cpu")] * 2
    monkeypatch.undo()
    # The seeds (and so the CPU draws) are the release's: (global seed, index) alone.
    assert cpu == [g.initial_seed() for g in sampling.seeded_generators(5, [0, 7], "cpu")]
    assert cpu[0] == sampling.seeded_generators(5, [3, 0])[1].initial_seed()


def test_noise_device_is_the_cuda_device_itself_and_the_cpu_for_any_other():
    assert sampling.noise_device("cuda:1") == torch.device("cuda", 1)
    assert sampling.noise_device(torch.device("cuda")) == torch.device("cuda")
    assert sampling.noise_device("cpu") == torch.device("cpu")
    assert sampling.noise_device("mps") == torch.device("cpu")


@cuda_only
def test_on_cuda_a_samples_image_does_not_depend_on_its_batch(tmp_path):
    ckpt = str(tmp_path / "tiny.pt")
    tiny_dit.write_checkpoint(ckpt, image_size=8, vae="none", in_channels=1)
    kwargs = dict(cfg_scale=2.0, sampler="ddpm", num_sampling_steps=6, seed=3, device="cuda")
    both = sampling.generate_from_checkpoint(ckpt, [1, 2, 1], batch_size=3, **kwargs)
    alone = sampling.generate_from_checkpoint(ckpt, [2], batch_size=1, **kwargs)
    np.testing.assert_allclose(both[1:2].astype(int), alone.astype(int), atol=1)
    generators = sampling.seeded_generators(0, [0, 1], "cuda")
    assert sampling.draw(generators, (1, 8, 8)).device.type == "cuda"


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


@pytest.mark.parametrize("options, words", [
    (dict(cfg_interval=(0.8, 0.2)), "--cfg-interval 0.8 0.2"),
    (dict(atol=0.0), "--atol 0.0"),
    (dict(sde_diffusion=-1.0), "--sde-diffusion -1.0"),
])
def test_bad_sampler_options_are_one_line(options, words):
    with pytest.raises(cli.UserError, match=words.replace(".", r"\.")):
        sampling.make_sampler("sde", 4, FLOW_ARGS, **options)


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
