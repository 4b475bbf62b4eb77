"""The built-in demo data: scikit-learn's handwritten digits (1,797 real 8x8 grey images,
10 classes, shipped with the package, no download), and a quality figure for generated digits.

    python digits.py prepare --out data/digits           # an ImageFolder of 8x8 grey PNGs
    python digits.py score --ckpt results/000-DiT-Digits-2/checkpoints/last.pt --cfg-scale 4

The quality figure: a classifier trained on the real digits is applied to generated samples of
each requested class (accuracy: how often the sample is recognisably the digit asked for), and
the Frechet distance between generated and real digits in that classifier's hidden features
(FD: how close the samples' distribution is to the real one; ~0 for real digits).
"""
import argparse
import os
import time

import numpy as np

import checkpoint
import cli
import files
import sampling
from cli import run
from distributed import pick_device
from errors import UserError
from evaluate import frechet_distance

NUM_CLASSES = 10
IMAGE_SIZE = 8
OWNER_MARK = ".digits-prepare"  # written before the first image: the folder is prepare's to fill
DONE_MARK = ".complete"  # written after the last image


def load_real_digits():
    """(images uint8 N x 8 x 8 in 0..255, labels int64 N)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, data.target.astype(np.int64)


def digit_paths(labels):
    """Where prepare writes each digit, relative to the folder: <class>/<index>.png."""
    return [os.path.join(str(label), f"{i:04d}.png") for i, label in enumerate(labels)]


def prepare(out_dir):
    """Write the digits as an ImageFolder (out_dir/<class>/<index>.png); skipped when complete.
    A folder holding anything prepare did not write is refused, so no one's files are overwritten
    or mixed in with the digits; a rerun after a kill clears the temp files it left."""
    from PIL import Image

    images, labels = load_real_digits()
    paths = digit_paths(labels)
    check_out_folder(out_dir, paths)
    for label in range(NUM_CLASSES):
        if os.path.isdir(os.path.join(out_dir, str(label))):
            files.remove_stale_temp_files(os.path.join(out_dir, str(label)))
    done = os.path.join(out_dir, DONE_MARK)
    if os.path.exists(done):
        print(f"{out_dir}: {len(images)} digits already prepared")
        return
    os.makedirs(out_dir, exist_ok=True)
    open(os.path.join(out_dir, OWNER_MARK), "w").close()
    for image, path in zip(images, paths):
        files.save_image(Image.fromarray(image, mode="L"), os.path.join(out_dir, path))
    open(done, "w").close()
    print(f"{out_dir}: wrote {len(images)} digits in {NUM_CLASSES} class folders")


def check_out_folder(out_dir, paths):
    """Refuse an --out that is a file, a non-empty folder prepare did not start, or one holding a file
    prepare does not write (hidden files aside: the loaders skip them)."""
    files.check_output_folder(out_dir, "--out")
    if not os.path.isdir(out_dir):
        return
    visible = sorted(name for name in os.listdir(out_dir) if not name.startswith("."))
    ours = any(os.path.exists(os.path.join(out_dir, mark)) for mark in (OWNER_MARK, DONE_MARK))
    if visible and not ours:
        raise UserError(f"--out {out_dir!r} already holds files digits.py prepare did not write (e.g. "
                        f"{visible[0]}); give a new or empty folder, so none of yours is overwritten")
    expected = set(paths)
    for folder, subfolders, names in os.walk(out_dir):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(names):
            path = os.path.relpath(os.path.join(folder, name), out_dir)
            if not name.startswith(".") and path not in expected:
                raise UserError(f"--out {out_dir!r} holds {path}, which digits.py prepare does not write; move it "
                                f"out or give a new folder, so it is not mixed in with the digits")


class DigitScorer:
    """A small MLP classifier fitted on all real digits; its hidden layer is the feature space."""

    def __init__(self, seed=0, fit_indices=None):
        from sklearn.neural_network import MLPClassifier

        images, labels = load_real_digits()
        if fit_indices is not None:  # tests fit on part of the data and score the rest
            images, labels = images[fit_indices], labels[fit_indices]
        self.classifier = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=seed)
        self.classifier.fit(self._inputs(images), labels)
        self.real_features = self.features(images)

    @staticmethod
    def _inputs(images):
        images = np.asarray(images)
        if images.ndim == 4:  # N x H x W x C from the samplers: average the channels
            images = images.astype(np.float32).mean(axis=-1)
        if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"digit images must be {IMAGE_SIZE}x{IMAGE_SIZE}, got {images.shape[1:]}")
        return images.reshape(len(images), -1).astype(np.float32) / 255.0

    def features(self, images):
        """Hidden-layer (ReLU) activations of the classifier."""
        x = self._inputs(images)
        return np.maximum(x @ self.classifier.coefs_[0] + self.classifier.intercepts_[0], 0)

    def score(self, images, labels):
        """Dict with accuracy (overall and per class) and the Frechet distance to the real digits."""

        labels = np.asarray(labels)
        predicted = self.classifier.predict(self._inputs(images))
        per_class = {int(c): float((predicted[labels == c] == c).mean()) for c in np.unique(labels)}
        fake = self.features(images)
        fd = frechet_distance(fake.mean(0), np.cov(fake, rowvar=False),
                              self.real_features.mean(0), np.cov(self.real_features, rowvar=False))
        return {"accuracy": float((predicted == labels).mean()), "per_class_accuracy": per_class,
                "frechet_distance": float(fd), "num_samples": int(len(labels))}


def check_digits_checkpoint(ckpt):
    """Refuse, before sampling, a checkpoint whose samples the digit classifier cannot read: it rates
    8x8 pixel-space images. Reads the checkpoint's records only; builds no model."""
    loaded = checkpoint.load(ckpt)
    model_args = loaded.model_args or {}
    vae = loaded.settings.get("vae")
    latent = vae not in (None, "none") or model_args.get("in_channels") == 4  # SD-VAE latents have 4 channels
    size = loaded.settings.get("image_size") or (None if latent else model_args.get("input_size"))
    if latent or (size is not None and cli.height_width(size) != (IMAGE_SIZE, IMAGE_SIZE)):
        what = f"{cli.size_text(size)} px " if size is not None else ""
        what += f"latent-space (--vae {vae or 'ema'})" if latent else "pixel-space"
        raise UserError(f"--ckpt {ckpt!r} is a {what} model, but digits.py score rates {IMAGE_SIZE}x{IMAGE_SIZE} "
                        f"pixel-space digits (train with --vae none --image-size {IMAGE_SIZE}, as demo.sh does); "
                        f"score other models with sample_ddp.py and evaluate.py")


def score_checkpoint(args):
    labels = np.repeat(np.arange(NUM_CLASSES), args.per_class)
    start = time.perf_counter()
    images, sampler, stats = sampling.generate_from_checkpoint(
        args.ckpt, labels.tolist(), cfg_scale=args.cfg_scale, sampler=args.sampler,
        num_sampling_steps=args.num_sampling_steps, seed=args.seed, batch_size=args.batch_size,
        device=pick_device(args.device), guide_all_channels=args.cfg_all_channels, precision=args.precision,
        return_sampler=True, compile=args.compile, quantize=args.quantize, **sampling.sampler_options(args))
    seconds = time.perf_counter() - start
    result = DigitScorer().score(images, labels)
    steps = sampler.steps or f"adaptive ({stats.nfe} evaluations)"  # dopri5 picks its own steps
    print(f"{sampler.name}-{steps} cfg {args.cfg_scale}: accuracy {result['accuracy']:.1%}, "
          f"Frechet distance {result['frechet_distance']:.2f}, {seconds:.1f} s for {len(labels)} samples "
          f"({seconds / len(labels) * 1e3:.1f} ms/sample)")
    return result


def check_score_args(args):
    """Refuse what would fail, or score nothing, only after the sampling."""

    for flag in ("per_class", "batch_size", "num_sampling_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:  # None: the sampler's default
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    sampling.check_cfg_scale(args.cfg_scale)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Built-in digits data and their quality figure.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the digits as an ImageFolder")
    p.add_argument("--out", default="data/digits")
    s = sub.add_parser("score", help="sample a checkpoint per class and print accuracy and Frechet distance")
    s.add_argument("--ckpt", required=True, help="any checkpoint sample.py reads")
    cli.add_sampler_flags(s, cfg_scale=4.0, num_sampling_steps=50, sampler="ddim")
    cli.add_device_flags(s, precision="fp32", compile=True, quantize=True)
    s.add_argument("--per-class", type=int, default=100)
    s.add_argument("--batch-size", type=int, default=500)
    s.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.out)
    else:
        check_score_args(args)
        check_digits_checkpoint(args.ckpt)
        score_checkpoint(args)


if __name__ == "__main__":
    run(main)
