"""Old code against new in one run: train.py steps/s and the model's forward, with ratios.

    python benchmarks/bench_speed.py                        # against d4c8731 (main before issue 14)
    python benchmarks/bench_speed.py --old HEAD~3 --what forward --repeats 5
    python benchmarks/bench_speed.py --what heap             # sample.py's malloc setting

The old code is materialised from git (`git archive OLD`) into a scratch folder, so both run
from their own files on the same job, because a shared machine's speed drifts: by 10% and more
over minutes on the 2-core development machine.

forward: DiT-S/2 (random, non-zero weights) at batch 8 on 32x32x4 latents, forward and
forward+backward on one thread. A process makes one kind of call, as sample.py (forward only) and
train.py (forward+backward) do: it loads the old models.py beside the new one, builds the old
model, the new one and the new one in the fast mode (forward: as sample.py --compile, the whole
model compiled, weights frozen into the no-grad graph, and that again with --quantize int8, the
linear layers in int8; forward+backward: as train.py --compile, each block compiled), all with the
same weights, and calls them in turns, --calls calls of one model in a row (a sampler or a
training loop calls one model: the first call after a switch finds the caches holding another
model's weights), so that a drift hits all of them alike. Each
figure is the fastest call of --iters rounds (other jobs only ever add time), then the median
over --repeats processes; the old and new default outputs are compared bit for bit. The forward
part ends with the matmul floor, and so does the train part: the model's multiply-adds at this
CPU's measured fp32 matmul rate, the most an fp32 fast mode could gain.

train: `torchrun --nproc_per_node=2 train.py` (gloo on CPU; a launcher times train_step calls) on
generated 256px JPEGs through a small stand-in VAE (tests/tiny_vae.py: the Stable Diffusion
VAE's shape, 8 channels), DiT-S/2, global batch 8; steps/s over --steps after --warmup steps
(which also absorb --compile's compilation). Runs alternate (old, new, new --compile, old, ...)
and each variant's median over --repeats is reported.

heap: the eager forward as a sampling process makes it, with glibc's malloc as it comes and then
after fast.keep_freed_memory (sample.py's setting, which cannot be undone in a process), with the
page faults per call.

Each figure of forward and train comes twice: per wall-clock second, and per second of the
process's CPU time (all its threads; train: rank 0). On a machine shared with other jobs the wall
clock measures the neighbours as much as the code; CPU time counts the work this code does.
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

# Run in a fresh interpreter: argv[1] the old code folder, argv[2] the new one, argv[3] the kind
# of call (forward or forward_backward). Builds the old model, the new one and the new one in the
# fast mode (forward: also in the int8 mode) with the same weights, then times them in turns (the
# order rotating each round), so that a drift in the machine's speed hits all of them alike. A process makes one kind of call, as
# sample.py (forward only) or train.py does: a backward's large allocations would otherwise leave
# malloc's heap grown, sparing the forward the page faults it meets in a sampling process.
FORWARD_CHILD = r"""
import hashlib, importlib.util, json, sys, time
old_dir, new_dir, kind, model_name = sys.argv[1:5]
batch, rounds, calls = map(int, sys.argv[5:8])
sys.path.insert(0, new_dir)
import torch
torch.set_num_threads(1)  # one thread: the process CPU time is then the work done, whatever else runs
import fast
import models
spec = importlib.util.spec_from_file_location("old_models", f"{old_dir}/models.py")
old_models = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old_models)
torch.manual_seed(0)
new = models.create_model(model_name, input_size=32).eval()  # as sampling: no random label dropout
with torch.no_grad():  # the release's zero-initialised output layers would make every output 0
    for p in new.parameters():
        p.normal_(0, 0.02)
variants = {"old": old_models.create_model(model_name, input_size=32).eval(), "new": new,
            "new compiled": models.create_model(model_name, input_size=32).eval()}
if kind == "forward":  # sampling only: as sample.py --quantize int8 --compile
    variants["new int8 compiled"] = models.create_model(model_name, input_size=32).eval()
for model in variants.values():
    model.load_state_dict(new.state_dict())
x, t, y = torch.randn(batch, 4, 32, 32), torch.randint(0, 1000, (batch,)), torch.randint(0, 1000, (batch,))
def forward(model):
    with torch.no_grad():
        return model(x, t, y)
def forward_backward(model):
    loss = model(x, t, y).square().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.detach()
call = forward if kind == "forward" else forward_backward
outs = {name: call(model) for name, model in variants.items()}
start = time.perf_counter()
if kind == "forward":
    fast.compile_model(variants["new compiled"], inference=True)  # as sample.py --compile: frozen no-grad graph
    fast.compile_model(fast.quantize_model(variants["new int8 compiled"]), inference=True)
    outs["new int8 compiled"] = call(variants["new int8 compiled"])
else:
    fast.compile_model(variants["new compiled"], blocks_only=True)  # as train.py --compile
outs["new compiled"] = call(variants["new compiled"])
first = time.perf_counter() - start
times = {name: [] for name in variants}
for r in range(rounds):
    names = list(variants)
    for name in names[r % len(names):] + names[:r % len(names)]:
        for _ in range(calls):
            s, c = time.perf_counter(), time.process_time()
            call(variants[name])
            times[name].append((time.perf_counter() - s, time.process_time() - c))
sha = {name: hashlib.sha256(out.numpy().tobytes()).hexdigest()[:16] for name, out in outs.items()}
print(json.dumps({"times": times, "first_call": first, "same": sha["old"] == sha["new"],
                  "compiled_diff": (outs["new compiled"] - outs["new"]).abs().max().item(),
                  "scale": outs["new"].abs().max().item(),
                  "int8_rms": ((outs["new int8 compiled"] - outs["new"]).square().mean().sqrt()
                               / outs["new"].square().mean().sqrt()).item() if kind == "forward" else None}))
"""

# Run in a fresh interpreter (argv: the code folder, model, batch, calls): the eager forward's
# process CPU time and page faults per call, as a sampling process makes them, before and after
# fast.keep_freed_memory (sample.py's malloc setting; two calls to settle between).
HEAP_CHILD = r"""
import json, resource, sys, time
code, model_name, batch, calls = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, code)
import torch
torch.set_num_threads(1)
import fast, models
torch.manual_seed(0)
model = models.create_model(model_name, input_size=32).eval()
x, t, y = torch.randn(batch, 4, 32, 32), torch.randint(0, 1000, (batch,)), torch.randint(0, 1000, (batch,))
def measure(n):
    seconds, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        start = time.process_time()
        with torch.no_grad():
            model(x, t, y)
        seconds.append(time.process_time() - start)
    return min(seconds), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n
measure(1)
before = measure(calls)
fast.keep_freed_memory()
measure(2)
print(json.dumps({"default": before, "keep_freed_memory": measure(calls)}))
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


def run_child(source, *argv, what):
    """Run a *_CHILD script in a fresh interpreter; its last line of output, parsed as JSON."""
    result = subprocess.run([sys.executable, "-c", source, *map(str, argv)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: the {what} benchmark failed:\n{result.stderr[-3000:]}")
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
    per_rank = args.global_batch_size // args.nproc
    floor = matmul_floor(args.model, per_rank, passes=3, processes=args.nproc)
    print_floor(f"a step's forward+backward of {per_rank} images on rank 0 ({args.nproc} processes multiplying)",
                *floor, 1 / statistics.median(cpu["old"]))


def bench_forward(args, old, new):
    """Each figure: the fastest of --iters x --calls calls (other jobs only ever add time), then the median over
    --repeats processes; images/s by the wall clock and per CPU-second of the one thread."""
    print(f"\nmodel, {args.model} batch {args.batch_size} at 32x32x4, old / new / new compiled called in turns, "
          f"{args.calls} calls in a row, {args.iters} rounds in each of {args.repeats} processes per kind:", flush=True)
    for kind, fast in (("forward", "frozen whole model, as sample.py"), ("forward_backward", "blocks, as train.py")):
        runs = []
        for repeat in range(args.repeats):
            runs.append(run_child(FORWARD_CHILD, old, new, kind, args.model, args.batch_size, args.iters,
                                  args.calls, what=kind))
            print(f"  {kind} process {repeat}: compiling took {runs[-1]['first_call']:.0f}s", flush=True)
        for clock, label in ((0, "wall clock"), (1, "CPU time, one thread")):
            speed = {name: [args.batch_size / min(t[clock] for t in run["times"][name]) for run in runs]
                     for name in runs[0]["times"]}
            print(f"{kind}, images/s ({label}; new compiled: {fast}):")
            for name in speed:
                report(name, speed, "images/s", statistics.median(speed["old"]))
        what = "output" if kind == "forward" else "loss"
        print(f"new default {what} bit-identical to the old one: {all(run['same'] for run in runs)}; compiled vs "
              f"default: max |difference| {runs[0]['compiled_diff']:.2e} (values up to {runs[0]['scale']:.2f})")
        if kind == "forward":
            print(f"new int8 compiled (as sample.py --quantize int8 --compile) vs default: RMS difference "
                  f"{runs[0]['int8_rms']:.1%} of the output's RMS")
            old_forward = statistics.median(min(t[1] for t in run["times"]["old"]) for run in runs)
            print_floor(f"the forward of {args.batch_size} images", *matmul_floor(args.model, args.batch_size),
                        old_forward)


def bench_heap(args, new):
    """The eager forward in a sampling process with glibc's malloc as it comes and after sample.py's
    keep_freed_memory, in one process (malloc cannot be set back), median over --repeats processes."""
    print(f"\nsampling process, eager {args.model} forward at batch {args.batch_size}: malloc as it comes, then "
          f"fast.keep_freed_memory, {args.calls} calls each, {args.repeats} processes:", flush=True)
    runs = []
    for _ in range(args.repeats):
        runs.append(run_child(HEAP_CHILD, new, args.model, args.batch_size, args.calls, what="heap"))
    base = statistics.median(run["default"][0] for run in runs)
    for name in ("default", "keep_freed_memory"):
        seconds = statistics.median(run[name][0] for run in runs)
        faults = statistics.median(run[name][1] for run in runs)
        print(f"{name:>18}: median {args.batch_size / seconds:7.3f} images/s (CPU time)  ratio {base / seconds:5.2f}x  "
              f"{faults:8.0f} page faults per call", flush=True)


# Run in `processes` interpreters at once: each waits for the wall-clock time argv[3], so that all
# multiply together, then prints its fp32 matmul rate (GFLOP/s) on one thread on the MLP's shape
# (argv: rows, hidden): the fastest product of the next 3 seconds.
RATE_CHILD = r"""
import sys, time, torch
torch.set_num_threads(1)
rows, hidden, start = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
a, w = torch.randn(rows, hidden), torch.randn(hidden, 4 * hidden)
time.sleep(max(0.0, start - time.time()))
best = float("inf")
while time.time() < start + 3:
    begin = time.perf_counter()
    a @ w
    best = min(best, time.perf_counter() - begin)
print(2 * rows * hidden * 4 * hidden / best / 1e9)
"""


def matmul_floor(model, images, passes=1, processes=1):
    """(GFLOP, GFLOP/s, least seconds): the multiply-adds of `passes` x the forward of `images` images
    (backward: 2 more) at this CPU's fp32 matmul rate on one thread, on the MLP's shape, measured
    while `processes` processes multiply at once (as train.py's ranks do: the cores then share the
    memory system and the chip's power, and each multiplies more slowly than alone)."""
    from flops import params_and_gflops
    from models import model_args_for

    config = model_args_for(model, input_size=32)
    gflop = 2 * params_and_gflops(config)[1] * images * passes  # 2 per multiply-add
    rows = images * (32 // config["patch_size"]) ** 2
    start = str(time.time() + 5)  # after every child's import of torch
    children = [subprocess.Popen([sys.executable, "-c", RATE_CHILD, str(rows), str(config["hidden_size"]), start],
                                 stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    rate = statistics.mean(float(child.communicate()[0]) for child in children)
    return gflop, rate, gflop / rate


def print_floor(what, gflop, rate, floor, old_seconds):
    print(f"matmul floor: {what}: {gflop:.0f} GFLOP at this CPU's fp32 matmul rate ({rate:.0f} GFLOP/s per thread) "
          f"take at least {floor:.2f} s, the old code {old_seconds:.2f} s: an fp32 fast mode can reach at most "
          f"{old_seconds / floor:.2f}x, with all else free")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default="d4c8731", help="git revision of the old code")
    parser.add_argument("--what", default="forward,train,heap", help="comma-separated: forward, train, heap")
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="forward: batch")
    parser.add_argument("--iters", type=int, default=3, help="forward: rounds of timed calls per process")
    parser.add_argument("--calls", type=int, default=3, help="forward: calls of one model in a row in a round")
    parser.add_argument("--global-batch-size", type=int, default=8, help="train")
    parser.add_argument("--nproc", type=int, default=2, help="train: processes")
    parser.add_argument("--steps", type=int, default=5, help="train: timed steps per run")
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
    if "heap" in args.what:
        bench_heap(args, ROOT)
    print(f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
