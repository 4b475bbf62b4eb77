"""Encode an image folder once with the frozen Stable Diffusion VAE, for `train.py --feature-path`.

For every image, the encoder's Gaussian (mean and standard deviation) of the image and of its
horizontal flip is stored, so training still draws a fresh latent and a random flip each time:
the same training distribution as encoding on the fly, without running the VAE per step.

    torchrun --nnodes=1 --nproc_per_node=N extract_features.py --data-path /path/to/imagenet/train \
        --feature-path features/imagenet256 --image-size 256
    torchrun --nnodes=1 --nproc_per_node=N train.py --model DiT-XL/2 --feature-path features/imagenet256

Features go into shards of --shard-size images (shard-00000.pt, ...), shared round-robin among
the processes and each written atomically; features.json is written last, once every shard
exists. An interrupted extraction resumes when the same command is run again: finished shards
are kept, the rest are encoded. A plain `python extract_features.py ...` runs as one process.
At 256px in float16 a shard of 4096 images takes 128 MiB (ImageNet: about 41 GiB).
"""
import argparse
import json
import os

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import cli
import data
import distributed
import files
import vae as vae_lib
from precision import set_tf32

CONFIG = "config.json"  # what the folder's shards were made from; a mismatch is refused


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", type=str, required=True, help="image folder, one sub-folder per class")
    parser.add_argument("--feature-path", type=str, required=True, help="output folder for the feature shards")
    parser.add_argument("--image-size", type=cli.image_size, default=256, metavar="N|HxW",
                        help="N (square: 256 or 512 in the paper) or HxW, height x width (e.g. 256x384); "
                             "multiples of 8. Images are resized to cover the size, then centre-cropped")
    parser.add_argument("--vae", choices=list(vae_lib.HUB_IDS), default="ema",
                        help="ema | mse (the Stable Diffusion VAE on the hub)")
    parser.add_argument("--vae-path", type=str, default=None, help="local diffusers AutoencoderKL folder instead")
    parser.add_argument("--vae-tiling", action="store_true",
                        help="encode large images in overlapping tiles (diffusers' tiled VAE): fixed memory, "
                             "slightly different features at the blended seams")
    parser.add_argument("--batch-size", type=int, default=32, help="images encoded at once by each process")
    parser.add_argument("--shard-size", type=int, default=4096, help="images per shard file")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                        help="storage type of mean and std (float16 halves the disk space)")
    parser.add_argument("--precision", choices=["fp32", "tf32"], default="tf32", help="TF32 matmuls on CUDA or not")
    parser.add_argument("--num-workers", type=cli.non_negative_int, default=4,
                        help="data-loading processes per rank (0: load in the main process)")
    parser.add_argument("--device", type=str, default="auto", help="auto | cuda | cpu")
    vae_lib.add_encode_precision_flag(parser)
    data.add_bucket_flag(parser)  # --aspect-buckets: shards per bucket, each of one shape
    args = parser.parse_args(argv)
    if args.aspect_buckets:
        args.image_size = args.aspect_buckets[0]  # what train.py records as the model's size
    for size in args.aspect_buckets or [args.image_size]:
        if any(side % vae_lib.DOWNSAMPLE for side in cli.height_width(size)):
            raise cli.UserError(f"image size {cli.size_text(size)} is not divisible by {vae_lib.DOWNSAMPLE} (the "
                                f"VAE's downsampling factor); use 256 or 512, or multiples of 8 such as 256x384")
    if args.batch_size < 1 or args.shard_size < 1:
        raise cli.UserError("--batch-size and --shard-size must be positive")
    files.check_output_folder(args.feature_path, "--feature-path")

    rank, world_size, device = distributed.setup(args.device)
    try:
        extract(args, rank, world_size, device)
    finally:
        distributed.cleanup()


@torch.no_grad()
def extract(args, rank, world_size, device):
    set_tf32(args.precision, device)
    if args.aspect_buckets:
        dataset = data.BucketedImages(args.data_path, args.aspect_buckets, channels=3, in_memory=False,
                                      quiet=rank != 0)
    else:
        dataset = data.ImageFolder(args.data_path, args.image_size, channels=3, in_memory=False, quiet=rank != 0)
    plan = shard_plan(args, dataset)
    num_shards = len(plan)
    config = features_config(args, dataset)
    config_path = os.path.join(args.feature_path, CONFIG)
    done = [os.path.exists(os.path.join(args.feature_path, data.shard_name(i))) for i in range(num_shards)]
    if rank == 0:
        os.makedirs(args.feature_path, exist_ok=True)
        files.remove_stale_temp_files(args.feature_path)  # left by a killed run
        if not os.path.exists(config_path):
            files.save_json(config, config_path)
    distributed.barrier()
    with open(config_path) as f:
        existing = json.load(f)
    if existing != config:
        changed = sorted(k for k in set(config) | set(existing) if config.get(k) != existing.get(k))
        raise cli.UserError(f"--feature-path {args.feature_path!r} holds features made with other settings "
                            f"({', '.join(changed)} differ); use a new --feature-path or delete that folder")

    todo = [i for i in range(rank, num_shards, world_size) if not done[i]]
    with distributed.local_rank0_first():  # one download of a hub VAE per machine
        vae = vae_lib.load_vae(args.vae, args.vae_path, device, tiling=args.vae_tiling) if todo else None
    images_todo = sum(len(plan[i][1]) for i in todo)
    if rank == 0:
        print(f"{len(dataset)} images in {len(dataset.classes)} classes -> {num_shards} shards in "
              f"{args.feature_path} ({sum(done)} already done); "
              f"{world_size} process(es)", flush=True)
    progress = tqdm(total=images_todo, unit="img", disable=rank != 0, desc="rank 0 encoding")
    for shard in todo:
        encode_shard(args, dataset, plan[shard][1], vae, device, progress, data.shard_name(shard))
    progress.close()

    distributed.barrier()
    if rank == 0:
        write_meta(args, config, plan, dataset)
    distributed.barrier()


def features_config(args, dataset):
    """What the features depend on, recorded in features.json: a rerun must match it."""
    config = {"data_path": os.path.abspath(args.data_path), "num_images": len(dataset), "classes": dataset.classes,
              "image_size": args.image_size, "vae": args.vae, "vae_path": args.vae_path,
              "shard_size": args.shard_size, "dtype": args.dtype}
    if args.vae_tiling:  # recorded only when on, so folders made before the flag existed still resume
        config["vae_tiling"] = True
    if args.vae_precision != "fp32":  # likewise: other latents, so a resume must not mix them
        config["vae_precision"] = args.vae_precision
    if args.aspect_buckets:  # likewise
        config["aspect_buckets"] = args.aspect_buckets
    return config


def encode_shard(args, dataset, indices, vae, device, progress, name):
    """Encode the images at `indices` (and their mirror images) and write them as one shard."""
    dtype = getattr(torch, args.dtype)
    loader = DataLoader(Subset(dataset, indices), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda", collate_fn=data.batch_collate)
    means, stds, labels = [], [], []
    for images, y in loader:
        x = images.to(device).float() / 127.5 - 1
        # One batch holds the images then their mirror images: stored as [:, 0] and [:, 1].
        mean, std = vae_lib.encode_distribution(vae, torch.cat([x, x.flip(-1)]), args.vae_precision)
        means.append(torch.stack(mean.chunk(2), dim=1).to(dtype).cpu())
        stds.append(torch.stack(std.chunk(2), dim=1).to(dtype).cpu())
        labels.append(y)
        progress.update(len(y))
    files.save_torch({"mean": torch.cat(means), "std": torch.cat(stds), "labels": torch.cat(labels),
                      "indices": torch.tensor(indices)}, os.path.join(args.feature_path, name))


def shard_plan(args, dataset):
    """[(bucket, image indices)] of each shard: runs of --shard-size images in folder order, or with
    --aspect-buckets the same within each bucket, bucket by bucket (bucket None: no buckets)."""
    if not args.aspect_buckets:
        return [(None, range(start, min(start + args.shard_size, len(dataset))))
                for start in range(0, len(dataset), args.shard_size)]
    plan = []
    for b in range(len(args.aspect_buckets)):
        members = (dataset.bucket_of == b).nonzero().squeeze(1).tolist()
        plan += [(b, members[start:start + args.shard_size]) for start in range(0, len(members), args.shard_size)]
    return plan


def write_meta(args, config, plan, dataset):
    """features.json marks the folder complete; train.py reads everything it needs from it. With
    --aspect-buckets it lists each bucket's image size and latent shape, and each shard's bucket."""
    shards, total_bytes, latent_shape = [], 0, None
    for i, (bucket, _) in enumerate(plan):
        path = os.path.join(args.feature_path, data.shard_name(i))
        if not os.path.exists(path):
            raise cli.UserError(f"shard {path} is missing after extraction; re-run the same command to finish it")
        shard = files.load_torch(path, "feature shard", mmap=True,  # reads the shapes, not the data
                                 fix="delete it and re-run the same command to write it again")
        latent_shape = list(shard["mean"].shape[2:])
        total_bytes += sum(shard[k].numel() * shard[k].element_size() for k in ("mean", "std"))
        shards.append({"file": data.shard_name(i), "count": len(shard["labels"])})
        if bucket is not None:
            shards[-1]["bucket"] = bucket
    meta = dict(config, num_classes=len(dataset.classes), latent_shape=latent_shape, shards=shards,
                bytes=total_bytes, latent_scale=vae_lib.LATENT_SCALE)
    if args.aspect_buckets:
        meta["buckets"] = [{"image_size": size, "latent_shape": [4, *(side // vae_lib.DOWNSAMPLE
                                                                      for side in cli.height_width(size))]}
                           for size in args.aspect_buckets]
        meta["latent_shape"] = meta["buckets"][0]["latent_shape"]
    files.save_json(meta, os.path.join(args.feature_path, data.FEATURES_META))
    print(f"wrote {len(dataset)} images' features ({total_bytes / 2**30:.2f} GiB) to {args.feature_path}", flush=True)


if __name__ == "__main__":
    cli.run(main)
