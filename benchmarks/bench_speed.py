"""Old code against new in one run: train.py steps/s and the model's forward, with ratios.

    python benchmarks/bench_speed.py                        # against d4c8731 (main before issue 14)
    python benchmarks/bench_speed.py --old HEAD~3 --what forward --repeats 5

The old code is materialised from git (`git archive OLD`) into a scratch folder, so both run
from their own files on the same job. Runs alternate (old, new, new --compile, old, ...) and
each variant's median over --repeats is reported, because a shared machine's speed drifts.

train: `torchrun --nproc_per_node=2 train.py` (gloo on CPU; a launcher times train_step calls) on
generated 256px JPEGs through a small stand-in VAE (tests/tiny_vae.py: the Stable Diffusion
VAE's shape, 8 channels), DiT-S/2,
global batch 8; steps/s from each run's metrics.jsonl after --warmup steps (which also absorb
--compile's compilation). forward: DiT-S/2 (random, non-zero weights) at batch 8 on 32x32x4
latents, forward and forward+backward on one thread, each variant in a fresh process that
imports its own models.py; the old and new default outputs are compared bit for bit.

Each figure comes twice: per wall-clock second, and per second of the process's CPU time (all
its threads; train: rank 0). On a machine shared with other jobs the wall clock measures the
neighbours as much as the code; CPU time counts the work this code does.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

# torchrun runs this in the code folder in place of train.py: it runs that folder's train.py
# unchanged, noting the wall-clock and process CPU time (all threads) at each train_step call.
TRAIN_CHILD = r"""
import json, os, runpy, sys, time
sys.path.insert(0, os.getcwd())
sys.argv = ["train.py", *sys.argv[1:]]
import train
marks, original = [], train.train_step
def train_step(*args, **kwargs):
    marks.append((time.perf_counter(), time.process_time()))
    return original(*args, **kwargs)
train.train_step = train_step
try:
    train.cli.run(train.main)
finally:
    if os.environ.get("RANK", "0") == "0":
        with open(os.environ["BENCH_MARKS"], "w") as f:
            json.dump(marks, f)
"""

# Run inside a fresh interpreter in the code folder given as argv[1]: times the model there.
FORWARD_CHILD = r"""
import hashlib, json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)  # one thread: the process CPU time is then the work done, whatever else runs
from models import create_model
fast, model_name, batch, iters = sys.argv[2] == "compile", sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
model = create_model(model_name, input_size=32)
with torch.no_grad():  # the release's zero-initialised output layers would make every output 0
    for p in model.parameters():
        if p.requires_grad:
            p.normal_(0, 0.02)
x, t, y = torch.randn(batch, 4, 32, 32), torch.randint(0, 1000, (batch,)), torch.randint(0, 1000, (batch,))
start = time.perf_counter()
if fast:
    from models import compile_blocks
    compile_blocks(model)
def forward():
    with torch.no_grad():
        return model(x, t, y)
def forward_backward():
    model(x, t, y).square().mean().backward()
out = forward()
forward_backward()
first = time.perf_counter() - start
def median_time(fn):
    wall, cpu = [], []
    for _ in range(iters):
        s, c = time.perf_counter(), time.process_time(); fn()
        wall.append(time.perf_counter() - s); cpu.append(time.process_time() - c)
    return sorted(wall)[len(wall) // 2], sorted(cpu)[len(cpu) // 2]
(fw, fc), (bw, bc) = median_time(forward), median_time(forward_backward)
print(json.dumps({"forward": fw, "forward_backward": bw, "forward_cpu": fc, "forward_backward_cpu": bc,
                  "first_call": first, "sha": hashlib.sha256(out.numpy().tobytes()).hexdigest()[:16],
                  "out": out.flatten()[:4096].tolist(), "threads": torch.get_num_threads()}))
"""


def materialise(rev, folder):
    """The tracked files of `rev` in folder."""
    os.makedirs(folder, exist_ok=True)
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def make_job(work, steps, batch):
    from bench_train import make_images
    from tiny_vae import save_tiny_vae

    images, vae = os.path.join(work, "images"), os.path.join(work, "vae")
    if not os.path.isdir(images):
        make_images(images, batch * (steps + 1), 256)
    if not os.path.isdir(vae):
        save_tiny_vae(vae)
    return images, vae


def train_once(code, extra, work, images, vae, args, tag):
    """(steps/s of wall-clock time, steps per CPU-second of rank 0) over the timed steps: from the
    start of step `warmup` to the start of the step after the last timed one (which also saves)."""
    out, marks = os.path.join(work, "runs", tag), os.path.join(work, f"marks-{tag}.json")
    launcher = os.path.join(work, "train_child.py")
    with open(launcher, "w") as f:
        f.write(TRAIN_CHILD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port",
           str(29500 + os.getpid() % 1000), launcher, "--model", args.model, "--image-size", "256",
           "--num-classes", "1", "--global-batch-size", str(args.global_batch_size), "--max-steps",
           str(args.warmup + args.steps + 1), "--log-every", "1", "--ckpt-every", "1000000", "--results-dir", out,
           "--data-path", images, "--vae-path", vae, "--device", "cpu", *extra]
    result = subprocess.run(cmd, cwd=code, capture_output=True, text=True, env=dict(os.environ, BENCH_MARKS=marks))
    if result.returncode != 0:
        sys.exit(f"error: train.py ({tag}) failed:\n{result.stderr[-3000:]}")
    with open(marks) as f:
        recorded = json.load(f)
    (wall0, cpu0), (wall1, cpu1) = recorded[args.warmup], recorded[args.warmup + args.steps]
    return args.steps / (wall1 - wall0), args.steps / (cpu1 - cpu0)


def forward_once(code, fast, args):
    result = subprocess.run([sys.executable, "-c", FORWARD_CHILD, code, "compile" if fast else "eager", args.model,
                             str(args.batch_size), str(args.iters)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: the forward benchmark failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(name, results, key, base):
    values = results[name]
    median = statistics.median(values)
    print(f"{name:>16}: median {median:8.4f} {key}  ratio {median / base:5.2f}x  runs "
          + " ".join(f"{v:.4f}" for v in values), flush=True)


def bench_train(args, old, new, work):
    images, vae = make_job(work, args.warmup + args.steps + 1, args.global_batch_size)
    variants = {"old": (old, []), "new": (new, []), "new --compile": (new, ["--compile"])}
    results = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    print(f"\ntrain.py, {args.model} 256px via the tiny VAE, global batch {args.global_batch_size}, {args.nproc} "
          f"processes (gloo), {args.steps} timed steps after {args.warmup}:", flush=True)
    for repeat in range(args.repeats):
        for name, (code, extra) in variants.items():
            start = time.time()
            wall, per_cpu = train_once(code, extra, work, images, vae, args, f"{name}-{repeat}".replace(" ", ""))
            results[name].append(wall)
            cpu[name].append(per_cpu)
            print(f"  repeat {repeat} {name}: {wall:.4f} steps/s, {per_cpu:.4f} steps per CPU-second of rank 0 "
                  f"({time.time() - start:.0f}s)", flush=True)
    print("steps/s (wall clock):")
    for name in variants:
        report(name, results, "steps/s", statistics.median(results["old"]))
    print("steps per CPU-second of rank 0 (robust to other jobs on the machine):")
    for name in variants:
        report(name, cpu, "steps/cpu-s", statistics.median(cpu["old"]))


def bench_forward(args, old, new):
    variants = {"old": (old, False), "new": (new, False), "new compiled": (new, True)}
    runs = {name: [] for name in variants}
    print(f"\nmodel, {args.model} batch {args.batch_size} at 32x32x4, median of {args.iters} calls per process:",
          flush=True)
    for repeat in range(args.repeats):
        for name, (code, fast) in variants.items():
            runs[name].append(forward_once(code, fast, args))
            r = runs[name][-1]
            print(f"  repeat {repeat} {name}: forward {r['forward']:.3f}s, forward+backward "
                  f"{r['forward_backward']:.3f}s, first call {r['first_call']:.1f}s, {r['threads']} threads",
                  flush=True)
    for key in ("forward", "forward_backward", "forward_cpu", "forward_backward_cpu"):
        speed = {name: [args.batch_size / r[key] for r in rs] for name, rs in runs.items()}
        print(f"{key} (images/s{' of CPU time, one thread' if key.endswith('cpu') else ''}):")
        for name in variants:
            report(name, speed, "images/s", statistics.median(speed["old"]))
    same = runs["old"][0]["sha"] == runs["new"][0]["sha"]
    diff = max(abs(a - b) for a, b in zip(runs["new"][0]["out"], runs["new compiled"][0]["out"]))
    print(f"new default forward bit-identical to the old one: {same}; compiled vs default: max |difference| "
          f"{diff:.2e} (first 4096 outputs)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default="d4c8731", help="git revision of the old code")
    parser.add_argument("--what", default="forward,train", help="comma-separated: forward, train")
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="forward: batch")
    parser.add_argument("--iters", type=int, default=3, help="forward: timed calls per process")
    parser.add_argument("--global-batch-size", type=int, default=8, help="train")
    parser.add_argument("--nproc", type=int, default=2, help="train: processes")
    parser.add_argument("--steps", type=int, default=3, help="train: timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="train: untimed steps first")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_speed_")
    old = materialise(args.old, os.path.join(work, "old"))
    print(f"old: {args.old} in {old}; new: {ROOT}; cores {os.cpu_count()}; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    if "forward" in args.what:
        bench_forward(args, old, ROOT)
    if "train" in args.what:
        bench_train(args, old, ROOT, work)
    print(f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
