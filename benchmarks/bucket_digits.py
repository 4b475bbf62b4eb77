"""Aspect-ratio buckets on the built-in digits (docs/aspect_buckets.md): what --aspect-buckets buys
a RoPE model sampled at non-square sizes. Writes docs/aspect_buckets.png and prints the accuracies.

    python benchmarks/bucket_digits.py                        # --steps 3000 --per-class 50: docs' figure
    python benchmarks/bucket_digits.py --steps 600 --out /tmp/bucket_digits

Builds canvas data from the real digits: each 8x8 digit as it is, centred on a black 8x16 canvas
and centred on a black 16x8 canvas (5,391 images). Trains two DiT-T/2 models with --pos rope for
the same steps (demo.sh's recipe, one process each, side by side): "single" on the 8x8 digits at
--image-size 8, "buckets" on the canvases with --aspect-buckets 8x8,8x16,16x8. Samples both at
8x8, 8x16 and 16x8 (DPM-Solver++ 25 steps, guidance 4, the same seeds) and scores the centre 8x8
region (where the canvas data puts the digit) with digits.py's classifier: the accuracy is how
often that region shows the digit asked for. Training resumes when repeated.
"""
import argparse
import glob
import os
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import digits as digits_lib  # noqa: E402
import files  # noqa: E402
import sampling  # noqa: E402
from rope_canvas import canvas, side_by_side, tile  # noqa: E402  (the canvas figure's sampling and layout)

BUCKETS = [(8, 8), (8, 16), (16, 8)]
SIZE = digits_lib.IMAGE_SIZE


def centred(image, height, width):
    """The digit centred on a black (0) canvas of height x width."""
    out = np.zeros((height, width), np.uint8)
    top, left = (height - SIZE) // 2, (width - SIZE) // 2
    out[top:top + SIZE, left:left + SIZE] = image
    return out


def centre_region(images):
    """The centre 8x8 of each (N, H, W) sample: where the canvases hold the digit."""
    _, height, width = images.shape
    top, left = (height - SIZE) // 2, (width - SIZE) // 2
    return images[:, top:top + SIZE, left:left + SIZE]


def prepare_canvases(out_dir):
    """An image folder of every digit on each bucket's canvas: <class>/<index>-<H>x<W>.png."""
    from PIL import Image

    if os.path.exists(os.path.join(out_dir, digits_lib.DONE_MARK)):
        return
    images, labels = digits_lib.load_real_digits()
    for i, (image, label) in enumerate(zip(images, labels)):
        os.makedirs(os.path.join(out_dir, str(label)), exist_ok=True)
        for height, width in BUCKETS:
            path = os.path.join(out_dir, str(label), f"{i:04d}-{height}x{width}.png")
            files.save_image(Image.fromarray(centred(image, height, width), mode="L"), path)
    open(os.path.join(out_dir, digits_lib.DONE_MARK), "w").close()


def train_command(out, data, steps, *extra):
    return [sys.executable, "train.py", "--model", "DiT-T/2", "--pos", "rope", "--vae", "none", "--in-channels", "1",
            "--num-classes", "10", "--no-hflip", "--data-path", data, "--results-dir", out, "--global-batch-size",
            "128", "--max-steps", str(steps), "--lr", "2e-3", "--ema-decay", "0.995", "--log-every", "250",
            "--ckpt-every", "500", "--keep-last", "1", "--device", "cpu", "--cpu-threads", "1", "--resume", "auto",
            *extra]


def last_checkpoint(out):
    return sorted(glob.glob(os.path.join(out, "*", "checkpoints", "*.pt")))[-1]


def sample_sizes(ckpt, per_class, cfg_scale):
    """{(H, W): (10 * per_class, H, W) uint8 samples}, the same seeds at every size."""
    load_args = argparse.Namespace(model=None, image_size=None, num_classes=None, vae=None, vae_path=None, ckpt=ckpt)
    model, settings = sampling.load_model(load_args, torch.device("cpu"))
    return {(h, w): canvas(model, settings, h, w, per_class, cfg_scale, seed=0) for h, w in BUCKETS}


def figure(samples, per_class, path, cfg_scale):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(samples), figsize=(5.5 * len(samples), 7.5), squeeze=False)
    shown = min(4, per_class)  # samples per class in the figure
    for ax, (name, by_size) in zip(axes[0], samples.items()):
        tiles = [tile(images.reshape(10, -1, *images.shape[1:])[:, :shown].reshape(-1, *images.shape[1:]), shown)
                 for images in by_size.values()]
        ax.imshow(side_by_side(tiles), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        x = 0
        for (h, w), part in zip(by_size, tiles):
            ax.text(x, -2, f"{h}x{w}", fontsize=10)
            x += part.shape[1] + 16
        ax.set_title(name, pad=30)
        ax.axis("off")
    fig.suptitle(f"RoPE digits models sampled at 8x8, 8x16 and 16x8\none row per class 0-9, guidance {cfg_scale:g}, "
                 f"dpm-solver 25 steps, the same seeds")
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bucket_digits_out")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--figure", default="docs/aspect_buckets.png")
    args = parser.parse_args()
    square, canvases = os.path.join(args.out, "digits"), os.path.join(args.out, "canvases")
    digits_lib.prepare(square)
    prepare_canvases(canvases)
    runs = {"single size (8x8)": (os.path.join(args.out, "single"), square, ["--image-size", "8"]),
            "buckets 8x8,8x16,16x8": (os.path.join(args.out, "buckets"), canvases,
                                      ["--aspect-buckets", "8x8,8x16,16x8"])}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    jobs = [subprocess.Popen(train_command(out, data, args.steps, *extra), cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL) for out, data, extra in runs.values()]
    if any(job.wait() for job in jobs):
        raise SystemExit("a training run failed")
    torch.set_num_threads(2)
    scorer, labels = digits_lib.DigitScorer(), np.repeat(np.arange(10), args.per_class)
    samples, results = {}, {}
    for name, (out, _, _) in runs.items():
        samples[name] = sample_sizes(last_checkpoint(out), args.per_class, args.cfg_scale)
        results[name] = {f"{h}x{w}": scorer.score(centre_region(images), labels)["accuracy"]
                         for (h, w), images in samples[name].items()}
        print(name + ": " + ", ".join(f"{size} {accuracy:.1%}" for size, accuracy in results[name].items()))
    files.save_json(results, os.path.join(args.out, "accuracy.json"))
    figure(samples, args.per_class, args.figure, args.cfg_scale)
    print(f"wrote {args.figure} and {os.path.join(args.out, 'accuracy.json')}")


if __name__ == "__main__":
    main()
