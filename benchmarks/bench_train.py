"""Training throughput (images/s) and peak memory of train.py for one config and batch size:
encoding with the VAE on the fly against pre-extracted latents, and the latter with gradient
checkpointing, with bf16 and with --compile.

    python benchmarks/bench_train.py --model DiT-S/2 --image-size 256 --global-batch-size 8
    python benchmarks/bench_train.py --model DiT-XL/2 --image-size 256 --global-batch-size 64 --steps 20

Each variant is a real `train.py` run (one process; CUDA when available, else CPU) on a folder
of generated JPEGs, timed from its own metrics.jsonl after warm-up steps. The VAE has the
Stable Diffusion VAE's architecture with random weights: the same cost as the real one,
without a download. Peak memory is the CUDA allocator's peak, or the process's peak RSS on CPU.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {  # name: (uses features, extra train.py flags)
    "on-the-fly": (False, []),
    "features": (True, []),
    "features+ckpt": (True, ["--grad-checkpointing"]),
    "features+bf16": (True, ["--precision", "bf16"]),
    "features+bf16+ckpt": (True, ["--precision", "bf16", "--grad-checkpointing"]),
    "features+compile": (True, ["--compile"]),  # the fast mode; raise --warmup to cover the compilation
}


def make_images(folder, count, size, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "class0"), exist_ok=True)
    for i in range(count):
        # smooth noise compresses like photos do, rather than like white noise
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        image.save(os.path.join(folder, "class0", f"{i:05d}.jpg"), quality=90)


def make_sd_vae(folder):
    """The Stable Diffusion VAE's architecture (diffusers' AutoencoderKL defaults for SD), random weights."""
    import torch
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=2, norm_num_groups=32, sample_size=256).save_pretrained(folder)


def run(cmd, what):
    start = time.time()
    result = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: {what} failed:\n{result.stderr[-2000:]}")
    return time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")

    work = args.work_dir or tempfile.mkdtemp(prefix="bench_train_")
    images, vae, features = (os.path.join(work, d) for d in ("images", "vae", "features"))
    total = args.global_batch_size * (args.warmup + args.steps)
    print(f"{args.model} at {args.image_size}px, batch {args.global_batch_size}, {args.steps} timed steps after "
          f"{args.warmup} warm-up; work dir {work}", flush=True)
    if not os.path.isdir(images):
        make_images(images, total, args.image_size)
    if not os.path.isdir(vae):
        make_sd_vae(vae)
    if any(VARIANTS[v][0] for v in variants) and not os.path.exists(os.path.join(features, "features.json")):
        seconds = run(["extract_features.py", "--data-path", images, "--feature-path", features, "--image-size",
                       str(args.image_size), "--vae-path", vae, "--batch-size", str(args.global_batch_size),
                       "--num-workers", "2", "--device", args.device], "extract_features.py")
        print(f"extract_features.py: {total} images (and their flips) in {seconds:.1f}s, "
              f"{total / seconds:.2f} images/s, once", flush=True)

    results = {}
    for name in variants:
        use_features, extra = VARIANTS[name]
        out = os.path.join(work, "runs", name)
        source = ["--feature-path", features] if use_features else ["--data-path", images, "--vae-path", vae]
        run(["train.py", "--model", args.model, "--image-size", str(args.image_size), "--num-classes", "1",
             "--global-batch-size", str(args.global_batch_size), "--max-steps", str(args.warmup + args.steps),
             "--log-every", "1", "--ckpt-every", "1000000", "--results-dir", out, "--device", args.device,
             *source, *extra], f"train.py ({name})")
        experiment = os.path.join(out, sorted(os.listdir(out))[-1])
        with open(os.path.join(experiment, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f][args.warmup:]
        seconds = sum(1 / r["steps_per_sec"] for r in records)
        results[name] = (len(records) * args.global_batch_size / seconds, records[-1]["peak_mem_gib"])
        print(f"{name:>20}: {results[name][0]:9.2f} images/s  peak memory {results[name][1]:7.2f} GiB", flush=True)

    base = results.get("on-the-fly") or results[variants[0]]
    base_name = "on-the-fly" if "on-the-fly" in results else variants[0]
    print(f"\nrelative to {base_name}:")
    for name, (speed, memory) in results.items():
        print(f"{name:>20}: {speed / base[0]:6.2f}x images/s, {memory / base[1]:5.2f}x peak memory")


if __name__ == "__main__":
    main()
