"""Sample many images in parallel for FID: PNGs plus the ADM-style .npz that evaluation reads.

    torchrun --nnodes=1 --nproc_per_node=N sample_ddp.py --model DiT-XL/2 --num-fid-samples 50000

GPUs use NCCL, CPU processes gloo (`--device cpu`); plain `python sample_ddp.py` runs as one
process. The paper's FID setting is the default: cfg 1.5, 250 DDPM steps, labels uniformly
random (or exactly balanced with --balanced-classes).

Writes SAMPLE_DIR/FOLDER/000000.png ..., SAMPLE_DIR/FOLDER.npz (arr_0: uint8 images,
N x H x W x 3, exactly N, H x W being --image-size or the checkpoint's; arr_1: their class
labels, as ADM writes them) and SAMPLE_DIR/FOLDER.json
(the settings, with the checkpoint's sha256: a rerun into the same folder with other weights
behind the same --ckpt path is refused). Sample i's label, start noise and per-step noise come
from a generator seeded with (global seed, i), so the images do not depend on the number of
processes: with the same --per-proc-batch-size, device and thread count they are bitwise
identical; another batch size changes only floating-point rounding (kernels round differently
for other shapes). On GPUs the noise comes from a generator on the GPU seeded alike (drawn
there each step, no copy; other numbers than on the CPU), the label from the CPU's as everywhere.
Released weights and the hub's VAE are fetched by each machine's first process before the
others load them. PNGs are written atomically, and a restarted run skips the ones already there and completes the set.
"""
import argparse
import dataclasses
import json
import os
import sys
import time
import warnings

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import cli
import distributed
import sampling
from download import checkpoint_sha256
from fast import keep_freed_memory
from files import atomic_path, save_image, save_json
from precision import set_tf32
from sample import check_sampling_args, check_writable

# Settings that change the images: a restart into the same folder must keep them.
IMAGE_SETTINGS = ("model", "ckpt", "ckpt_sha256", "image_size", "num_classes", "vae", "vae_path", "in_channels",
                  "cfg_scale", "cfg_all_channels", "sampler", "num_sampling_steps", "global_seed", "balanced_classes",
                  "precision", "cfg_interval", "atol", "rtol", "sde_diffusion", "vae_tiling", "quantize",
                  "noise_device")
# Settings added after the first release, with the value runs made before them had (their noise came
# from CPU generators on every device; on CUDA it is now drawn there: another stream).
ADDED_SETTINGS = {"vae_tiling": False, "quantize": "none", "noise_device": "cpu"}
CACHE_SETTINGS = ("cache_interval", "cache_start", "cache_above")  # checked when caching (older records lack them)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sampling.add_model_args(parser, cfg_scale=1.5)
    parser.add_argument("--sample-dir", default="samples")
    parser.add_argument("--per-proc-batch-size", type=int, default=32)
    parser.add_argument("--num-fid-samples", type=int, default=50_000)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--balanced-classes", action="store_true",
                        help="exactly N / num_classes samples per class (in random order) instead of uniform labels")
    # TF32 matmuls on CUDA by default, as the original sample_ddp.py
    cli.add_device_flags(parser, precision="tf32", compile=True, quantize=True)
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                        help="the original's flag, kept as an alias: --no-tf32 = --precision fp32")
    parser.add_argument("--vae-batch-size", type=int, default=8, help="images decoded at once")
    args = parser.parse_args(argv)
    if args.tf32 is not None:
        args.precision = "tf32" if args.tf32 else "fp32"
    return args


def folder_name(args, settings):
    """The original's naming, plus the sampler and its step count (and the block caching and the
    int8 mode, if any)."""
    ckpt = os.path.basename(args.ckpt).replace(".pt", "") if args.ckpt else "pretrained"
    cache = (f"-cache-{args.cache_interval}-from-{args.cache_start}"
             + (f"-above-{args.cache_above:g}" if args.cache_above else "") if args.cache_interval > 1 else "")
    return (f"{settings.model.replace('/', '-')}-{ckpt}-size-{cli.size_text(settings.image_size)}-vae-{settings.vae}-"
            f"cfg-{args.cfg_scale}-seed-{args.global_seed}-{args.sampler}-{args.num_sampling_steps}{cache}"
            + ("" if args.quantize == "none" else f"-{args.quantize}"))


def labels_and_generators(args, num_classes, indices, device):
    """(labels, the generators of the samples' noise) for sample `indices`. The labels are drawn
    from CPU generators on every device; on CPU the noise then follows from the same generators
    (the release's draws), on a GPU from generators there seeded alike."""
    generators = sampling.seeded_generators(args.global_seed, indices)
    labels = class_labels(args, num_classes, indices, generators)
    if sampling.noise_device(device).type != "cpu":
        generators = sampling.seeded_generators(args.global_seed, indices, device)
    return labels, generators


def class_labels(args, num_classes, indices, generators):
    """Each sample's label: drawn from its own generator, or a seeded balanced assignment."""
    if args.balanced_classes:
        order = torch.randperm(args.num_fid_samples, generator=torch.Generator().manual_seed(args.global_seed))
        balanced = (torch.arange(args.num_fid_samples) % num_classes)[order]
        return [int(balanced[i]) for i in indices]
    return [int(torch.randint(num_classes, (), generator=g)) for g in generators]


def check_same_settings(folder, record, keys):
    """Refuse to add to samples made with other settings. A key the earlier run did not record
    (an older version wrote its JSON) cannot be compared: say so, and go on."""
    if not os.path.exists(f"{folder}.json"):
        return
    try:
        with open(f"{folder}.json") as f:
            earlier = {**ADDED_SETTINGS, **json.load(f)}
    except (ValueError, TypeError) as e:  # not JSON, or not an object: the samples there cannot be checked
        raise cli.UserError(f"{folder}.json, the record of the samples' settings, is not readable ({e}); delete it "
                            f"to keep the PNGs in {folder} (assumed made with these settings), or delete the "
                            f"folder too to sample anew") from None
    changed = [k for k in keys if k in earlier and earlier[k] != record.get(k)]
    if changed:
        raise cli.UserError(f"{folder} holds samples made with other settings ({', '.join(changed)}: "
                            f"{[earlier.get(k) for k in changed]}); use another --sample-dir or delete it")
    unrecorded = [k for k in keys if k not in earlier]
    if unrecorded:
        warnings.warn(f"{folder}.json does not record {', '.join(unrecorded)} (an older version wrote it): the "
                      f"samples already there are assumed to match", stacklevel=2)


def images_to_make(folder, count, settings):
    """The indices whose PNG is missing or damaged (unreadable, empty, or not the size sampled), in
    order; the damaged ones are named and made again."""
    size = cli.height_width(settings.image_size)
    missing, damaged = [], []
    for i in range(count):
        path = os.path.join(folder, f"{i:06d}.png")
        problem = png_problem(path, size) if os.path.exists(path) else "missing"
        if problem:
            missing.append(i)
        if problem and problem != "missing":
            damaged.append(f"{os.path.basename(path)} ({problem})")
    if damaged:
        listed = ", ".join(damaged[:5]) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
        print(f"re-making {len(damaged)} damaged image(s) in {folder}: {listed}", file=sys.stderr)
    return missing


def png_problem(path, size):
    """Why a sample PNG cannot go into the .npz (None when it can): empty, unreadable, or another size."""
    try:
        with Image.open(path) as image:
            found = (image.height, image.width)
            image.verify()  # the whole file: its chunks and their checksums
    except Exception as e:  # PIL raises many kinds for a damaged file (UnidentifiedImageError, SyntaxError, ...)
        return "empty" if os.path.getsize(path) == 0 else f"unreadable: {type(e).__name__}"
    if found != tuple(size):
        return f"{found[0]}x{found[1]}, not {size[0]}x{size[1]}"
    return None


def create_npz(folder, labels):
    """SAMPLE_DIR/FOLDER.npz from the N PNGs and their labels, as ADM's evaluation suite expects."""
    num_samples = len(labels)
    first = np.asarray(Image.open(os.path.join(folder, f"{0:06d}.png")).convert("RGB"))
    samples = np.empty((num_samples, *first.shape), dtype=np.uint8)
    for i in tqdm(range(num_samples), desc="building .npz", leave=False):
        samples[i] = np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png")).convert("RGB"))
    path = f"{folder}.npz"
    with atomic_path(path) as tmp:
        np.savez(tmp, arr_0=samples, arr_1=np.asarray(labels, dtype=np.int64))
    return path


def main(argv=None):
    args = parse_args(argv)
    if args.num_fid_samples < 1 or args.per_proc_batch_size < 1:
        raise cli.UserError("--num-fid-samples and --per-proc-batch-size must be positive")
    if args.global_seed < 0:
        raise cli.UserError(f"--global-seed must be non-negative, got {args.global_seed}")
    check_sampling_args(args)
    check_writable(args.sample_dir, "--sample-dir")
    rank, world_size, device = distributed.setup(args.device)
    try:
        return _sample(args, rank, world_size, device)
    finally:
        distributed.cleanup()


@torch.no_grad()
def make_images(args, indices, tools, folder, rank, device):
    """The PNGs of the sample indices, in batches of --per-proc-batch-size; tools: (model, sampler,
    decode, settings)."""
    model, sampler, decode, settings = tools
    batches = [indices[i:i + args.per_proc_batch_size] for i in range(0, len(indices), args.per_proc_batch_size)]
    shape = settings.latent_shape()
    for batch in tqdm(batches, desc=f"rank {rank}", disable=rank != 0):
        # A short batch is padded to full size (extras dropped): every call then has the same shapes,
        # and kernels round the same way whatever the split over processes.
        padded = batch + batch[-1:] * (args.per_proc_batch_size - len(batch))
        labels, generators = labels_and_generators(args, settings.num_classes, padded, device)
        noise = sampling.draw(generators, shape).to(device)
        latents, _ = sampling.generate(model, sampler, labels, args.cfg_scale, noise,
                                       guide_all_channels=args.cfg_all_channels, precision=args.precision,
                                       step_noise=lambda: sampling.draw(generators, shape))
        sampling.check_finite_samples(latents, args.cfg_scale, args.precision)
        for index, image in zip(batch, cli.to_uint8(decode(latents))):  # zip drops the padding
            save_image(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image),
                       os.path.join(folder, f"{index:06d}.png"))


def _sample(args, rank, world_size, device):
    distributed.share_cpu_threads(device)
    set_tf32(args.precision, device)

    with distributed.local_rank0_first():  # released weights and hub files: one download per machine
        model, settings = sampling.load_model(args, device)
        decode = sampling.load_decoder(settings, device, args.vae_batch_size, tiling=args.vae_tiling)
    sampler = sampling.make_sampler(args.sampler, args.num_sampling_steps, settings.diffusion_args,
                                    **sampling.sampler_options(args))
    args.sampler, args.num_sampling_steps = sampler.name, sampler.steps  # the defaults resolved, for the record
    folder = os.path.join(args.sample_dir, folder_name(args, settings))
    # Rank 0 hashes the weights (gigabytes for DiT-XL/2) once for everyone.
    sha256 = distributed.broadcast(checkpoint_sha256(settings.ckpt) if rank == 0 else None)
    record = {**dataclasses.asdict(settings), "ckpt_sha256": sha256, **sampler.settings(),
              **{k: getattr(args, k) for k in (
                  "cfg_scale", "cfg_all_channels", "global_seed", "balanced_classes", "precision",
                  "num_fid_samples", "per_proc_batch_size", "vae_tiling", "quantize")},
              "noise_device": sampling.noise_device(device).type}

    # Every rank checks the earlier run's settings and lists the missing PNGs before any is written.
    check_same_settings(folder, record, IMAGE_SETTINGS + (("num_fid_samples",) if args.balanced_classes else ())
                        + (CACHE_SETTINGS if sampler.cache_interval > 1 else ()))
    os.makedirs(folder, exist_ok=True)
    missing = distributed.broadcast(images_to_make(folder, args.num_fid_samples, settings) if rank == 0 else None)
    distributed.barrier()
    if rank == 0:
        save_json({**record, "world_size": world_size, "device": str(device), "torch": torch.__version__},
                  f"{folder}.json")
        print(f"sampling {len(missing)} of {args.num_fid_samples} images into {folder} on {world_size} process(es)",
              file=sys.stderr)

    mine = missing[rank::world_size]
    start = time.time()
    make_images(args, mine, (model, sampler, decode, settings), folder, rank, device)
    elapsed = time.time() - start

    distributed.barrier()
    if rank == 0:
        if mine:
            print(f"rank 0: {len(mine)} images in {elapsed:.1f}s ({elapsed / len(mine):.3f}s per image)",
                  file=sys.stderr)
        everyone = range(args.num_fid_samples)
        generators = sampling.seeded_generators(args.global_seed, everyone)
        labels = class_labels(args, settings.num_classes, everyone, generators)
        path = create_npz(folder, labels)
        print(f"saved {args.num_fid_samples} samples to {path}", file=sys.stderr)
        return path
    return None


if __name__ == "__main__":
    keep_freed_memory()  # as a script only: a process importing main keeps its own malloc settings
    cli.run(main)
