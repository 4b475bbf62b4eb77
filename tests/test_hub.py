"""hub.py: a Hugging Face hub id resolved from an offline cache samples as the original; a missing one
is one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import cli
import sample
import tiny_dit
import tiny_vae
from conftest import ROOT

tiny_dit.register()


HUB_ID = "facebook/DiT-XL-2-256"  # the released weights' diffusers copy, faked by a tiny pipeline


def fake_hub(root, pipeline_folder):
    """HUB_ID in a Hugging Face cache at root/hub holding the tiny pipeline, its transformer
    config written as the hub's older Transformer2DModel one; returns the offline env."""
    import shutil

    repo = os.path.join(root, "hub", "models--" + HUB_ID.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", tiny_vae.COMMIT)
    shutil.copytree(pipeline_folder, snapshot)
    config_path = os.path.join(snapshot, "transformer", "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.pop("norm_eps")
    config.update(_class_name="Transformer2DModel", cross_attention_dim=None, use_linear_projection=False)
    with open(config_path, "w") as f:
        json.dump(config, f)
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(tiny_vae.COMMIT)
    env = {"HF_HOME": str(root), "HF_HUB_CACHE": os.path.join(root, "hub"), "HF_HUB_OFFLINE": "1",
           "DIFFUSERS_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return {**os.environ, **env}


def test_hub_id_from_an_offline_cache_samples_as_the_original(tmp_path, pipeline_folder, latent_ckpt, vae_folder):
    """sample.py --ckpt facebook/DiT-XL-2-256 in a subprocess (offline cache) against the .pt
    checkpoint it was exported from, decoded by the same VAE: the same PNG."""
    env = fake_hub(tmp_path, pipeline_folder)
    flags = ["--seed", "1", "--num-sampling-steps", "5", "--class-labels", "5 999", "--output"]
    subprocess.run([sys.executable, str(ROOT / "tests" / "tiny_dit.py"), str(ROOT / "sample.py"),
                    "--ckpt", HUB_ID, *flags, str(tmp_path / "hub.png")], env=env, check=True, cwd=tmp_path)
    from_pt = sample.main(["--ckpt", latent_ckpt, "--vae-path", vae_folder, *flags, str(tmp_path / "pt.png")])
    from PIL import Image

    assert from_pt.shape == (2, 64, 64, 3) and from_pt.std() > 1
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "hub.png")),
                                  np.asarray(Image.open(tmp_path / "pt.png")))


def test_a_hub_id_missing_from_the_offline_cache_is_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # every request refused
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: checkpoint.main(["export", "dit-tests/never-cached", str(tmp_path / "x.safetensors")]))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and len(errors) == 1, errors
    assert "dit-tests/never-cached" in errors[0] and "internet" in errors[0]
