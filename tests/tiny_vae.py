"""A tiny randomly initialised Stable-Diffusion-shaped VAE for tests.

`hub_cache(folder)` saves it into a Hugging Face cache under the real repo id
(stabilityai/sd-vae-ft-ema) and returns the environment variables that make
`vae.load_vae("ema")` find it offline, so the real loading path runs. The VAE downsamples
by 8 like the real one (four blocks), with 8 channels per block.
"""
import os

import torch

REPO_ID = "stabilityai/sd-vae-ft-ema"
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # any 40-hex name works as a snapshot


def make_tiny_vae(seed=0):
    from diffusers.models import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=32,
    ).eval()


def save_tiny_vae(folder, seed=0):
    """A diffusers folder (usable with --vae-path); returns its path."""
    make_tiny_vae(seed).save_pretrained(folder)
    return str(folder)


def hub_cache(root, repo_id=REPO_ID, seed=0):
    """Put the tiny VAE in a Hugging Face cache at root/hub; returns the env for offline loading."""
    cache = os.path.join(str(root), "hub")
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    save_tiny_vae(os.path.join(repo, "snapshots", COMMIT), seed)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(COMMIT)
    return {"HF_HOME": str(root), "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1", "DIFFUSERS_OFFLINE": "1"}
