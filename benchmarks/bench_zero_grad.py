"""DDP training steps/s with the gradients zeroed between steps against set to None (issue 26.7).

    python benchmarks/bench_zero_grad.py                       # DiT-S/2, 16x16x4 latents, batch 4 per process
    python benchmarks/bench_zero_grad.py --size 4 --batch 2 --rounds 9   # little compute: the resets weigh most

Two gloo processes (torchrun) wrap the model as train.wrap_ddp does (gradient_as_bucket_view,
train.GLOO_BUCKET_MB buckets) and run forward, backward, AdamW (train.adamw_kernel's foreach) and
the gradient reset, in turns between the VARIANTS (zero_grad(set_to_none=True), set_to_none=False,
and set_to_none=True with DDP's batched_grad_copy, each on its own copy of the model) every --steps
steps (after --warmup) for --rounds rounds, so that a drift in the machine's speed hits all alike.
Prints each variant's median steps/s over the rounds and its ratio to the first, per wall-clock
second and per second of rank 0's CPU time (all its threads: gloo's too), which the neighbours of
a shared machine disturb less.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


VARIANTS = {  # name: (set_to_none, DDP's batched_grad_copy)
    "set_to_none=True (before)": (True, False),
    "set_to_none=False (train.py now)": (False, False),
    "set_to_none=True, batched_grad_copy": (True, True),
}


def child(args):
    sys.path.insert(0, ROOT)
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import train
    from models import create_model

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, t, y = torch.randn(args.batch, 4, args.size, args.size), torch.randint(0, 1000, (args.batch,)), torch.zeros(
        args.batch, dtype=torch.long)
    runs = {}
    for name, (set_to_none, batched) in VARIANTS.items():  # one model each: DDP hooks its module's parameters
        torch.manual_seed(0)
        model = DDP(create_model(args.model, input_size=args.size), gradient_as_bucket_view=True,
                    bucket_cap_mb=train.GLOO_BUCKET_MB, batched_grad_copy=batched)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **train.adamw_kernel(torch.device("cpu")))
        runs[name] = (model, opt, set_to_none)

    def step(name):
        model, opt, set_to_none = runs[name]
        model(x, t, y).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)

    for name in runs:
        for _ in range(args.warmup):
            step(name)
    times, cpu = {name: [] for name in runs}, {name: [] for name in runs}
    names = list(runs)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            step(name)  # the first step after a switch settles the caches
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step(name)
            cpu[name].append((time.process_time() - start_cpu) / args.steps)
            dist.barrier()
            times[name].append((time.perf_counter() - start) / args.steps)
    if dist.get_rank() == 0:
        print(f"{args.model} at {args.size}x{args.size}x4, batch {args.batch} per process, 2 gloo processes, "
              f"{args.rounds} rounds of {args.steps} steps; medians, steps/s (per CPU-second of rank 0):")
        base = statistics.median(times[names[0]]), statistics.median(cpu[names[0]])
        for name in names:
            wall, proc = statistics.median(times[name]), statistics.median(cpu[name])
            print(f"  {name:40s} {1 / wall:.3f} ({1 / proc:.3f})   {base[0] / wall:.3f}x ({base[1] / proc:.3f}x)")
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--size", type=int, default=16, help="latent side")
    parser.add_argument("--batch", type=int, default=4, help="per process")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.abspath(__file__), "--child", *sys.argv[1:]]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


if __name__ == "__main__":
    main()
