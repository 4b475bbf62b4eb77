"""Code written for the reference DiT runs unchanged: its module-level model names, find_model, and the
Colab notebook's sampling cells give the very PNG that sample.py writes."""
import os
import socket
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

import download
import models
import tiny_vae
from conftest import ROOT

REFERENCE_NAMES = [f"DiT_{size}_{patch}" for size in ("XL", "L", "B", "S") for patch in (2, 4, 8)]
TINY_NAMES = ["DiT_T_2", "DiT_T_4", "DiT_T_8"]
ORIGINAL_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]


def test_reference_model_names_are_the_configs_of_dit_models():
    from models import DiT_S_8, DiT_XL_2  # noqa: F401  (the reference's import form)

    for name in REFERENCE_NAMES + TINY_NAMES:
        config = name.removeprefix("DiT_").replace("_", "/")
        assert getattr(models, name) is models.DiT_models[f"DiT-{config}"], name
    model = models.DiT_T_8(input_size=16, num_classes=10)
    assert (len(model.blocks), model.x_embedder.proj.out_channels, model.x_embedder.proj.kernel_size) == (
        4, 128, (8, 8))


def test_find_model_reads_released_names_from_pretrained_models_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:  # a port nobody listens on: any download attempt would fail
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv(download.MIRROR_ENV, f"http://127.0.0.1:{s.getsockname()[1]}")
    os.makedirs("pretrained_models")
    torch.save({"w": torch.arange(5.0)}, os.path.join("pretrained_models", "DiT-XL-2-256x256.pt"))
    from download import find_model

    assert torch.equal(find_model("DiT-XL-2-256x256.pt")["w"], torch.arange(5.0))


def random_dit_t2_weights(path, latent_size, seed=0):
    """A raw state_dict of DiT-T/2 with every layer non-zero (a fresh DiT outputs zero: adaLN-Zero)."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = models.DiT_T_2(input_size=latent_size, num_classes=1000).state_dict()
    for name, value in state_dict.items():
        if name != "pos_embed":
            value.add_((0.02 if name.startswith("final_layer.linear") else 0.2)
                       * torch.randn(value.shape, generator=generator))
    torch.save(state_dict, path)


def notebook_sample(ckpt, vae_folder, out, image_size, seed, steps, cfg, labels, device="cpu"):
    """The reference Colab notebook's cells, as written there (DiT-T/2 in place of DiT-XL/2)."""
    from diffusers.models import AutoencoderKL
    from torchvision.utils import save_image

    from diffusion import create_diffusion
    from download import find_model
    from models import DiT_T_2

    torch.manual_seed(seed)
    latent_size = image_size // 8
    model = DiT_T_2(input_size=latent_size, num_classes=1000).to(device)
    state_dict = find_model(ckpt)
    model.load_state_dict(state_dict)
    model.eval()
    diffusion = create_diffusion(str(steps))
    vae = AutoencoderKL.from_pretrained(vae_folder).to(device)
    with torch.no_grad():
        n = len(labels)
        z = torch.randn(n, 4, latent_size, latent_size, device=device)
        y = torch.tensor(labels, device=device)
        z = torch.cat([z, z], 0)
        y_null = torch.tensor([1000] * n, device=device)
        y = torch.cat([y, y_null], 0)
        model_kwargs = dict(y=y, cfg_scale=cfg)
        samples = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                          model_kwargs=model_kwargs, progress=True, device=device)
        samples, _ = samples.chunk(2, dim=0)
        samples = vae.decode(samples / 0.18215).sample
    save_image(samples, out, nrow=4, normalize=True, value_range=(-1, 1))


def test_notebook_flow_writes_the_same_png_as_sample_py(tmp_path):
    image_size, seed, steps, cfg = 32, 3, 8, 4.0
    ckpt = str(tmp_path / "weights.pt")
    random_dit_t2_weights(ckpt, image_size // 8)
    env = {**os.environ, **tiny_vae.hub_cache(tmp_path), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    # The tutorial's command: class labels as separate arguments, the model by its reference name.
    subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", ckpt, "--model", "DiT-T/2",
                    "--image-size", str(image_size), "--num-classes", "1000", "--seed", str(seed),
                    "--num-sampling-steps", str(steps), "--cfg-scale", str(cfg),
                    "--class-labels", *map(str, ORIGINAL_LABELS), "--output", str(tmp_path / "sample.png")],
                   env=env, check=True, cwd=tmp_path)

    vae_folder = os.path.join(tmp_path, "hub", "models--stabilityai--sd-vae-ft-ema", "snapshots", tiny_vae.COMMIT)
    notebook_sample(ckpt, vae_folder, tmp_path / "notebook.png", image_size, seed, steps, cfg, ORIGINAL_LABELS)

    grid = np.asarray(Image.open(tmp_path / "notebook.png"))
    assert grid.shape == (2 + 2 * 34, 2 + 4 * 34, 3) and grid.std() > 5  # a real 2x4 grid, not a constant
    assert (tmp_path / "sample.png").read_bytes() == (tmp_path / "notebook.png").read_bytes()
