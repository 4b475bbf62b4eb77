"""The conditioning blocks (models.py `block=`), their Gflops (flops.py) and the
ablation runner (ablate.py): each block trains, guides, checkpoints its activations and goes
through train.py -> sample.py; the released adaLN-Zero model is unchanged (with
tests/test_models.py, which checks it against the reference outputs)."""
import json
import os

import numpy as np
import pytest
import torch

import ablate
import cli
import distributed
import flops
import sample
import sampling
import train
from conftest import (EXPERIMENT, assert_checkpointing_keeps_the_gradients, pixel_args, random_dit, run_main,
                      write_images)
from diffusion import create_diffusion
from models import BLOCKS, DiT, DiTBlock, MMDiTBlock

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5)


def tiny(block, seed=0, randomise=True, **kwargs):
    """A tiny DiT of `block` in training mode (see conftest.random_dit)."""
    return random_dit(seed, randomise, block=block, **{**TINY, **kwargs}).train()


def batch(n=4):
    return torch.randn(n, 4, 8, 8), torch.randint(0, 1000, (n,)), torch.randint(0, 5, (n,))


# ------------------------------------------------------------------ the released block is unchanged
def test_adaln_zero_init_draws_as_before():
    """The values models.py gave before the blocks existed (seed 0): the same random draws, in the same order."""
    torch.manual_seed(0)
    model = DiT(**TINY)
    assert torch.rand(2).tolist() == [0.9475067257881165, 0.21353131532669067]  # nothing more was drawn
    state = model.state_dict()
    expected = {"x_embedder.proj.weight": [-0.0034280980471521616, 0.23527002334594727],
                "blocks.1.attn.qkv.weight": [-0.05334342271089554, -0.033941879868507385],
                "blocks.1.mlp.fc2.weight": [0.024186501279473305, 0.07092539966106415],
                "y_embedder.embedding_table.weight": [-0.0001590749016031623, -0.0023646929766982794],
                "t_embedder.mlp.2.weight": [-0.03054826892912388, -0.0035397731699049473]}
    for name, values in expected.items():
        assert state[name].flatten()[:2].tolist() == values, name
    assert model.model_args["block"] == "adaLN-Zero"


def test_every_block_is_a_training_flag_that_reaches_the_model():
    """--block's choices and default come from models.DiTConfig: each parses and builds its block."""
    for block in BLOCKS:
        args = train.parse_args(["--data-path", "x", "--block", block])
        assert cli.model_variant_args(args)["block"] == block and DiT(**TINY, block=block).config.block == block
    assert train.apply_checkpoint_settings(train.parse_args(["--data-path", "x"]), None).block == "adaLN-Zero"
    with pytest.raises(SystemExit):
        train.parse_args(["--data-path", "x", "--block", "adaLN-zero"])


# ------------------------------------------------------------------ every block
@pytest.mark.parametrize("block", BLOCKS)
def test_shapes_guidance_halves_and_checkpointing(block):
    model = tiny(block).eval()
    x, t, y = batch()
    with torch.no_grad():
        assert model(x, t, y).shape == (4, 8, 8, 8)
        guided = model.forward_with_cfg(torch.cat([x[:2], x[:2]]), t, torch.tensor([1, 2, 5, 5]), 4.0)
    torch.testing.assert_close(guided[:2, :3], guided[2:, :3], rtol=0, atol=0)
    model.train()
    assert_checkpointing_keeps_the_gradients(model, x, t, y)


@pytest.mark.parametrize("block", BLOCKS)
def test_label_dropout_is_the_null_class(block):
    model = tiny(block, class_dropout_prob=1.0).train()
    x, t, _ = batch(2)
    with torch.no_grad():
        dropped = model(x, t, torch.tensor([0, 1]))
        null = model.eval()(x, t, torch.tensor([5, 5]))
    torch.testing.assert_close(dropped, null)


@pytest.mark.parametrize("block", BLOCKS)
def test_fresh_model_outputs_zero(block):
    """Every variant's output layer starts at zero (as the release's); the blocks are what differs."""
    x, t, y = batch()
    assert torch.count_nonzero(tiny(block, randomise=False)(x, t, y)) == 0


def test_zero_init_blocks_start_as_the_identity():
    model = tiny("adaLN-Zero", randomise=False)
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    assert torch.equal(model.blocks[0](x, c), x)
    mm = tiny("mm-dit", randomise=False)
    context = torch.randn(2, 4, 32)
    for block in mm.blocks:
        out, out_context = block(x, c, context)
        assert torch.equal(out, x) and torch.equal(out_context, context)
    # adaLN keeps an ordinary initialisation: its blocks change their input from the start.
    assert not torch.allclose(tiny("adaLN", randomise=False).blocks[0](x, c), x)


@pytest.mark.parametrize("block", BLOCKS)
def test_loss_falls_on_a_fixed_batch(block):
    torch.manual_seed(1)
    model = tiny(block, randomise=False, in_channels=1, class_dropout_prob=0.0)
    diffusion = create_diffusion("")
    x = torch.randn(16, 1, 8, 8).clamp(-1, 1)
    t, y, noise = torch.randint(0, 1000, (16,)), torch.randint(0, 5, (16,)), torch.randn(16, 1, 8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = diffusion.training_losses(model, x, t, dict(y=y), noise=noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_mm_dit_takes_any_condition_sequence():
    model = tiny("mm-dit").eval()
    x, t, y = batch(2)
    with torch.no_grad():
        own = model(x, t, y)
        explicit = model(x, t, y, context=model.class_tokens(y))
        longer = model(x, t, y, context=torch.randn(2, 7, 32))
        guided = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.tensor([1, 2, 5, 5]), 3.0,
                                        context=torch.randn(4, 7, 32))
    torch.testing.assert_close(own, explicit)
    assert longer.shape == own.shape and not torch.allclose(longer, own)
    assert guided.shape == (4, 8, 8, 8)
    assert [p.shape for p in model.class_tokens.parameters()] == [(6, 4 * 32)]  # 5 classes and the null one
    assert not hasattr(model.blocks[-1].context, "mlp")  # the last block's condition output is never read
    with pytest.raises(ValueError, match="context must be"):
        model(x, t, y, context=torch.randn(2, 7, 16))
    with pytest.raises(ValueError, match="mm-dit"):
        tiny("cross-attention")(x, t, y, context=torch.randn(2, 7, 32))


def test_bad_block_arguments_are_one_line_user_errors():
    with pytest.raises(cli.UserError, match="unknown --block 'adaLN-zero'; choose one of: adaLN-Zero"):
        DiT(block="adaLN-zero", **TINY)
    with pytest.raises(cli.UserError, match="--context-tokens"):
        DiT(block="mm-dit", context_tokens=0, **TINY)


def test_block_classes_keep_their_released_signature():
    block = DiTBlock(32, 2)
    assert [name for name, _ in block.named_parameters()] == [
        "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"]
    assert isinstance(tiny("mm-dit").blocks[0], MMDiTBlock)


# ------------------------------------------------------------------ train.py -> checkpoint -> sample.py
@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("pixels"))


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


# ------------------------------------------------------------------ Gflops as the paper counts them
@pytest.mark.parametrize("name", list(flops.PAPER_GFLOPS))
def test_gflops_match_the_paper(name):
    """Table 4 of the paper, every config (built on the meta device: about a second each)."""
    params, gflops = flops.params_and_gflops(flops.model_args_for(name, input_size=32))
    assert round(gflops, 2) == flops.PAPER_GFLOPS[name]  # the table's figure to its last digit


def test_cross_attention_costs_about_15_percent_more():
    table = flops.rows(["DiT-S/2"], ["adaLN-Zero", "cross-attention", "in-context"])
    change = {row["block"]: row["vs_adaln_zero"] for row in table}
    assert change["adaLN-Zero"] == 0 and 0.13 < change["cross-attention"] < 0.17
    assert 0 < change["in-context"] < 0.01  # two more tokens than 256
    assert "| DiT-S/2 | adaLN-Zero | 32.96M | 6.06 | +0.0% | 6.06 |" in flops.markdown(table)


# ------------------------------------------------------------------ ablate.py
def test_ablate_refuses_bad_input():
    with pytest.raises(cli.UserError, match="KEY=V1,V2"):
        ablate.make_variants(ablate.parse_args(["--vary", "block"])[0])
    with pytest.raises(cli.UserError, match="--cfg-scale"):
        ablate.parse_cfg_scales("1,nan")
    with pytest.raises(cli.UserError, match="--seeds"):
        ablate.make_variants(ablate.parse_args(["--vary", "block=adaLN", "--seeds", "a"])[0])
    with pytest.raises(cli.UserError, match="--max-steps is set by ablate.py"):
        ablate.parse_args(["--vary", "block=adaLN", "--max-steps", "5"])
    with pytest.raises(cli.UserError, match="variant block=adaLN-zero, seed=0: argument --block: invalid choice"):
        ablate.main(["--vary", "block=adaLN-zero"])


def test_ablate_variants_make_a_grid():
    args, extra = ablate.parse_args(["--vary", "block=adaLN,mm-dit", "--vary", "grad-checkpointing=on,off",
                                     "--seeds", "0,1", "--lr", "1e-3"])
    variants = ablate.make_variants(args)
    assert len(variants) == 8 and len({v.folder for v in variants}) == 8
    assert variants[0].name == "block=adaLN, grad-checkpointing=on, seed=0"
    assert variants[1].flags == ["--block", "adaLN"]  # a store_true switch left off
    argv = ablate.train_argv(args, extra, variants[0])
    assert argv[argv.index("--lr", argv.index("--lr") + 1) + 1] == "1e-3"  # the user's flag wins over the demo's
    assert argv[-2:] == ["--global-seed", "0"]


@pytest.mark.parametrize("argv,words", [
    (["--vary", "objective=eps,flow"], ["variant objective=flow, seed=0, scoring", "--sampler dpm-solver needs",
                                        "use heun"]),
    (["--vary", "lr=1e-3", "--sampler", "euler"], ["variant lr=1e-3, seed=0, scoring", "--sampler euler needs"]),
    (["--vary", "lr=1e-3", "--device", "cuda"], ["--device cuda", "no CUDA GPU"]),
])
def test_ablate_checks_every_variants_scoring_before_any_training(tmp_path, monkeypatch, argv, words):
    monkeypatch.setattr(ablate, "train_variant", lambda *a: pytest.fail("trained before checking"))
    monkeypatch.setattr(distributed, "visible_cuda_devices", lambda: 0)  # a CPU machine, also on a GPU one
    with pytest.raises(cli.UserError) as e:
        ablate.main([*argv, "--steps", "2", "--out", str(tmp_path / "out")])
    for text in words:
        assert text in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()  # nothing written either


def test_ablate_sampler_names_are_argparse_choices_and_help_shows_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        ablate.parse_args(["--vary", "lr=1e-3", "--sampler", "bogus"])
    assert "argument --sampler: invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablate.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "(default: 2000)" in out and "(default: dpm-solver)" in out and "(default: 25)" in out


class StubScorer:
    """Stands in for the digit classifier (fitting it takes ~10 s; tests/test_digits.py checks it)."""
    calls = 0

    def score(self, images, labels):
        StubScorer.calls += 1
        return {"accuracy": float(images.mean() / 255), "frechet_distance": float(len(labels))}


@pytest.mark.slow
def test_ablate_trains_scores_plots_and_does_not_retrain(pixels, tmp_path, monkeypatch):
    monkeypatch.setattr(ablate, "lazy_scorer", lambda: StubScorer)
    out = tmp_path / "ablation"
    argv = ["--vary", "block=adaLN-Zero,in-context", "--steps", 4, "--evals", 2, "--nproc", 1, "--out", out,
            "--data-path", pixels, "--num-classes", 3, "--global-batch-size", 8, "--per-class", 2,
            "--num-sampling-steps", 2, "--log-every", 1]
    results = ablate.main(argv)
    assert [r["name"] for r in results] == ["block=adaLN-Zero, seed=0", "block=in-context, seed=0"]
    for r in results:  # guidance 1 and 4 (the default), at both checkpoints
        assert {cfg: sorted(steps) for cfg, steps in r["scores"].items()} == {1.0: [2, 4], 4.0: [2, 4]}
        assert len(r["loss"]) == 4 and r["gflops"] > 0 and r["params"] > 0
    table = (out / "ablation.md").read_text()
    assert table.count("| block=") == 2 and "Command: `python ablate.py --vary block=adaLN-Zero,in-context" in table
    assert "| accuracy, guidance 1 | Frechet distance, guidance 1 | accuracy, guidance 4 |" in table
    assert (out / "ablation.png").stat().st_size > 10_000
    assert len(json.loads((out / "ablation.json").read_text())) == 2
    calls, written = StubScorer.calls, {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/checkpoints/*.pt")}
    assert calls == 8 and len(written) == 4
    again = ablate.main(argv)  # all done: nothing trained or scored again
    assert StubScorer.calls == calls
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/checkpoints/*.pt")} == written
    assert [r["scores"] for r in again] == [r["scores"] for r in results]
    with pytest.raises(cli.UserError, match="trained with other flags"):
        ablate.main(argv + ["--lr", "1e-3"])
