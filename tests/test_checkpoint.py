"""checkpoint.py: .safetensors round trips that keep the EMA weights and settings, unreadable or NaN
files refused in one line, the command line, model settings completed for older checkpoints, and
load_train's memory map."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import cli
import download
import sample
import tiny_dit
from conftest import ROOT, TINY, one_error_line
from models import DiT

tiny_dit.register()


# ------------------------------------------------------------------ safetensors
def test_safetensors_round_trip_keeps_the_ema_weights_and_settings(tmp_path, latent_ckpt):
    out = checkpoint.export_safetensors(latent_ckpt, tmp_path / "tiny.safetensors")
    original, again = checkpoint.load(latent_ckpt), checkpoint.load(str(out))
    ema = torch.load(latent_ckpt, weights_only=True)["ema"]
    assert set(again.state_dict) == set(ema)
    for name, value in ema.items():
        assert torch.equal(again.state_dict[name], value), name
    # format-1 checkpoints (as this one) record a named config's arguments: the file has them all
    assert again.model_args == checkpoint.build_model(original.model_args).model_args
    assert again.model_args["num_classes"] == 1000 and again.model_args["learn_sigma"] is True
    assert again.diffusion_args == original.diffusion_args
    assert again.settings == original.settings and again.settings["model"] == tiny_dit.TINY_MODEL


def test_sample_py_draws_the_same_image_from_safetensors_as_from_the_pt(tmp_path):
    pt = tmp_path / "pixel.pt"
    tiny_dit.write_checkpoint(pt, image_size=8, vae="none", in_channels=1)
    st = checkpoint.export_safetensors(str(pt), str(tmp_path / "pixel.safetensors"))
    flags = ["--seed", "2", "--num-sampling-steps", "6", "--class-labels", "0 3 9", "--output"]
    from_pt = sample.main(["--ckpt", str(pt), *flags, str(tmp_path / "a.png")])
    from_st = sample.main(["--ckpt", st, *flags, str(tmp_path / "b.png")])
    assert from_pt.shape == (3, 8, 8, 1) and from_pt.std() > 0
    np.testing.assert_array_equal(from_st, from_pt)


def test_bare_safetensors_state_dict_reads_its_config_off_the_shapes(tmp_path):
    from safetensors.torch import save_file

    weights = tiny_dit.random_state_dict(3, input_size=4, num_classes=10)
    save_file(weights, tmp_path / "bare.safetensors")
    loaded = checkpoint.load(str(tmp_path / "bare.safetensors"))
    assert loaded.model_args == checkpoint.model_args_from_state_dict(weights)
    assert (loaded.model_args["depth"], loaded.model_args["num_classes"]) == (2, 10)
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in weights.items())


def test_unreadable_safetensors_give_one_line_errors(tmp_path):
    from safetensors.torch import save_file

    save_file({"layer.weight": torch.ones(2)}, tmp_path / "other.safetensors")
    assert "no DiT metadata" in one_error_line(checkpoint.load, str(tmp_path / "other.safetensors"))
    save_file({"transformer_blocks.0.attn1.to_q.weight": torch.ones(2)}, tmp_path / "diffusers.safetensors")
    assert "pass its folder" in one_error_line(checkpoint.load, str(tmp_path / "diffusers.safetensors"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert "not a readable .safetensors" in one_error_line(checkpoint.load, str(tmp_path / "corrupt.safetensors"))
    assert ".safetensors" in one_error_line(checkpoint.export_safetensors, "any.pt", str(tmp_path / "x.st"))


def test_command_line_export_picks_the_format_by_extension(tmp_path, latent_ckpt, vae_folder, capsys):
    checkpoint.main(["export", latent_ckpt, str(tmp_path / "a.safetensors")])
    checkpoint.main(["export", latent_ckpt, str(tmp_path / "folder"), "--vae-path", vae_folder])
    assert "safetensors" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "folder" / "transformer" / "config.json")
    a, b = checkpoint.load(str(tmp_path / "a.safetensors")), checkpoint.load(str(tmp_path / "folder"))
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert "--vae-path" in one_error_line(checkpoint.main, ["export", latent_ckpt, str(tmp_path / "b.safetensors"),
                                                            "--vae-path", vae_folder])


def test_checkpoint_help_imports_no_torch():
    """--help answers before the heavy imports (torch, models, diffusers: seconds)."""
    probe = ("import runpy, sys; sys.argv = ['checkpoint.py', '--help']\n"
             "try:\n    runpy.run_path('checkpoint.py', run_name='__main__')\n"
             "except SystemExit:\n    pass\nprint('torch imported' if 'torch' in sys.modules else 'no torch')")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "usage: checkpoint.py" in done.stdout and done.stdout.strip().endswith("no torch"), done.stdout


def test_a_folder_named_like_a_safetensors_file_is_called_a_folder(tmp_path):
    (tmp_path / "dit.safetensors").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder, not a file"):
        checkpoint.load(str(tmp_path / "dit.safetensors"))


def test_nan_weights_are_refused_in_every_format(tmp_path, latent_ckpt):
    path = checkpoint.export_safetensors(latent_ckpt, tmp_path / "dit.safetensors")
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    tensors["final_layer.linear.bias"][0] = float("inf")
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(cli.UserError, match="NaN or infinite weights .first in final_layer.linear.bias"):
        checkpoint.load(str(tmp_path / "bad.safetensors"))


def test_train_checkpoint_yields_ema_weights_and_args(tmp_path):
    import checkpoint

    ema, model = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    torch.save({"model": model, "ema": ema, "opt": {}, "args": {"model": "DiT-S/2", "image_size": 256},
                "train_steps": 5, "epoch": 0}, tmp_path / "ckpt.pt")
    loaded = checkpoint.load(str(tmp_path / "ckpt.pt"))
    assert torch.equal(loaded.state_dict["w"], ema["w"]) and loaded.settings["image_size"] == 256
    # A checkpoint of the format before model_args: rebuilt from its stored --model and sizes.
    built = checkpoint.model_args_for("DiT-S/2", input_size=32, in_channels=4, num_classes=1000)
    assert loaded.model_args == checkpoint.complete_model_args(built)
    assert torch.equal(download.find_model(str(tmp_path / "ckpt.pt"))["w"], ema["w"])


# ------------------------------------------------------------------ part 10: memory-mapped resume
@pytest.fixture
def torch_load_calls(monkeypatch):
    """The keyword arguments of each torch.load call the test makes, in order."""
    calls, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: (calls.append(kwargs), real_load(*args, **kwargs))[1])
    return calls


def test_load_train_memory_maps_the_checkpoint(tmp_path, torch_load_calls):
    path = tmp_path / "0000010.pt"
    written = tiny_dit.write_checkpoint(path, image_size=8, vae="none", in_channels=1)
    calls = torch_load_calls
    ckpt = checkpoint.load_train(str(path))
    assert calls and calls[0]["mmap"] is True and calls[0]["weights_only"] is True
    assert all(torch.equal(ckpt["ema"][k], written["ema"][k]) for k in written["ema"])
    legacy = tmp_path / "legacy.pt"  # not a zip file: read, as torch cannot map it
    torch.save(written, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(checkpoint.load_train(str(legacy))["ema"]["pos_embed"], written["ema"]["pos_embed"])
    assert calls[-1]["mmap"] is False


def test_load_and_find_model_memory_map_a_train_checkpoint(tmp_path, torch_load_calls):
    """Sampling reads only the EMA of a checkpoint that also holds the model and AdamW state."""
    path = tmp_path / "0000010.pt"
    written = tiny_dit.write_checkpoint(path, image_size=8, vae="none", in_channels=1)
    calls = torch_load_calls
    loaded = checkpoint.load(str(path))
    found = download.find_model(str(path))
    assert len(calls) == 2 and all(c["mmap"] is True and c["weights_only"] is True for c in calls)
    assert all(torch.equal(loaded.state_dict[k], written["ema"][k]) and torch.equal(found[k], written["ema"][k])
               for k in written["ema"])


@pytest.mark.usefixtures("one_thread")
def test_older_checkpoints_get_the_release_options():
    old = dict(DiT(**TINY).model_args)
    for name in ("pos", "rope_base", "qk_norm", "mlp", "norm"):
        del old[name]
    completed = checkpoint.complete_model_args(old)
    assert {k: completed[k] for k in ("pos", "qk_norm", "mlp", "norm")} == \
        dict(pos="sincos", qk_norm=False, mlp="gelu", norm="layernorm")
