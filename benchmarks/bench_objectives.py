"""Training objectives against sampling cost: eps (the release's), v and flow, each trained on the
digits at the demo's budget (demo.sh: DiT-T/2 in pixel space, 8x8 grey, --no-hflip, lr 2e-3, EMA
0.995, batch 128, 2,000 steps on 2 processes, the same seed), then scored (digits.DigitScorer:
accuracy and Frechet distance, 50 samples per class) against the number of model evaluations
(NFE) of each objective's samplers, guided (cfg 4) and unguided (cfg 1):

    eps, v  ddim and dpm-solver at NFE 4 ... 64, and ddpm-250 as the reference point
    flow    euler (NFE = steps), heun (NFE = 2 x steps - 1), and dopri5 (adaptive) once

A guided evaluation (the doubled batch) counts as one. Writes the results (JSON, reused when
the script runs again), a markdown table on stdout, and a figure:

    python benchmarks/bench_objectives.py                          # all of it (about an hour on 2 cores)
    python benchmarks/bench_objectives.py --steps 200 --out /tmp/objectives200 --per-class 20   # a quick check
    python benchmarks/bench_objectives.py --wait-for /tmp/objectives_go   # start once that file exists
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import digits  # noqa: E402
import files  # noqa: E402
import sampling  # noqa: E402

DEMO_FLAGS = ["--model", "DiT-T/2", "--vae", "none", "--in-channels", "1", "--image-size", "8", "--num-classes", "10",
              "--no-hflip", "--global-batch-size", "128", "--lr", "2e-3", "--ema-decay", "0.995", "--log-every", "250",
              "--ckpt-every", "1000", "--keep-last", "1", "--cpu-threads", "1", "--resume", "auto"]
REFERENCE = ("ddpm", 250)  # the release's sampler, the point to match
# The runs this script knows: train.py flags by name (flow-logit-normal: SD3's t sampling).
RUNS = {"eps": ["--objective", "eps"], "v": ["--objective", "v"], "flow": ["--objective", "flow"],
        "flow-logit-normal": ["--objective", "flow", "--t-sampling", "logit-normal"]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps of each objective")
    parser.add_argument("--objectives", nargs="+", choices=list(RUNS), default=["eps", "v", "flow"])
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--cfg", type=float, nargs="+", default=[4.0, 1.0])
    parser.add_argument("--samplers", nargs="+", default=None,
                        help="score only these samplers, in this order (e.g. heun euler); default all of each objective's")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "digits"))
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "objectives"))
    parser.add_argument("--figure", default=os.path.join(ROOT, "docs", "objectives_nfe.png"))
    parser.add_argument("--wait-for", default=None, help="poll every 60 s (up to 90 min) until this file exists")
    return parser.parse_args(argv)


def wait_for(path, poll=60, limit=90 * 60):
    start = time.time()
    while not os.path.exists(path):
        if time.time() - start > limit:
            sys.exit(f"{path} did not appear within {limit // 60} minutes")
        time.sleep(poll)


def train(objective, args):
    """The demo's training run with --objective; resumes (or skips) a finished one. Returns the checkpoint."""
    results = os.path.join(args.out, f"{objective}-{args.steps}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *DEMO_FLAGS, "--data-path", args.data, "--results-dir", results, "--max-steps", str(args.steps),
           *RUNS[objective]]
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    print(f"{objective}: trained ({time.time() - start:.0f} s)", file=sys.stderr)
    return sorted(glob.glob(os.path.join(results, "*", "checkpoints", "[0-9]*.pt")))[-1]


def configs(objective, nfes):
    """(sampler, steps) pairs to score for an objective, the NFE each aims at."""
    if objective.startswith("flow"):
        return ([("euler", n) for n in nfes] + [("heun", (n + 1) // 2) for n in nfes] + [("dopri5", None)])
    return [("ddim", ddim_steps(n)) for n in nfes] + [("dpm-solver", n) for n in nfes] + [REFERENCE]


def ddim_steps(nfe):
    """The largest DDIM step count <= nfe that an integer stride over 1000 steps gives (64 -> 63)."""
    return max(n for n in range(1, nfe + 1) if any(len(range(0, 1000, s)) == n for s in range(1, 1000)))


def score(ckpt, name, steps, cfg, scorer, per_class):
    labels = np.repeat(np.arange(digits.NUM_CLASSES), per_class)
    start = time.perf_counter()
    images, sampler, stats = sampling.generate_from_checkpoint(ckpt, labels.tolist(), cfg_scale=cfg, sampler=name,
                                                               num_sampling_steps=steps, batch_size=500,
                                                               return_sampler=True)
    seconds = time.perf_counter() - start
    result = scorer.score(images, labels)
    return {"sampler": name, "steps": sampler.steps, "nfe": stats.nfe, "cfg": cfg, "accuracy": result["accuracy"],
            "fd": result["frechet_distance"], "seconds_per_image": seconds / len(labels)}


def run_all(args):
    path = os.path.join(args.out, f"results-{args.steps}-{args.per_class}.json")
    done = json.load(open(path)) if os.path.exists(path) else {}
    digits.prepare(args.data)
    scorer = digits.DigitScorer()
    for objective in args.objectives:
        ckpt = train(objective, args)
        chosen = [c for c in configs(objective, args.nfe) if not args.samplers or c[0] in args.samplers]
        for name, steps in sorted(chosen, key=lambda c: args.samplers.index(c[0]) if args.samplers else 0):
            for cfg in args.cfg:
                key = f"{objective}|{name}|{steps}|{cfg}"
                if key not in done:
                    result = {"objective": objective, **score(ckpt, name, steps, cfg, scorer, args.per_class)}
                    # Re-read before writing: several runs (one per objective) may share the file.
                    done = {**(json.load(open(path)) if os.path.exists(path) else {}), **done, key: result}
                    files.save_json(done, path)
                r = done[key]
                print(f"{objective:4s} {name:10s} nfe {r['nfe']:3d} cfg {cfg}: accuracy {r['accuracy']:.1%}, "
                      f"fd {r['fd']:.2f}", file=sys.stderr)
    return list(done.values())


def table(results):
    """Markdown: one row per objective and sampler, accuracy / FD at each NFE, per guidance scale."""
    lines = []
    for cfg in sorted({r["cfg"] for r in results}, reverse=True):
        rows = [r for r in results if r["cfg"] == cfg]
        lines += [f"\ncfg {cfg:g} (accuracy / Frechet distance; NFE in brackets where it differs from the column)\n",
                  "| objective | sampler | " + " | ".join(f"NFE {n}" for n in (4, 8, 16, 32, 64)) + " | other |",
                  "|---|---|" + "---|" * 6]
        for objective, name in dict.fromkeys((r["objective"], r["sampler"]) for r in rows):
            mine = sorted((r for r in rows if (r["objective"], r["sampler"]) == (objective, name)),
                          key=lambda r: r["nfe"])
            cells, other = [""] * 5, []
            for r in mine:
                text = f"{r['accuracy']:.1%} / {r['fd']:.2f}"
                column = next((i for i, n in enumerate((4, 8, 16, 32, 64)) if n - 1 <= r["nfe"] <= n), None)
                if column is None or name in ("dopri5", "ddpm"):
                    other.append(f"{text} (NFE {r['nfe']})")
                else:
                    cells[column] = text + ("" if r["nfe"] == (4, 8, 16, 32, 64)[column] else f" ({r['nfe']})")
            lines.append(f"| {objective} | {name} | " + " | ".join(cells) + f" | {'; '.join(other)} |")
    return "\n".join(lines)


def figure(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = sorted({r["cfg"] for r in results}, reverse=True)
    fig, axes = plt.subplots(len(cfgs), 2, figsize=(10, 3.6 * len(cfgs)), squeeze=False)
    colours = {"eps": "tab:blue", "v": "tab:orange", "flow": "tab:green", "flow-logit-normal": "tab:red"}
    styles = {"ddim": "--", "dpm-solver": "-", "euler": "--", "heun": "-"}
    for row, cfg in enumerate(cfgs):
        rows = [r for r in results if r["cfg"] == cfg]
        for col, (metric, label) in enumerate((("accuracy", "accuracy"), ("fd", "Frechet distance"))):
            ax = axes[row][col]
            for objective, name in dict.fromkeys((r["objective"], r["sampler"]) for r in rows):
                mine = sorted((r for r in rows if (r["objective"], r["sampler"]) == (objective, name)),
                              key=lambda r: r["nfe"])
                x, y = [r["nfe"] for r in mine], [r[metric] for r in mine]
                if name in styles:
                    ax.plot(x, y, styles[name], marker="o", color=colours[objective], label=f"{objective} {name}")
                elif name == "ddpm":
                    ax.axhline(y[0], color=colours[objective], linestyle=":", label=f"{objective} ddpm-250")
                else:
                    ax.plot(x, y, "*", markersize=12, color=colours[objective], label=f"{objective} {name}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("model evaluations per sample (NFE)")
            ax.set_ylabel(label)
            ax.set_title(f"{label}, cfg {cfg:g}")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    if args.wait_for:
        wait_for(args.wait_for)
    os.makedirs(args.out, exist_ok=True)
    results = run_all(args)
    print(table(results))
    figure(results, args.figure)
    print(f"figure: {args.figure}", file=sys.stderr)


if __name__ == "__main__":
    main()
