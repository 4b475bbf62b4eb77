"""Positions, shapes and the modern block (models.py): non-square inputs and inputs of another size
than the model was built for, 2D RoPE (pos=rope), qk_norm, SwiGLU and RMSNorm with every block, and
train.py -> checkpoint -> sample.py with them. The released model is unchanged (tests/test_models.py
checks it against the reference outputs, tests/test_blocks.py its initial draws)."""
import os

import pytest
import torch
import torch.nn as nn
from timm.layers import RmsNorm, SwiGLU

import checkpoint
import cli
import interop
import sample
import sampling
import train
from conftest import (EXPERIMENT, assert_checkpointing_keeps_the_gradients, pixel_args, random_dit, run_main,
                      write_images)
from models import BLOCKS, DiT, create_model, rotate, sincos_pos_embed_2d

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5)


def tiny(input_size=8, seed=0, randomise=True, **kwargs):
    """A tiny DiT (see conftest.random_dit)."""
    return random_dit(seed, randomise, input_size=input_size, **{**TINY, **kwargs})


def inputs(height, width, n=2, channels=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, channels, height, width, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 5, (n,), generator=g))


# ------------------------------------------------------------------ non-square inputs
def test_non_square_model_records_plain_values_and_runs():
    model = tiny((8, 16))
    assert model.model_args["input_size"] == [8, 16] and model.grid == (4, 8)
    assert DiT(**model.model_args).model_args == model.model_args  # rebuilds from its own record
    assert tiny((8, 8)).model_args["input_size"] == 8  # a square is recorded as an int, as before
    x, t, y = inputs(8, 16)
    with torch.no_grad():
        assert model(x, t, y).shape == (2, 8, 8, 16)


def test_sincos_table_of_a_rectangle_is_the_square_one_cut_to_its_rows_and_columns():
    square = sincos_pos_embed_2d(32, 8).view(8, 8, 32)
    torch.testing.assert_close(sincos_pos_embed_2d(32, (4, 8)).view(4, 8, 32), square[:4], rtol=0, atol=0)
    torch.testing.assert_close(sincos_pos_embed_2d(32, (8, 3)).view(8, 3, 32), square[:, :3], rtol=0, atol=0)


def test_unpatchify_follows_rows_and_columns():
    """Each output pixel is the token of its own (row, column): a token holding its index comes back as an image
    of its row * columns + column."""
    model = tiny((4, 6), in_channels=1, learn_sigma=False, patch_size=1)
    tokens = torch.arange(24.0).view(1, 24, 1)
    torch.testing.assert_close(model.unpatchify(tokens), torch.arange(24.0).view(1, 1, 4, 6))
    torch.testing.assert_close(model.unpatchify(tokens, (6, 4)), torch.arange(24.0).view(1, 1, 6, 4))


@pytest.mark.parametrize("block", ["adaLN-Zero", "in-context", "mm-dit"])
def test_sincos_model_runs_at_other_sizes_with_the_recomputed_table(block):
    """Built for 8x8, it takes 8x16 and 12x4: the table is computed for the input's grid, cached per grid; at
    its own size the stored pos_embed is used, bit for bit."""
    model = tiny(8, block=block)
    x, t, y = inputs(8, 8)
    with torch.no_grad():
        own = model(x, t, y)
        assert torch.equal(model(x, t, y), own) and not model.pos_tables
        for height, width in [(8, 16), (12, 4)]:
            xs, ts, ys = inputs(height, width)
            out = model(xs, ts, ys)
            assert out.shape == (2, 8, height, width) and torch.isfinite(out).all()
        assert sorted(model.pos_tables) == [("sincos", 4, 8, "cpu"), ("sincos", 6, 2, "cpu")]
        table = model.pos_tables[("sincos", 4, 8, "cpu")]
        torch.testing.assert_close(table[0], sincos_pos_embed_2d(32, (4, 8)), rtol=0, atol=0)


def test_in_context_output_keeps_the_image_tokens_of_the_input():
    """The two condition tokens sit after the image tokens whatever their number: changing the timestep must
    change the output of a 4x12 input everywhere, through attention only."""
    model = tiny(8, block="in-context")
    x, t, y = inputs(4, 12)
    with torch.no_grad():
        a, b = model(x, t, y), model(x, t + 100, y)
    assert a.shape == (2, 8, 4, 12) and not torch.allclose(a, b)


def test_bad_sizes_are_one_line_errors():
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        DiT(input_size=(8, 7), **TINY)
    with pytest.raises(cli.UserError, match="input_size must be a positive integer or"):
        DiT(input_size=(8, 8, 8), **TINY)
    with pytest.raises(cli.UserError, match="a 8x7 input is not divisible by the patch size 2"):
        tiny(8)(*inputs(8, 7))


# ------------------------------------------------------------------ RoPE
def rope_logits(model, grid, seed=0):
    """q . k of one query vector and one key vector placed at every token of the grid, after rotation:
    (rows, columns, rows, columns) logits, query position first."""
    g = torch.Generator().manual_seed(seed)
    head_dim = 16
    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)
    tokens = grid[0] * grid[1]
    rope = model.rotary(grid, torch.device("cpu"))
    q_rot = rotate(q.expand(1, 1, tokens, head_dim).double(), tuple(r.double() for r in rope))[0, 0]
    k_rot = rotate(k.expand(1, 1, tokens, head_dim).double(), tuple(r.double() for r in rope))[0, 0]
    return (q_rot @ k_rot.T).view(*grid, *grid)


def test_rope_logits_depend_only_on_the_offset_between_tokens():
    """For every pair of tokens: the logit equals that of the pair moved by any shift, along rows and along
    columns; and it does change with the offset (so positions are seen at all)."""
    model = tiny(8, pos="rope")
    logits = rope_logits(model, (5, 7))
    rows, cols = 5, 7
    by_offset = {}
    for i in range(rows):
        for j in range(cols):
            for i2 in range(rows):
                for j2 in range(cols):
                    by_offset.setdefault((i2 - i, j2 - j), []).append(logits[i, j, i2, j2])
    for offset, values in by_offset.items():
        values = torch.stack(values)
        # the sin and cos tables are float32: equal to their rounding (|q| |k| is about 16)
        torch.testing.assert_close(values, values[:1].expand_as(values), rtol=0, atol=1e-5, msg=str(offset))
    distinct = torch.stack([values[0] for values in by_offset.values()]).sort().values
    assert (distinct.diff() > 1e-3).float().mean() > 0.9  # and offsets are told apart


def test_rope_turns_half_of_each_head_with_the_row_and_half_with_the_column():
    model = tiny(8, pos="rope")
    x = torch.randn(16).expand(1, 1, 16, 16).contiguous()  # the same vector at every token
    grid = rotate(x, model.rotary((4, 4), torch.device("cpu")))[0, 0].view(4, 4, 16)
    torch.testing.assert_close(grid[:, :, :8], grid[:, :1, :8].expand(4, 4, 8))  # rows half: same along a row
    torch.testing.assert_close(grid[:, :, 8:], grid[:1, :, 8:].expand(4, 4, 8))  # columns half: same down a column
    assert not torch.allclose(grid[0, 0], grid[1, 1])
    torch.testing.assert_close(grid[0, 0], x[0, 0, 0])  # position (0, 0): no rotation


def test_rope_base_sets_the_frequencies():
    low, high = tiny(8, pos="rope", rope_base=100.0), tiny(8, pos="rope")
    sin_low, sin_high = low.rotary((4, 4), "cpu")[0], high.rotary((4, 4), "cpu")[0]
    # the slowest frequency of each axis: base ** (-3 / 4) with 4 frequencies per axis
    torch.testing.assert_close(sin_low[4, 6], torch.sin(torch.tensor(100.0 ** -0.75)))  # row 1, last row pair
    torch.testing.assert_close(sin_high[4, 6], torch.sin(torch.tensor(10000.0 ** -0.75)))


@pytest.mark.parametrize("block", BLOCKS)
def test_rope_model_runs_at_several_sizes(block):
    """Built at 8x8, one model takes 8x8, 8x16, 16x8 and 4x12; the rotation is what differs from pos=none
    (their state_dicts are the same: neither has a pos_embed)."""
    model = tiny(8, pos="rope", block=block)
    plain = DiT(input_size=8, pos="none", block=block, **TINY).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    assert "pos_embed" not in model.state_dict()
    for height, width in [(8, 8), (8, 16), (16, 8), (4, 12)]:
        x, t, y = inputs(height, width)
        with torch.no_grad():
            out = model(x, t, y)
            assert out.shape == (2, 8, height, width) and torch.isfinite(out).all()
            assert not torch.allclose(out, plain(x, t, y), atol=1e-4)


def test_without_positions_the_model_is_equivariant_to_transposing_the_image():
    """pos=none, patch 1: transposing the input permutes the tokens, so the output is transposed too; the
    sincos and rope models see the difference between rows and columns."""
    kwargs = dict(patch_size=1, in_channels=1, learn_sigma=False)
    x, t, y = inputs(4, 6, channels=1)
    for pos, equivariant in [("none", True), ("rope", False), ("sincos", False)]:
        model = tiny(8, pos=pos, **kwargs)
        with torch.no_grad():
            a, b = model(x, t, y).transpose(-1, -2), model(x.transpose(-1, -2), t, y)
        assert torch.allclose(a, b, atol=1e-5) == equivariant, pos


# ------------------------------------------------------------------ qk-norm, SwiGLU, RMSNorm with every block
OPTIONS = {"rope": dict(pos="rope"), "none": dict(pos="none"), "qk-norm": dict(qk_norm=True),
           "swiglu": dict(mlp="swiglu"), "rmsnorm": dict(norm="rmsnorm"),
           "modern": dict(pos="rope", qk_norm=True, mlp="swiglu", norm="rmsnorm")}


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("block", BLOCKS)
def test_every_block_composes_with_each_option(block, option):
    """Forward and backward on a non-square input; every weight gets a gradient (DDP needs it), gradient
    checkpointing gives the same gradients, guidance keeps the halves equal."""
    model = tiny(8, block=block, **OPTIONS[option]).train()
    x, t, y = inputs(8, 12, n=4)
    assert_checkpointing_keeps_the_gradients(model, x, t, y)
    with torch.no_grad():
        guided = model.eval().forward_with_cfg(torch.cat([x[:2], x[:2]]), t, torch.tensor([1, 2, 5, 5]), 4.0)
    torch.testing.assert_close(guided[:2, :3], guided[2:, :3], rtol=0, atol=0)


@pytest.mark.parametrize("block", BLOCKS)
def test_the_options_build_the_layers_they_name(block):
    model = tiny(8, block=block, qk_norm=True, mlp="swiglu", norm="rmsnorm")
    kinds = {type(m) for m in model.modules()}
    assert nn.LayerNorm not in kinds and RmsNorm in kinds and SwiGLU in kinds
    head_norms = [m for name, m in model.named_modules() if name.endswith(("q_norm", "k_norm"))]
    assert head_norms and all(isinstance(m, RmsNorm) and m.weight.shape == (16,) for m in head_norms)
    layer_norm_qk = tiny(8, block=block, qk_norm=True)
    assert all(isinstance(m, nn.LayerNorm) for name, m in layer_norm_qk.named_modules() if name.endswith("q_norm"))
    # the defaults add nothing to the released modules
    names = set(tiny(8, block=block).state_dict())
    assert not any("q_norm" in n or "fc1_g" in n for n in names)


def test_qk_norm_bounds_the_logits_whatever_the_weights():
    """With qk-norm the attention of a block does not change when its qkv weights are scaled up (each head's
    queries and keys are normalised); without, it does."""
    for qk_norm, unchanged in [(True, True), (False, False)]:
        model = tiny(8, qk_norm=qk_norm)
        attn = model.blocks[0].attn
        x = torch.randn(2, 16, 32)
        with torch.no_grad():
            before = attn(x)
            attn.qkv.weight[:64] *= 10  # queries and keys only
            attn.qkv.bias[:64] *= 10
            after = attn(x)
        assert torch.allclose(before, after, atol=1e-5) == unchanged


def test_swiglu_keeps_the_parameter_count():
    """DiT-T/2 and DiT-XL/2: SwiGLU's three matrices at 2/3 of the width cost within 0.1% of GELU's two."""
    for name, size in [("DiT-T/2", 8), ("DiT-XL/2", 32)]:
        with torch.device("meta"):
            counts = {mlp: sum(p.numel() for p in create_model(name, input_size=size, mlp=mlp).parameters())
                      for mlp in ("gelu", "swiglu")}
        assert counts["gelu"] != counts["swiglu"]
        assert abs(counts["swiglu"] / counts["gelu"] - 1) < 1e-3, counts


def test_bad_options_are_one_line_user_errors():
    with pytest.raises(cli.UserError, match="unknown --pos 'rotary'; choose one of: sincos, rope, none"):
        DiT(pos="rotary", **TINY)
    with pytest.raises(cli.UserError, match="unknown --mlp"):
        DiT(mlp="relu", **TINY)
    with pytest.raises(cli.UserError, match="unknown --norm"):
        DiT(norm="batchnorm", **TINY)
    with pytest.raises(cli.UserError, match="--pos rope needs a head size that is a multiple of 4"):
        DiT(pos="rope", **{**TINY, "hidden_size": 36, "num_heads": 6})
    with pytest.raises(cli.UserError, match="--rope-base must be a number above 1"):
        DiT(pos="rope", rope_base=0.5, **TINY)


# ------------------------------------------------------------------ flags and checkpoints
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


def test_older_checkpoints_get_the_release_options():
    old = dict(DiT(**TINY).model_args)
    for name in ("pos", "rope_base", "qk_norm", "mlp", "norm"):
        del old[name]
    completed = checkpoint.complete_model_args(old)
    assert {k: completed[k] for k in ("pos", "qk_norm", "mlp", "norm")} == \
        dict(pos="sincos", qk_norm=False, mlp="gelu", norm="layernorm")


@pytest.mark.parametrize("option", [dict(pos="rope"), dict(qk_norm=True), dict(mlp="swiglu"), dict(norm="rmsnorm"),
                                    dict(input_size=[8, 16])])
def test_diffusers_export_refuses_what_dit_transformer_cannot_hold(option):
    model_args = checkpoint.complete_model_args({**DiT(**TINY, input_size=8).model_args, **option})
    with pytest.raises(cli.UserError, match="export it as .safetensors instead"):
        interop.diffusers_config(model_args)


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("pixels"))


MODERN_FLAGS = ["--pos", "rope", "--rope-base", "100", "--qk-norm", "--mlp", "swiglu", "--norm", "rmsnorm"]


def test_checkpoint_rebuilds_the_modern_model_in_sample_py(pixels, tmp_path):
    assert run_main(pixel_args(pixels, tmp_path, "--max-steps", 2, *MODERN_FLAGS)) is None
    ckpt = os.path.join(tmp_path, EXPERIMENT, "checkpoints", "0000002.pt")
    recorded = torch.load(ckpt, weights_only=True)["model_args"]
    assert {k: recorded[k] for k in ("pos", "rope_base", "qk_norm", "mlp", "norm")} == \
        dict(pos="rope", rope_base=100.0, qk_norm=True, mlp="swiglu", norm="rmsnorm")
    images = sample.main(["--ckpt", ckpt, "--sampler", "ddim", "--num-sampling-steps", "2", "--output",
                          str(tmp_path / "grid.png")])
    assert images.shape == (3, 8, 8, 1)
    model, _ = sampling.load_model(sample.parse_args(["--ckpt", ckpt]), torch.device("cpu"))
    assert (model.config.pos, model.config.rope_base, model.model_args["qk_norm"]) == ("rope", 100.0, True)
    # resuming keeps the options; a sampling flag that changes the weights is refused in one line
    assert run_main(pixel_args(pixels, tmp_path, "--max-steps", 3, *MODERN_FLAGS, "--resume", "auto")) is None
    with pytest.raises(cli.UserError, match="qk-norm"):
        sampling.load_model(sample.parse_args(["--ckpt", ckpt, "--no-qk-norm"]), torch.device("cpu"))
    # flags that change no shapes would run the same weights as another network: refused too
    for flags, words in ((["--norm", "layernorm"], "trained with --norm rmsnorm"),
                         (["--rope-base", "10000"], "trained with --rope-base 100.0"),
                         (["--pos", "none"], "trained with --pos rope")):
        with pytest.raises(cli.UserError, match=words):
            sampling.load_model(sample.parse_args(["--ckpt", ckpt, *flags]), torch.device("cpu"))
    model, _ = sampling.load_model(sample.parse_args(["--ckpt", ckpt, "--norm", "rmsnorm"]), torch.device("cpu"))
    assert model.model_args["norm"] == "rmsnorm"  # the checkpoint's own value is fine
