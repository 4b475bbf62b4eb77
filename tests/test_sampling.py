"""Block caching (--cache-interval, --cache-start; sampling.BlockCache): interval 1 is the default
path exactly, cached samples stay close to the uncached ones, the number of block evaluations
drops as designed for every block type and sampler, the flags reach every script, bad values
are one line."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cli
import digits
import sample
import sample_ddp
import sampling
import tiny_dit
from models import BLOCKS

tiny_dit.register()
FLOW_ARGS = {"objective": "flow", "t_sampling": "uniform", "t_mean": 0.0, "t_scale": 1.0}
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
    ("euler", 4, FLOW_ARGS, 4), ("heun", 3, FLOW_ARGS, 5), ("sde", 4, FLOW_ARGS, 4)])
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


def test_flags_reach_sample_py(pixel_ckpt, tmp_path):
    argv = ["--ckpt", pixel_ckpt, "--device", "cpu", "--sampler", "ddim", "--num-sampling-steps", "6",
            "--class-labels", "1", "2", "--output", str(tmp_path / "grid.png")]
    plain = sample.main(argv)
    cached = sample.main(argv + ["--cache-interval", "2"])
    again = sample.main(argv + ["--cache-interval", "2", "--cache-start", "0"])
    assert (cached != plain).any()
    np.testing.assert_array_equal(cached, again)


def test_flags_reach_sample_ddp_its_record_and_folder(pixel_ckpt, tmp_path, capsys):
    argv = ["--ckpt", pixel_ckpt, "--device", "cpu", "--num-fid-samples", "3", "--per-proc-batch-size", "2",
            "--sampler", "ddim", "--num-sampling-steps", "4", "--sample-dir", str(tmp_path)]
    plain = sample_ddp.main(argv)
    cached = sample_ddp.main(argv + ["--cache-interval", "2", "--cache-start", "1", "--cache-above", "0.1"])
    assert cached != plain and cached.endswith("-cache-2-from-1-above-0.1.npz")
    with open(cached[:-len(".npz")] + ".json") as f:
        record = json.load(f)
    assert (record["cache_interval"], record["cache_start"], record["cache_above"]) == (2, 1, 0.1)
    assert (np.load(cached)["arr_0"] != np.load(plain)["arr_0"]).any()
    os.remove(cached)  # resuming completes the set from the PNGs, with the same settings
    assert sample_ddp.main(argv + ["--cache-interval", "2", "--cache-start", "1", "--cache-above", "0.1"]) == cached


def test_flags_reach_digits_score(pixel_ckpt, monkeypatch):
    seen = {}

    def fake_generate(ckpt, labels, **kwargs):
        seen.update(kwargs)
        return (np.zeros((len(labels), 8, 8, 1), np.uint8), SimpleNamespace(name="ddim", steps=4),
                sampling.Stats(nfe=4))
    monkeypatch.setattr(sampling, "generate_from_checkpoint", fake_generate)
    monkeypatch.setattr(digits, "DigitScorer", lambda: SimpleNamespace(
        score=lambda images, labels: {"accuracy": 0.0, "frechet_distance": 0.0}))
    digits.main(["score", "--ckpt", pixel_ckpt, "--per-class", "1", "--cache-interval", "3", "--cache-start", "1",
                 "--cache-above", "0.2"])
    assert (seen["cache_interval"], seen["cache_start"], seen["cache_above"]) == (3, 1, 0.2)


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
        sampling.make_sampler("dopri5", None, FLOW_ARGS, cache_interval=2)


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
