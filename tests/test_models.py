"""models.py: the reference outputs in tests/golden and the paper's architecture, the conditioning
blocks (`block=`), positions (sincos, RoPE, none) at any size and non-square, and the modern
options (qk_norm, SwiGLU, RMSNorm) with every block."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import cli
from checkpoint import describe_state_dict, load_weights
from conftest import (BLOCK_TINY, GOLDEN, TINY, assert_checkpointing_keeps_the_gradients, assert_close_to_golden,
                      random_dit)
from diffusion import create_diffusion
from models import BLOCKS, create_model, DiT, DiT_models, DiTBlock, MMDiTBlock, rotate, sincos_pos_embed_2d
from timm.layers import RmsNorm, SwiGLU

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_block(block, seed=0, randomise=True, **kwargs):
    """A tiny DiT of `block` in training mode (see conftest.random_dit)."""
    return random_dit(seed, randomise, block=block, **{**BLOCK_TINY, **kwargs}).train()


def batch(n=4):
    return torch.randn(n, 4, 8, 8), torch.randint(0, 1000, (n,)), torch.randint(0, 5, (n,))


# ------------------------------------------------------------------ the released block is unchanged
def test_adaln_zero_init_draws_as_before():
    """The values models.py gave before the blocks existed (seed 0): the same random draws, in the same order."""
    torch.manual_seed(0)
    model = DiT(**BLOCK_TINY)
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


# ------------------------------------------------------------------ every block
@pytest.mark.parametrize("block", BLOCKS)
def test_shapes_guidance_halves_and_checkpointing(block):
    model = tiny_block(block).eval()
    x, t, y = batch()
    with torch.no_grad():
        assert model(x, t, y).shape == (4, 8, 8, 8)
        guided = model.forward_with_cfg(torch.cat([x[:2], x[:2]]), t, torch.tensor([1, 2, 5, 5]), 4.0)
    torch.testing.assert_close(guided[:2, :3], guided[2:, :3], rtol=0, atol=0)
    model.train()
    assert_checkpointing_keeps_the_gradients(model, x, t, y)


@pytest.mark.parametrize("block", BLOCKS)
def test_label_dropout_is_the_null_class(block):
    model = tiny_block(block, class_dropout_prob=1.0).train()
    x, t, _ = batch(2)
    with torch.no_grad():
        dropped = model(x, t, torch.tensor([0, 1]))
        null = model.eval()(x, t, torch.tensor([5, 5]))
    torch.testing.assert_close(dropped, null)


@pytest.mark.parametrize("block", BLOCKS)
def test_fresh_model_outputs_zero(block):
    """Every variant's output layer starts at zero (as the release's); the blocks are what differs."""
    x, t, y = batch()
    assert torch.count_nonzero(tiny_block(block, randomise=False)(x, t, y)) == 0


def test_zero_init_blocks_start_as_the_identity():
    model = tiny_block("adaLN-Zero", randomise=False)
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    assert torch.equal(model.blocks[0](x, c), x)
    mm = tiny_block("mm-dit", randomise=False)
    context = torch.randn(2, 4, 32)
    for block in mm.blocks:
        out, out_context = block(x, c, context)
        assert torch.equal(out, x) and torch.equal(out_context, context)
    # adaLN keeps an ordinary initialisation: its blocks change their input from the start.
    assert not torch.allclose(tiny_block("adaLN", randomise=False).blocks[0](x, c), x)


@pytest.mark.parametrize("block", BLOCKS)
def test_loss_falls_on_a_fixed_batch(block):
    torch.manual_seed(1)
    model = tiny_block(block, randomise=False, in_channels=1, class_dropout_prob=0.0)
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
    model = tiny_block("mm-dit").eval()
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
        tiny_block("cross-attention")(x, t, y, context=torch.randn(2, 7, 32))


def test_bad_block_arguments_are_one_line_user_errors():
    with pytest.raises(cli.UserError, match="unknown --block 'adaLN-zero'; choose one of: adaLN-Zero"):
        DiT(block="adaLN-zero", **BLOCK_TINY)
    with pytest.raises(cli.UserError, match="--context-tokens"):
        DiT(block="mm-dit", context_tokens=0, **BLOCK_TINY)


def test_block_classes_keep_their_released_signature():
    block = DiTBlock(32, 2)
    assert [name for name, _ in block.named_parameters()] == [
        "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"]
    assert isinstance(tiny_block("mm-dit").blocks[0], MMDiTBlock)


def _golden_model(golden, name):
    g = golden(name)
    model = DiT(**g["config"]).eval()
    model.load_state_dict(g["state_dict"], strict=True)
    return model, g


@pytest.mark.parametrize("name", ["model_p2_sigma.pt", "model_p4_nosigma.pt"])
def test_forward_matches_reference(golden, name):
    model, g = _golden_model(golden, name)
    with torch.no_grad():
        assert_close_to_golden(model(g["x"], g["t"], g["y"]), g["out"])
        cfg = model.forward_with_cfg(g["cfg_x"], g["cfg_t"], g["cfg_y"], g["cfg_scale"])
    assert_close_to_golden(cfg, g["cfg_out"])


@pytest.mark.parametrize("name", ["model_p2_sigma.pt", "model_p4_nosigma.pt"])
def test_fixed_positions_match_reference(golden, name):
    g = golden(name)
    assert_close_to_golden(DiT(**g["config"]).pos_embed, g["state_dict"]["pos_embed"])


def test_all_configs_names_shapes_counts():
    expected = json.loads((GOLDEN / "dit_state_dict_keys.json").read_text())
    assert len(expected) == 24
    assert {key.split("@")[0] for key in expected} <= set(DiT_models)
    with torch.device("meta"):
        for key, ref in expected.items():
            name, latent = key.split("@")
            model = DiT_models[name](input_size=int(latent))
            assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == ref["keys"], key
            assert sum(p.numel() for p in model.parameters()) == ref["num_params"], key
    assert expected["DiT-XL/2@32"]["num_params"] == 675_129_632


def test_fresh_model_outputs_exactly_zero():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    out = model(torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10]))
    assert out.shape == (3, 8, 8, 8)
    assert torch.count_nonzero(out) == 0
    assert not model.pos_embed.requires_grad


def _random_model(**kwargs):
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=5, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return model


def test_guidance_one_channel_never_guides_variance():
    model = _random_model(in_channels=1, learn_sigma=True)
    x = torch.randn(2, 1, 8, 8)
    x = torch.cat([x, x])
    t = torch.tensor([10, 20, 10, 20])
    y = torch.tensor([1, 3, 5, 5])
    with torch.no_grad():
        raw = model(x, t, y)
        out = model.forward_with_cfg(x, t, y, 4.0)
    cond, uncond = raw[:2], raw[2:]
    guided = uncond[:, :1] + 4.0 * (cond[:, :1] - uncond[:, :1])
    torch.testing.assert_close(out[:2, :1], guided)
    torch.testing.assert_close(out[2:, :1], guided)
    # The variance channel passes through untouched, each half keeping its own value.
    torch.testing.assert_close(out[:, 1:], raw[:, 1:])


def test_guidance_all_channels_option():
    model = _random_model(in_channels=4, learn_sigma=True)
    x = torch.randn(2, 4, 8, 8)
    x = torch.cat([x, x])
    t = torch.tensor([10, 20, 10, 20])
    y = torch.tensor([1, 3, 5, 5])
    with torch.no_grad():
        raw = model(x, t, y)
        default = model.forward_with_cfg(x, t, y, 2.0)
        full = model.forward_with_cfg(x, t, y, 2.0, guide_all_channels=True)
    guided = raw[2:, :4] + 2.0 * (raw[:2, :4] - raw[2:, :4])
    torch.testing.assert_close(default[:2, :3], guided[:, :3])
    torch.testing.assert_close(default[:, 3:], raw[:, 3:])  # channel 3 unguided, as the release does
    torch.testing.assert_close(full[:2, :4], guided)
    torch.testing.assert_close(full[:, 4:], raw[:, 4:])


def test_cfg_scale_one_equals_conditional():
    model = _random_model()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = model.forward_with_cfg(torch.cat([x, x]), torch.tensor([5, 6, 5, 6]), torch.tensor([1, 2, 5, 5]), 1.0,
                                     guide_all_channels=True)
        cond = model(x, torch.tensor([5, 6]), torch.tensor([1, 2]))
    torch.testing.assert_close(out[:2, :4], cond[:, :4], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_same_gradients():
    model = _random_model()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 7]), torch.tensor([0, 4])
    model(x, t, y).square().sum().backward()
    ref = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    model.gradient_checkpointing = True
    model(x, t, y).square().sum().backward()
    for a, p in zip(ref, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(p.grad, a)


def test_label_dropout_uses_null_row_in_training():
    model = _random_model(class_dropout_prob=1.0).train()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    with torch.no_grad():
        dropped = model(x, t, torch.tensor([0, 1]))
        null = model.eval()(x, t, torch.tensor([5, 5]))
    torch.testing.assert_close(dropped, null)


@pytest.mark.parametrize("kwargs, words", [
    (dict(input_size=30, patch_size=4), "not divisible by the patch size"),
    (dict(hidden_size=100, num_heads=6), "not divisible by the number of heads"),
])
def test_bad_constructor_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        DiT(depth=1, **{"hidden_size": 96, "num_heads": 6, **kwargs})


def test_unknown_model_name_lists_valid_ones():
    with pytest.raises(ValueError, match="DiT-XL/2.*DiT-S/8"):
        create_model("DiT-M/2")


def test_checkpoint_of_another_model_names_both():
    with torch.device("meta"):
        small = DiT_models["DiT-S/2"](input_size=32)
        other = DiT_models["DiT-B/4"](input_size=32).state_dict()
    with pytest.raises(ValueError, match=r"DiT-B/4.*DiT-S/2"):
        load_weights(small, other)
    assert describe_state_dict(small.state_dict()).startswith("DiT-S/2, input 32x32x4, 1000 classes")


def test_guidance_is_combined_in_float32_under_bf16_autocast():
    """Under bf16 autocast the model's two halves come out in bf16; the guided prediction is computed
    from them in float32 and rounded once (scale 4 would amplify bf16's rounding of the difference)."""
    model = _random_model(in_channels=4, learn_sigma=True)
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([5, 900, 5, 900]), torch.tensor([1, 2, 5, 5])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.cat([x[:2], x[:2]]), t, y)
        guided = model.forward_with_cfg(x, t, y, 4.0)
    assert out.dtype == guided.dtype == torch.bfloat16
    cond, uncond = out[:, :3].split(2)
    in_float32 = (uncond.float() + 4.0 * (cond.float() - uncond.float())).to(torch.bfloat16)
    in_bf16 = uncond + 4.0 * (cond - uncond)
    assert torch.equal(guided[:2, :3], in_float32) and torch.equal(guided[2:, :3], in_float32)
    assert not torch.equal(in_bf16, in_float32)  # the two ways differ: the test can tell them apart
    assert torch.equal(guided[:, 3:], out[:, 3:])  # the rest passes through


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
