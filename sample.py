"""Sample a few images from a DiT: released weights (downloaded once) or a train.py checkpoint.

    python sample.py --image-size 512 --seed 1 --class-labels 207 360 387 974
    python sample.py --ckpt results/000-DiT-XL-2/checkpoints/0400000.pt --sampler dpm-solver --num-sampling-steps 25

With the DDPM sampler (the default), the same seed, checkpoint and VAE give the same image as
the original sample.py on the same device: the global RNG is seeded, the model is built
(drawing its random initialisation) before its weights are loaded, and the start noise and
per-step noise are drawn in the original's order. A train.py checkpoint supplies --model,
--image-size, --num-classes and --vae (including pixel-space `none` models) when not given.
--image-size N or HxW (height x width) samples at another size than the checkpoint's: as it is
for models without a position table (--pos rope or none); a sine-cosine model gets its table
recomputed for the new grid, with a warning. --vae-tiling decodes large images in tiles.
--compile (torch.compile) and, on CPU, --quantize int8 (the linear layers in int8, samples
slightly different from fp32's) are the fast modes (docs/speed.md).

From Python, main([...flags]) returns the images as an N x H x W x C uint8 array.
"""
import argparse
import os
import sys
import tempfile

import torch
from torchvision.utils import save_image as save_grid

import cli
import sampling
from distributed import pick_device
from fast import keep_freed_memory
from files import atomic_path, check_output_file, save_image
from precision import set_tf32

ORIGINAL_CLASS_LABELS = "207 360 387 974 88 979 417 279"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sampling.add_model_args(parser, cfg_scale=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class-labels", nargs="+", default=None,
                        help=f"labels as separate arguments, or separated by spaces or commas (default: "
                             f"{ORIGINAL_CLASS_LABELS} for 1000 classes, else each class once, at most 16)")
    # --device, --precision (PyTorch's own settings by default), --compile, --quantize
    cli.add_device_flags(parser, precision=None, compile=True, quantize=True)
    parser.add_argument("--output", default="sample.png", help="the grid of all samples")
    parser.add_argument("--nrow", type=int, default=4, help="images per row of the grid")
    parser.add_argument("--save-individual", action="store_true",
                        help="also save each image as OUTPUT-000.png, OUTPUT-001.png, ...")
    parser.add_argument("--vae-batch-size", type=int, default=8, help="images decoded at once")
    return parser.parse_args(argv)


def check_args(args):
    """Refuse values that would fail only after sampling (when the work would be lost)."""
    check_sampling_args(args)
    if args.nrow < 1:
        raise cli.UserError(f"--nrow must be at least 1, got {args.nrow}")
    check_image_extension(args.output)
    check_writable(os.path.dirname(os.path.abspath(args.output)), "--output")
    check_output_file(args.output, "--output")  # a folder named out.png


def check_sampling_args(args):
    """What sample.py and sample_ddp.py both refuse before loading anything."""
    sampling.check_cfg_scale(args.cfg_scale)
    if args.num_classes is not None and args.num_classes < 1:  # 0 would silently mean "the checkpoint's"
        raise cli.UserError(f"--num-classes must be positive, got {args.num_classes}")
    if args.vae_batch_size < 1:
        raise cli.UserError(f"--vae-batch-size must be at least 1, got {args.vae_batch_size}")


def check_image_extension(path):
    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    if Image.registered_extensions().get(ext) not in Image.SAVE:
        raise cli.UserError(f"--output {path!r}: {ext or 'no extension'} is not an image format Pillow writes; "
                            f"end it in .png (lossless) or .jpg")


def check_writable(folder, flag):
    """Create `folder` and a file in it now, so a read-only or bad path fails before the sampling."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise cli.UserError(f"{flag}: {folder!r} is a file, not a folder; choose another location")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise cli.UserError(f"{flag}: cannot write to {folder!r} ({e.strerror or e}); "
                            f"choose a writable location") from None


@torch.no_grad()  # a context, not set_grad_enabled(False): main() is also called from Python
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    device = pick_device(args.device)
    if args.precision is not None:
        set_tf32(args.precision, device)

    torch.manual_seed(args.seed)
    model, settings = sampling.load_model(args, device)
    if args.class_labels is None:
        labels = ([int(y) for y in ORIGINAL_CLASS_LABELS.split()] if settings.num_classes == 1000
                  else list(range(min(settings.num_classes, 16))))
    else:
        labels = cli.parse_class_labels(" ".join(args.class_labels), settings.num_classes)
    if not labels:
        raise cli.UserError("--class-labels is empty; give at least one label")
    sampler = sampling.make_sampler(args.sampler, args.num_sampling_steps, settings.diffusion_args,
                                    **sampling.sampler_options(args))
    decode = sampling.load_decoder(settings, device, args.vae_batch_size, tiling=args.vae_tiling)

    noise = torch.randn(len(labels), *settings.latent_shape(), device=device)
    latents, _ = sampling.generate(model, sampler, labels, args.cfg_scale, noise,
                                   guide_all_channels=args.cfg_all_channels, precision=args.precision or "fp32",
                                   progress=True)
    sampling.check_finite_samples(latents, args.cfg_scale, args.precision)
    images = decode(latents)

    with atomic_path(args.output) as tmp:
        save_grid(images, tmp, nrow=args.nrow, normalize=True, value_range=(-1, 1))
    print(f"saved {len(labels)} samples to {args.output}", file=sys.stderr)
    uint8 = cli.to_uint8(images)
    if args.save_individual:
        from PIL import Image

        stem, ext = os.path.splitext(args.output)
        for i, image in enumerate(uint8):
            save_image(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image), f"{stem}-{i:03d}{ext}")
    return uint8


if __name__ == "__main__":
    keep_freed_memory()  # as a script only: a process importing main keeps its own malloc settings
    cli.run(main)
