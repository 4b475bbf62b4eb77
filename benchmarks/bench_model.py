"""Benchmark the DiT forward and forward+backward passes.

Prints images/s, peak memory and achieved FLOP/s, and the FLOP/s as a fraction of a plain
torch.mm of the model's own MLP shape timed in the same run (the practical ceiling).

    python benchmarks/bench_model.py --model DiT-S/2 --image-size 256 --batch-size 8
    python benchmarks/bench_model.py --model DiT-XL/2 --batch-size 32 --device cuda --precision bf16
"""
import argparse
import os
import resource
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from precision import autocast, set_tf32  # noqa: E402
from distributed import pick_device  # noqa: E402
from fast import compile_model  # noqa: E402
from models import create_model  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS on Linux


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--latent", action=argparse.BooleanOptionalAction, default=True,
                        help="input is a VAE latent (image size / 8, 4 channels); --no-latent for pixel space")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=["fp32", "tf32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="the fast mode: fast.compile_model")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    return parser.parse_args()


def matmul_flops(model, batch_size, precision, device, warmup, iters):
    """The ceiling: FLOP/s of a plain matmul of the MLP's first layer at the same token count."""
    hidden = model.pos_embed.shape[-1]
    tokens = batch_size * model.pos_embed.shape[1]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a = torch.randn(tokens, hidden, device=device, dtype=dtype)
    w = torch.randn(hidden, 4 * hidden, device=device, dtype=dtype)
    seconds = timed(lambda: torch.mm(a, w), device, warmup, iters * 4)
    print(f"plain torch.mm ({tokens}x{hidden} @ {hidden}x{4 * hidden}): "
          f"{2 * tokens * hidden * 4 * hidden / seconds / 1e9:.1f} GFLOP/s")
    return 2 * tokens * hidden * 4 * hidden / seconds


def counted_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    set_tf32(args.precision, device)
    torch.manual_seed(0)
    size = args.image_size // 8 if args.latent else args.image_size
    model = create_model(args.model, input_size=size, in_channels=args.in_channels,
                         num_classes=args.num_classes).to(device)
    model.gradient_checkpointing = args.grad_checkpointing
    step = compile_model(model) if args.compile else model
    b = args.batch_size
    x = torch.randn(b, args.in_channels, size, size, device=device)
    t = torch.randint(0, 1000, (b,), device=device)
    y = torch.randint(0, args.num_classes, (b,), device=device)

    def forward():
        with torch.no_grad(), autocast(args.precision, device):
            step(x, t, y)

    def forward_backward():
        with autocast(args.precision, device):
            out = step(x, t, y)
        out.float().square().mean().backward()

    fwd_flops, fwd_bwd_flops = counted_flops(forward), counted_flops(forward_backward)
    model.zero_grad(set_to_none=True)

    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model} input {size}x{size}x{args.in_channels}, {params / 1e6:.1f}M params, batch {b}, "
          f"{args.precision}, device {device}, threads {torch.get_num_threads()}"
          f"{', grad checkpointing' if args.grad_checkpointing else ''}{', compiled' if args.compile else ''}")
    mm_flops = matmul_flops(model, b, args.precision, device, args.warmup, args.iters)
    for name, fn, flops in (("forward", forward, fwd_flops), ("forward+backward", forward_backward, fwd_bwd_flops)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(fn, device, args.warmup, args.iters)
        achieved = flops / seconds
        print(f"{name:17s} {b / seconds:8.2f} images/s  {seconds * 1e3:8.1f} ms/batch  "
              f"{achieved / 1e9:7.1f} GFLOP/s = {achieved / mm_flops:.2f} x matmul  "
              f"peak memory {peak_memory_mib(device):.0f} MiB")


if __name__ == "__main__":
    main()
