"""Per-rank peak memory of train.py under DDP and under --fsdp (issue 25.1), on 2 gloo processes.

    python benchmarks/fsdp_memory.py                      # DiT-B/2, 8x8x4 pixel-space inputs, batch 4 per process
    python benchmarks/fsdp_memory.py --model DiT-S/2 --steps 2

Each variant trains --steps steps on random 8x8 images (vae none, 4 channels: few tokens, so the
weights, gradients, AdamW moments and EMA are what fill the memory) and writes its checkpoint.
Each rank reports its ru_maxrss (the CPU's peak resident memory, train.py's peak_mem_gib) twice:
after the last training step, as train.py logs it (metrics.jsonl holds rank 0's), and at exit,
after the checkpoint (under --fsdp rank 0 then gathers the whole state dicts).
"""
import argparse
import atexit
import os
import re
import resource
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def as_rank():
    """Inside torchrun: run train.py, printing this rank's peak memory when it logs and at exit."""
    sys.path.insert(0, ROOT)
    import cli
    import train

    rank, log_window = os.environ["RANK"], train.log_window

    def logged(run, state, window):
        log_window(run, state, window)
        print(f"PEAK rank {rank} step {state.train_steps} {peak_gib():.3f}", flush=True)

    train.log_window = logged
    atexit.register(lambda: print(f"PEAK rank {rank} exit {peak_gib():.3f}", flush=True))
    cli.run(lambda: train.main(sys.argv[2:]))


def write_images(folder, count=16):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(os.path.join(folder, f"class{c}"), exist_ok=True)
        for i in range(count // 2):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"class{c}", f"{i}.png"))


def measure(work, model, steps, extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "--rank",
           "--model", model, "--vae", "none", "--in-channels", "3", "--image-size", "8", "--num-classes", "2",
           "--data-path", os.path.join(work, "images"), "--results-dir", os.path.join(work, "results"),
           "--global-batch-size", "8", "--max-steps", str(steps), "--log-every", "1", "--cpu-threads", "1", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    peaks = {}
    for rank, when, gib in re.findall(r"PEAK rank (\d) (step \d+|exit) ([\d.]+)", out.stdout):
        peaks[(int(rank), when)] = float(gib)
    return peaks


def main():
    if sys.argv[1:2] == ["--rank"]:
        return as_rank()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="DiT-B/2")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        write_images(os.path.join(work, "images"))
        print(f"{args.model}, 2 gloo processes, peak resident memory per rank (GiB):")
        print(f"{'':8} {'rank 0 step ' + str(args.steps):>14} {'rank 1 step ' + str(args.steps):>14} "
              f"{'rank 0 exit':>12} {'rank 1 exit':>12}")
        for name, extra in (("DDP", []), ("--fsdp", ["--fsdp"])):
            p = measure(work, args.model, args.steps, extra)
            last = f"step {args.steps}"
            print(f"{name:8} {p[0, last]:14.2f} {p[1, last]:14.2f} {p[0, 'exit']:12.2f} {p[1, 'exit']:12.2f}")


if __name__ == "__main__":
    main()
