"""models.py against the reference outputs in tests/golden and the paper's architecture."""
import json

import pytest
import torch

from conftest import GOLDEN, assert_close_to_golden
from checkpoint import describe_state_dict, load_weights
from models import DiT, DiT_models, create_model


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
