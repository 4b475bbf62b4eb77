"""Sample digit models trained on 8x8 at larger canvases (the README's "Positions, shapes and the
modern block"): one row per class, guidance 4, dpm-solver 25 steps, the same noise seeds for every
model; the trained 8x8, then 8x16 and 16x16. Writes docs/rope_canvas.png.

    python benchmarks/rope_canvas.py results/ablation_pos/runs/pos-rope_seed-0 results/ablation_pos/runs/pos-sincos_seed-0
"""
import argparse
import glob
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402
import files  # noqa: E402
import sampling  # noqa: E402

SIZES = [(8, 8), (8, 16), (16, 16)]


def final_checkpoint(folder):
    return sorted(glob.glob(os.path.join(folder, "*", "checkpoints", "*.pt")))[-1]


def canvas(model, settings, height, width, per_class, cfg_scale, seed):
    """(classes * per_class, H, W) uint8 samples of one canvas size (noise seeded per sample, as sample_ddp)."""
    labels = np.repeat(np.arange(settings.num_classes), per_class).tolist()
    sampler = sampling.make_sampler("dpm-solver", 25, settings.diffusion_args)
    generators = sampling.seeded_generators(seed, range(len(labels)))
    shape = (settings.in_channels, height, width)
    noise = sampling.draw(generators, shape)
    latents, _ = sampling.generate(model, sampler, labels, cfg_scale, noise,
                                   step_noise=lambda: sampling.draw(generators, shape))
    return cli.to_uint8(latents)[..., 0]


def tile(images, per_class):
    """One row per class, per_class images side by side, a one-pixel gap."""
    n, h, w = images.shape
    rows = n // per_class
    out = np.full((rows * (h + 1) - 1, per_class * (w + 1) - 1), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, per_class)
        out[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = image
    return out


GAP = 16  # pixels between the canvases


def side_by_side(tiles):
    """The tiles left to right on white, top-aligned, at the same pixel scale."""
    height = max(t.shape[0] for t in tiles)
    out = np.full((height, sum(t.shape[1] for t in tiles) + GAP * (len(tiles) - 1)), 255, np.uint8)
    x = 0
    for t in tiles:
        out[:t.shape[0], x:x + t.shape[1]] = t
        x += t.shape[1] + GAP
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="ablate.py variant folders (their last checkpoint is sampled)")
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--out", default="docs/rope_canvas.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fig, axes = plt.subplots(1, len(args.runs), figsize=(5.5 * len(args.runs), 7.5), squeeze=False)
    for row, folder in enumerate(args.runs):
        ckpt = final_checkpoint(folder)
        load_args = argparse.Namespace(model=None, image_size=None, num_classes=None, vae=None, vae_path=None, ckpt=ckpt)
        model, settings = sampling.load_model(load_args, torch.device("cpu"))
        tiles = [tile(canvas(model, settings, h, w, args.per_class, args.cfg_scale, seed=0), args.per_class)
                 for h, w in SIZES]
        ax = axes[0, row]
        ax.imshow(side_by_side(tiles), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        x = 0
        for (h, w), part in zip(SIZES, tiles):
            ax.text(x, -2, f"{h}x{w}" + ("\n(trained)" if (h, w) == (8, 8) else ""), fontsize=10)
            x += part.shape[1] + GAP
        ax.set_title(f"pos={model.config.pos}", pad=30)
        ax.axis("off")
    fig.suptitle(f"Trained on 8x8 digits, sampled at larger canvases\none row per class 0-9, guidance "
                 f"{args.cfg_scale:g}, dpm-solver 25 steps, the same seeds")
    fig.tight_layout()
    with files.atomic_path(args.out) as tmp:
        fig.savefig(tmp, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run(main)
