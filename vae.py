"""The frozen Stable Diffusion VAE that maps images to DiT's latents and back.

`--vae ema|mse` loads stabilityai/sd-vae-ft-ema or -mse from the Hugging Face hub (cached
after the first download); a local diffusers AutoencoderKL folder works too (`--vae-path`).
`--vae-tiling` (sample.py, sample_ddp.py, extract_features.py) turns on diffusers' tiled encode
and decode: images larger than the VAE's tile (256 px for the SD VAE) go through it in
overlapping tiles whose seams are blended, so memory stays fixed whatever the image size.
"""
import os

import torch

import hub
from errors import UserError, first_line
from precision import autocast

LATENT_SCALE = 0.18215  # scales SD-VAE latents to roughly unit variance
DOWNSAMPLE = 8  # image size / latent size
HUB_IDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
ENCODE_PRECISIONS = ("fp32", "bf16", "fp16")  # encode_distribution's precision: float32 or autocast


def add_encode_precision_flag(parser):
    """--vae-precision, as train.py (--data-path) and extract_features.py read it."""
    parser.add_argument("--vae-precision", choices=ENCODE_PRECISIONS, default="fp32",
                        help="encode images under bf16/fp16 autocast: faster on GPUs, the latents off by the "
                             "rounding (docs/gpu.md); default fp32")


def vae_source(vae, vae_path=None):
    """The folder or hub id to load: --vae-path wins over --vae."""
    if vae_path:
        if not os.path.isdir(vae_path):
            raise FileNotFoundError(f"--vae-path {vae_path!r} is not a folder; point it at a diffusers "
                                    f"AutoencoderKL folder (with config.json)")
        return vae_path
    if vae in HUB_IDS:
        return HUB_IDS[vae]
    raise UserError(f"--vae {vae!r} is not one of {', '.join(HUB_IDS)} (or none, where pixel space is "
                    f"supported); pass a local diffusers folder with --vae-path")


def load_vae(vae="ema", vae_path=None, device="cpu", dtype=torch.float32, tiling=False):
    """A frozen AutoencoderKL in eval mode, or a one-line error saying what failed and what to do.
    tiling: encode and decode large images in overlapping tiles (AutoencoderKL.enable_tiling)."""
    from diffusers.models import AutoencoderKL

    source = vae_source(vae, vae_path)
    if not vae_path:  # a hub id: its cached copy, or one line when there is neither a copy nor a network
        source = hub.cached_or_reachable(source, "the VAE", "pass --vae-path to a local diffusers AutoencoderKL folder")
    try:
        model = AutoencoderKL.from_pretrained(source, torch_dtype=dtype)
    except Exception as e:  # offline, missing files, bad config: huggingface_hub and diffusers raise many kinds
        reason = first_line(e)
        raise UserError(f"could not load the VAE {source!r} ({reason}); connect to the internet once so it is "
                           f"cached, or pass --vae-path to a local diffusers AutoencoderKL folder") from None
    if tiling:
        model.enable_tiling()
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_distribution(vae, images, precision="fp32"):
    """Mean and standard deviation of the encoder's Gaussian for images in [-1, 1] (unscaled), float32.
    precision bf16 or fp16 runs the encoder under autocast (train.py --vae-precision): on GPUs several
    times faster than float32, the latents then off by the low precision's rounding (docs/gpu.md)."""
    with autocast(precision, images.device):
        dist = vae.encode(images.to(vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def sample_latents(mean, std, generator=None, noise=None):
    """A latent drawn from the encoder's Gaussian, scaled for DiT (`noise`: standard normal draws to use)."""
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise) * LATENT_SCALE


@torch.no_grad()
def decode(vae, latents, chunk_size=8):
    """Images in [-1, 1] from DiT latents, decoded a few at a time so large batches fit in memory."""
    out = [vae.decode((chunk / LATENT_SCALE).to(vae.dtype)).sample.float()
           for chunk in latents.split(chunk_size)]
    return torch.cat(out)
