"""train.py --fsdp (sharding.py): FSDP2 on 2 gloo processes trains as DDP does, writes checkpoints in
today's format (sample.py reads them, a resume with or without --fsdp continues them), resumes
exactly, accumulates gradients through FSDP's no-sync switch, samples and evaluates from a gathered
copy of the EMA as DDP does, and refuses fp16."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import evaluate
import sample
import train
from conftest import (EXPERIMENT, STEPS, checkpoint, metrics, pixel_args, run_main, subprocess_env, torchrun,
                      write_eval_ref, write_images)
from inception_stub import TinyFeatures, write_fake_inception_weights


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("pixels"))


@pytest.fixture(scope="module")
def ddp_run(pixels, tmp_path_factory):
    results = tmp_path_factory.mktemp("ddp")
    torchrun("train.py", *pixel_args(pixels, results, "--max-steps", STEPS))
    return results


@pytest.fixture(scope="module")
def fsdp_run(pixels, tmp_path_factory):
    """STEPS steps with --fsdp on 2 processes, a checkpoint at step 4 (mid-epoch) and at STEPS."""
    results = tmp_path_factory.mktemp("fsdp")
    torchrun("train.py", *pixel_args(pixels, results, "--max-steps", STEPS, "--fsdp"))
    return results


def max_difference(ours, ref, key):
    return max((ours[key][name] - ref[key][name]).abs().max().item() for name in ref[key])


def assert_same_training(ours, ref, exact=False):
    """The same weights, EMA and AdamW moments: bit for bit (exact) or within float32 rounding of
    their magnitude (another reduction order, or AdamW's other kernel: --compile's fused)."""
    assert list(ours["model"]) == list(ref["model"]) and list(ours["ema"]) == list(ref["ema"])
    kernel = () if exact else ("fused", "foreach")
    groups = [[{k: v for k, v in group.items() if k not in kernel} for group in ckpt["opt"]["param_groups"]]
              for ckpt in (ours, ref)]
    assert groups[0] == groups[1]
    assert list(ours["opt"]["state"]) == list(ref["opt"]["state"])
    pairs = [(ours[key][name], ref[key][name], f"{key}.{name}") for key in ("model", "ema") for name in ref[key]]
    pairs += [(ours["opt"]["state"][i][m], ref["opt"]["state"][i][m], f"opt.{i}.{m}")
              for i in ref["opt"]["state"] for m in ("step", "exp_avg", "exp_avg_sq")]
    for a, b, name in pairs:
        if exact:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item()), msg=name)


@pytest.mark.slow
def test_fsdp_matches_ddp(fsdp_run, ddp_run):
    ours, ref = checkpoint(fsdp_run, STEPS), checkpoint(ddp_run, STEPS)
    print(f"max |fsdp - ddp| after {STEPS} steps: model {max_difference(ours, ref, 'model'):.2e}, "
          f"ema {max_difference(ours, ref, 'ema'):.2e}")
    assert_same_training(ours, ref)
    assert ours["args"]["fsdp"] and ours["world_size"] == 2
    assert max_difference(ours, checkpoint(fsdp_run, 4), "model") > 1e-4  # it trained on after step 4
    np.testing.assert_allclose([r["loss"] for r in metrics(fsdp_run)], [r["loss"] for r in metrics(ddp_run)],
                               rtol=1e-5)


@pytest.mark.slow
def test_fsdp_resume_is_exact(pixels, fsdp_run, tmp_path):
    """From the --fsdp checkpoint at step 4, on with --fsdp: the uninterrupted run's weights bit for bit."""
    resume = os.path.join(fsdp_run, EXPERIMENT, "checkpoints", "0000004.pt")
    torchrun("train.py", *pixel_args(pixels, tmp_path, "--max-steps", STEPS, "--fsdp", "--resume", resume))
    assert_same_training(checkpoint(tmp_path, STEPS), checkpoint(fsdp_run, STEPS), exact=True)
    ours = [(r["step"], r["loss"]) for r in metrics(tmp_path)]
    assert ours == [(r["step"], r["loss"]) for r in metrics(fsdp_run)][4:]


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_without_fsdp_on_one_process(pixels, fsdp_run, tmp_path):
    resume = os.path.join(fsdp_run, EXPERIMENT, "checkpoints", "0000004.pt")
    assert run_main(pixel_args(pixels, tmp_path, "--max-steps", STEPS, "--resume", resume)) is None
    assert_same_training(checkpoint(tmp_path, STEPS), checkpoint(fsdp_run, STEPS))


@pytest.mark.slow
def test_fsdp_checkpoint_samples_as_the_ddp_one(fsdp_run, ddp_run, tmp_path):
    def draw(results):
        ckpt = os.path.join(results, EXPERIMENT, "checkpoints", f"{STEPS:07d}.pt")
        return sample.main(["--ckpt", ckpt, "--num-sampling-steps", "5", "--class-labels", "0 1 2",
                            "--output", str(tmp_path / "grid.png"), "--seed", "1"])

    ours, ref = draw(fsdp_run), draw(ddp_run)
    assert ours.shape == (3, 8, 8, 1) and ours.std() > 0
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1  # uint8: a rounding step at most


@pytest.mark.slow
def test_fsdp_grad_accumulation_matches_one_micro_batch(pixels, fsdp_run, tmp_path):
    """2 processes x 2 micro-batches under FSDP's no-sync switch = the same global batch in one."""
    torchrun("train.py", *pixel_args(pixels, tmp_path, "--max-steps", STEPS, "--fsdp", "--grad-accum-steps", 2))
    assert_same_training(checkpoint(tmp_path, STEPS), checkpoint(fsdp_run, STEPS))


@pytest.mark.slow
def test_fsdp_with_compile_matches_fsdp(pixels, fsdp_run, tmp_path):
    """--compile (the blocks, after sharding; AdamW fused) under --fsdp: the same training within rounding."""
    torchrun("train.py", *pixel_args(pixels, tmp_path, "--max-steps", 4, "--fsdp", "--compile"))
    assert_same_training(checkpoint(tmp_path, 4), checkpoint(fsdp_run, 4))


def test_fsdp_on_one_process_trains_as_without(pixels, tmp_path):
    """Allowed on one process (nothing to shard: each "shard" is the whole tensor), through the same
    code: same training, the checkpoint in the same format."""
    assert run_main(pixel_args(pixels, tmp_path / "plain", "--max-steps", 2)) is None
    assert run_main(pixel_args(pixels, tmp_path / "fsdp", "--max-steps", 2, "--fsdp")) is None
    assert_same_training(checkpoint(tmp_path / "fsdp", 2), checkpoint(tmp_path / "plain", 2))


def test_fsdp_refuses_fp16():
    args = train.parse_args(["--data-path", "x", "--fsdp", "--precision", "fp16"])
    with pytest.raises(cli.UserError, match="--fsdp does not combine with --precision fp16.*use --precision bf16") as e:
        train.check_args(args)
    assert "\n" not in str(e.value)
    train.check_args(train.parse_args(["--data-path", "x", "--precision", "fp16"]))  # fine without --fsdp


@pytest.mark.slow
def test_fsdp_samples_and_evaluates_as_ddp_while_training_on_unchanged(pixels, fsdp_run, tmp_path):
    """--sample-every and --eval-every under --fsdp draw from a whole copy of the sharded EMA: the
    grid and the FID of the DDP run, and the training goes on exactly as without them."""
    ref = write_eval_ref(tmp_path / "ref.npz")
    env = subprocess_env()
    env["TORCH_HOME"] = str(tmp_path / "torch_home")
    write_fake_inception_weights(env["TORCH_HOME"])
    watch = ["--sample-every", 4, "--eval-every", 4, "--eval-ref", ref, "--eval-num-samples", 16,
             "--num-sampling-steps", 2]
    for name, flags in (("fsdp", ["--fsdp"]), ("ddp", [])):
        torchrun("train.py", *pixel_args(pixels, tmp_path / name, "--max-steps", STEPS, *flags, *watch), env=env)
    assert_same_training(checkpoint(tmp_path / "fsdp", STEPS), checkpoint(fsdp_run, STEPS), exact=True)
    for step in (4, STEPS):
        grids = [np.asarray(Image.open(tmp_path / name / EXPERIMENT / "samples" / f"{step:07d}.png")).astype(int)
                 for name in ("fsdp", "ddp")]
        assert grids[0].shape == grids[1].shape and grids[0].std() > 0
        assert np.abs(grids[0] - grids[1]).max() <= 1  # uint8: a rounding step at most
    for name in ("fsdp", "ddp"):  # both ranks drew their share (the value needs more images than 16: next test)
        log = (tmp_path / name / EXPERIMENT / "log.txt").read_text()
        assert [f"(step={step:07d}) FID" in log for step in (4, STEPS)] == [True, True]


def test_fsdp_eval_every_logs_the_fid_without_fsdp(pixels, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "load_inception", lambda device: TinyFeatures(cache_key=None))
    ref = write_eval_ref(tmp_path / "ref.npz")
    fids = []
    for name, flags in (("fsdp", ["--fsdp"]), ("plain", [])):
        assert run_main(pixel_args(pixels, tmp_path / name, "--max-steps", 2, "--eval-every", 2, "--eval-ref", ref,
                                   "--eval-num-samples", 24, "--num-sampling-steps", 2, *flags)) is None
        fids.append([r["fid"] for r in metrics(tmp_path / name) if "fid" in r])
    assert len(fids[0]) == 1 and np.isfinite(fids[0][0]) and fids[0][0] > 0
    np.testing.assert_allclose(fids[0], fids[1], rtol=1e-4)
