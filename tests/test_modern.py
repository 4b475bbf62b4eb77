"""Positions, shapes and the modern block (models.py): non-square inputs and inputs of another size
than the model was built for. The released model at its own size is unchanged (tests/test_models.py
checks it against the reference outputs)."""
import pytest
import torch

import cli
from models import DiT, sincos_pos_embed_2d

TINY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5)


@pytest.fixture(autouse=True)
def one_thread():
    """Ops this small run faster on one thread; two only contend on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(input_size=8, seed=0, randomise=True, **kwargs):
    """A tiny DiT; randomise: every weight non-zero, as after training (a fresh one outputs zero)."""
    torch.manual_seed(seed)
    model = DiT(input_size=input_size, **{**TINY, **kwargs})
    if randomise:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.2)
    return model.eval()


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
        assert sorted(model.pos_tables) == [(4, 8, "cpu"), (6, 2, "cpu")]
        table = model.pos_tables[(4, 8, "cpu")]
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
