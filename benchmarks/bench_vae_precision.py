"""train.py --vae-precision: the error of bf16/fp16-encoded latents against float32, and the
encode time of a batch at each precision (docs/gpu.md records the figures).

    python benchmarks/bench_vae_precision.py                            # CPU, bf16: both VAEs
    python benchmarks/bench_vae_precision.py --vaes tiny --precisions bf16,fp16   # fp16 (slow on CPU): the tiny one
    python benchmarks/bench_vae_precision.py --device cuda --batch-size 32 --precisions bf16,fp16

No weights are downloaded: the error is measured on the test suite's tiny VAE (tests/tiny_vae.py)
and on an AutoencoderKL of the Stable Diffusion VAE's shape (diffusers' defaults for that model,
block widths 128-256-512-512) with random weights, so the figures show the rounding of the
arithmetic, not of the trained weights. The latents are the encoder's means scaled as DiT sees
them; the error is the relative RMS, sqrt(mean((low - fp32)^2) / mean(fp32^2)).
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import vae as vae_lib  # noqa: E402
from tiny_vae import make_tiny_vae  # noqa: E402


def sd_shaped_vae(seed=0):
    from diffusers.models import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                         layers_per_block=2, sample_size=256).eval()


def latents(vae, images, precision):
    mean, _ = vae_lib.encode_distribution(vae, images, precision)
    return mean * vae_lib.LATENT_SCALE


def relative_rms(low, exact):
    return float((low - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt())


def timed(vae, images, precision, repeats):
    latents(vae, images, precision)  # warm-up
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        latents(vae, images, precision)
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precisions", default="bf16", help="comma-separated: bf16, fp16")
    parser.add_argument("--vaes", default="tiny,sd", help="comma-separated: tiny (tests/tiny_vae.py), sd (its shape)")
    args = parser.parse_args()
    device = torch.device(args.device)
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size,
                        generator=torch.Generator().manual_seed(0)).mul(2).sub(1).to(device)
    makers = {"tiny": ("tiny test VAE", make_tiny_vae), "sd": ("SD-shaped VAE, random weights", sd_shaped_vae)}
    for name, make in (makers[key] for key in args.vaes.split(",")):
        vae = make().to(device).requires_grad_(False)
        exact = latents(vae, images, "fp32")
        seconds = {"fp32": timed(vae, images, "fp32", args.repeats)}
        for precision in args.precisions.split(","):
            error = relative_rms(latents(vae, images, precision), exact)
            seconds[precision] = timed(vae, images, precision, args.repeats)
            print(f"{name}: {precision} latents vs fp32: relative RMS {error:.2e}")
        print(f"{name}: encode of {args.batch_size} x {args.image_size}px on {device}: "
              + ", ".join(f"{p} {s * 1000 / args.batch_size:.0f} ms/image" for p, s in seconds.items()))


if __name__ == "__main__":
    main()
