"""Training and sampling throughput of DiT configs on a GPU: training images/s, model FLOP
utilisation (MFU), peak memory, and sampling images/s with DDPM-250 and DPM-Solver++-25.

    python benchmarks/bench_gpu.py                          # DiT-XL/2 and DiT-B/2, 256px, bf16, compiled
    python benchmarks/bench_gpu.py --models DiT-XL/2 --batch-size 256 --precision bf16 --grad-checkpointing
    python benchmarks/bench_gpu.py --device cpu --models DiT-S/8 --steps 2 --batch-size 2 --ddpm-steps 3 \
        --dpm-steps 5                                       # the tiny CPU check (tests/test_speed.py)

A training step is train.py's own (`train.train_step`: autocast, backward, AdamW fused on
CUDA, EMA update) on latents already encoded (as with --feature-path), copied from pinned host
memory without blocking; nothing in the timed loop waits for the GPU until the end. MFU counts
the paper's Gflops (multiply-adds, one 256px image's forward) x 2 (flops per multiply-add) x 3
(forward and backward) per image against the GPU's peak dense bf16/fp16 throughput (table
below, or --peak-tflops); elsewhere (CPU, fp32) against a plain matmul timed in the same run.
Peak memory is the CUDA allocator's peak over the training steps (CPU: the process's peak RSS).
Sampling times the EMA model with guidance (cfg 1.5, the FID setting; the batch is doubled),
the VAE decode excluded. --compile (default on CUDA) is the fast mode, fast.compile_model.
"""
import argparse
import json
import os
import re
import resource
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import cli  # noqa: E402
import precision as precision_lib  # noqa: E402
import sampling  # noqa: E402
import train  # noqa: E402
from diffusion import create_process  # noqa: E402
from distributed import pick_device  # noqa: E402
from flops import params_and_gflops  # noqa: E402
from fast import compile_model  # noqa: E402
from models import create_model, model_args_for  # noqa: E402

# Peak tensor-core TFLOP/s for bf16 and fp16 (fp32 accumulation) from NVIDIA's data sheets. These are
# DENSE figures: the sheets print the "with sparsity" ones first, twice these; dense matmuls never reach
# those. Cards without bf16 tensor cores (compute capability under 8.0: V100, T4) list their fp16 peak.
# A card matches when its name, less the words in NAME_NOISE, is exactly a key (find_peak_tflops):
# "NVIDIA L40" is not an "L4", an "H100 NVL" not an SXM "H100". Cards without a sheet figure here
# (A10G, RTX 4090 D, ...) are measured instead.
PEAK_TFLOPS = {
    "H100": 989.0, "H100 SXM5": 989.0,  # SXM5, which torch names "NVIDIA H100 80GB HBM3"
    "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "H200": 989.0, "H200 NVL": 835.0, "GH200": 989.0,
    "A100": 312.0, "A100 SXM4": 312.0, "A100 PCIe": 312.0,
    "A10": 125.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "V100": 125.0, "V100 SXM2": 125.0, "V100 PCIe": 112.0, "V100S PCIe": 130.0,  # fp16 only
    "T4": 65.0,  # fp16 only
    "RTX 4090": 165.2,  # GeForce: fp32 accumulation runs at this rate, half the fp16-accumulate one
}
# Words of torch's device names that say nothing about the chip: brands, memory size and type.
NAME_NOISE = re.compile(r"nvidia|tesla|geforce|\d+gb|hbm\d*e?")
BF16_CAPABILITY = (8, 0)  # Ampere and later have bf16 tensor cores


def name_words(name):
    """A device name's chip words, lower case: "NVIDIA A100-SXM4-80GB" -> {"a100", "sxm4"}."""
    return frozenset(w for w in re.split(r"[\s_-]+", name.lower()) if w and not NAME_NOISE.fullmatch(w))


def find_peak_tflops(device_name):
    """The data-sheet peak of the card torch calls `device_name`, or None when the table lacks it."""
    words = name_words(device_name)
    return next((value for key, value in PEAK_TFLOPS.items() if name_words(key) == words), None)


def choose_precision(asked, device_type, capability=None):
    """--precision (None: the default) for a device: bf16 on CUDA cards with bf16 tensor cores, fp16 on older
    ones (capability under 8.0), fp32 on CPU. An explicit bf16 on an older card is refused."""
    bf16_cores = device_type == "cuda" and tuple(capability) >= BF16_CAPABILITY
    if asked is None:
        return "fp32" if device_type != "cuda" else ("bf16" if bf16_cores else "fp16")
    if asked == "bf16" and device_type == "cuda" and not bf16_cores:
        raise cli.UserError(f"--precision bf16: this GPU (compute capability {capability[0]}.{capability[1]}) has "
                            f"no bf16 tensor cores, so the figures would not be its speed; use --precision fp16")
    return asked


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="DiT-XL/2,DiT-B/2", help="comma-separated configs")
    parser.add_argument("--image-size", type=int, default=256, help="pixels; the latent is a eighth of it")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch (one GPU)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (they absorb compilation)")
    parser.add_argument("--precision", choices=precision_lib.PRECISIONS, default=None,
                        help="default bf16 on CUDA (fp16 on GPUs without bf16 tensor cores, e.g. V100, T4), "
                             "fp32 on CPU (where bf16 is emulated without AVX-512 BF16)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="fast.compile_model (default: on CUDA)")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--sample-batch-size", type=int, default=64, help="images per sampling call")
    parser.add_argument("--ddpm-steps", type=int, default=250)
    parser.add_argument("--dpm-steps", type=int, default=25)
    parser.add_argument("--no-sampling", action="store_true", help="training figures only")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    return parser.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(args, device):
    """(peak TFLOP/s, where the figure comes from)."""
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if device.type == "cuda" and args.precision in ("bf16", "fp16"):
        name = torch.cuda.get_device_name(device)
        value = find_peak_tflops(name)
        if value is not None:
            return value, f"{name} data sheet, dense"
    n = 4096 if device.type == "cuda" else 1024
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    sync(device)
    start, reps = time.perf_counter(), 20 if device.type == "cuda" else 5
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12, f"measured {n}^3 matmul"


def build(args, name, device):
    latent = args.image_size // 8
    torch.manual_seed(0)
    model = create_model(name, input_size=latent).to(device)
    model.gradient_checkpointing = args.grad_checkpointing
    ema = create_model(name, input_size=latent).to(device).requires_grad_(False).eval()
    ema.load_state_dict(model.state_dict())
    if args.compile:
        compile_model(model, blocks_only=True)  # as train.py --compile
        compile_model(ema)  # without inference=True (frozen weights): train_step updates them
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, **train.adamw_kernel(device, args.compile))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    return train.State(model, ema, opt, scaler, trained=model)


def train_speed(args, state, device):
    """Images/s of train.train_step, and the peak memory (GiB) over it."""
    run = types.SimpleNamespace(args=argparse.Namespace(precision=args.precision, max_grad_norm=None,
                                                        ema_decay=0.9999, grad_accum_steps=1),
                                device=device, world_size=1)
    diffusion = create_process(dict(checkpoint.DEFAULT_DIFFUSION_ARGS))
    b, latent = args.batch_size, args.image_size // 8
    pin = device.type == "cuda"
    host = [torch.randn(b, 4, latent, latent, pin_memory=pin) for _ in range(2)]
    labels = torch.randint(0, 1000, (b,), pin_memory=pin)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    state.trained.train()
    start = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        x = host[step % 2].to(device, non_blocking=True)
        y = labels.to(device, non_blocking=True)
        t = diffusion.training_times(b, device=device)
        train.train_step(run, state, diffusion, [(x, t, dict(y=y), torch.randn_like(x))])
    sync(device)
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return args.steps * b / seconds, memory / 2**30


def sample_speed(args, ema, device, name, steps):
    """Images/s of guided sampling (no VAE decode), after one untimed call at the same shapes."""
    sampler = sampling.make_sampler(name, steps, dict(checkpoint.DEFAULT_DIFFUSION_ARGS))
    n, latent = args.sample_batch_size, args.image_size // 8
    labels = torch.randint(0, 1000, (n,)).tolist()
    warm = sampling.make_sampler("ddim", 2, dict(checkpoint.DEFAULT_DIFFUSION_ARGS))
    with torch.no_grad():
        sampling.generate(ema, warm, labels, 1.5, torch.randn(n, 4, latent, latent, device=device),
                          precision=args.precision)
        sync(device)
        start = time.perf_counter()
        sampling.generate(ema, sampler, labels, 1.5, torch.randn(n, 4, latent, latent, device=device),
                          precision=args.precision)
        sync(device)
    return n / (time.perf_counter() - start)


def bench(args, name, device, peak):
    gflops = params_and_gflops(model_args_for(name, input_size=args.image_size // 8, in_channels=4,
                                              num_classes=1000))[1]
    state = build(args, name, device)
    images_per_sec, memory = train_speed(args, state, device)
    mfu = images_per_sec * gflops * 1e9 * 2 * 3 / (peak * 1e12)
    row = {"model": name, "image_size": args.image_size, "batch_size": args.batch_size, "precision": args.precision,
           "compile": args.compile, "grad_checkpointing": args.grad_checkpointing, "gflops": gflops,
           "train_images_per_sec": images_per_sec, "train_steps_per_sec": images_per_sec / args.batch_size,
           "mfu": mfu, "peak_memory_gib": memory, "sample_images_per_sec": {}}
    print(f"{name} {args.image_size}px batch {args.batch_size} {args.precision}"
          f"{' compiled' if args.compile else ''}{' grad-checkpointing' if args.grad_checkpointing else ''}: "
          f"train {images_per_sec:.2f} images/s ({images_per_sec / args.batch_size:.3f} steps/s), "
          f"MFU {100 * mfu:.1f}% ({gflops:.2f} Gflops x 6 per image), peak memory {memory:.2f} GiB", flush=True)
    state.opt, state.model, state.trained = None, None, None  # free the optimiser state before sampling
    if not args.no_sampling:
        for sampler, steps in (("ddpm", args.ddpm_steps), ("dpm-solver", args.dpm_steps)):
            speed = sample_speed(args, state.ema, device, sampler, steps)
            row["sample_images_per_sec"][f"{sampler}-{steps}"] = speed
            print(f"{name} sampling {sampler}-{steps}, cfg 1.5, batch {args.sample_batch_size}: {speed:.3f} images/s",
                  flush=True)
    return row


def main():
    args = parse_args()
    device = pick_device(args.device)
    if args.compile is None:
        args.compile = device.type == "cuda"
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    args.precision = choose_precision(args.precision, device.type, capability)
    precision_lib.set_tf32(args.precision, device)
    peak, source = peak_tflops(args, device)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}; peak {peak:.1f} TFLOP/s ({source})", flush=True)
    rows = [bench(args, name, device, peak) for name in args.models.split(",")]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
