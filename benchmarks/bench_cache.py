"""Block caching (--cache-interval, sampling.BlockCache) against sample quality and speed.

On the digits: a trained checkpoint (default: the demo's eps DiT-T/2) sampled with each sampler
and guidance scale at cache intervals 1 (no caching: the reference), 2, 3, ..., the same seeds
for every run (sample i's noise from (seed, i), as sample_ddp.py), scored with digits.DigitScorer
(accuracy and Frechet distance). Block evaluations are counted by forward hooks on the model's
blocks (measured, not derived from the interval), wall time with perf_counter. Prints a markdown
table with ratios to the uncached run, keeps the results in a JSON (reused when run again) and
draws the speed/quality figure.

DiT-T has four blocks on 16 tokens, so its wall time is mostly per-call overhead; --big times
the mechanism where block compute dominates: a random-weight DiT-S/2 on 32x32x4 latents (256
tokens), a few DDIM steps, guided.

    python benchmarks/bench_cache.py                                    # dpm-solver 25 and ddim 50
    python benchmarks/bench_cache.py --runs ddpm:250 --per-class 10     # the 250-step sampler, fewer samples
    python benchmarks/bench_cache.py --big                              # only the DiT-S/2 wall times
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cli  # noqa: E402
import digits  # noqa: E402
import sampling  # noqa: E402
from files import save_json  # noqa: E402
from models import create_model  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=os.path.join(ROOT, "results", "digits-eps", "0002000.pt"))
    parser.add_argument("--runs", nargs="+", default=["dpm-solver:25", "ddim:50"], help="SAMPLER:STEPS")
    parser.add_argument("--cfg", type=float, nargs="+", default=[4.0, 1.0])
    parser.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--cache-start", type=int, default=0)
    parser.add_argument("--cache-above", type=float, default=0.0)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "cache", "bench.json"))
    parser.add_argument("--figure", default=os.path.join(ROOT, "docs", "cache_speed_quality.png"))
    parser.add_argument("--big", action="store_true", help="only the wall-time figure on a random DiT-S/2")
    return parser.parse_args(argv)


def count_blocks(model):
    """A list whose length grows by one per block evaluation (forward hooks)."""
    calls = []
    for block in model.blocks:
        block.register_forward_hook(lambda *_: calls.append(1))
    return calls


def sample_digits(model, settings, sampler, labels, cfg_scale, seed):
    """(uint8 images for labels, sampling.Stats), seeded per sample as sample_ddp.py, in one batch."""
    generators = sampling.seeded_generators(seed, range(len(labels)))
    shape = (settings.in_channels, settings.latent_size, settings.latent_size)
    latents, stats = sampling.generate(model, sampler, labels, cfg_scale, sampling.draw(generators, shape),
                                       step_noise=lambda: sampling.draw(generators, shape))
    return cli.to_uint8(latents), stats


def score_runs(args, results):
    ckpt_args = argparse.Namespace(model=None, image_size=None, num_classes=None, vae=None, vae_path=None,
                                   ckpt=args.ckpt)
    model, settings = sampling.load_model(ckpt_args, torch.device("cpu"))
    calls = count_blocks(model)
    scorer = digits.DigitScorer()
    labels = np.repeat(np.arange(digits.NUM_CLASSES), args.per_class)
    for run in args.runs:
        name, steps = run.split(":")
        for cfg in args.cfg:
            for interval in args.intervals:
                key = (f"{name}:{steps} cfg {cfg} interval {interval} start {args.cache_start} above "
                       f"{args.cache_above:g} n {len(labels)}").replace(" above 0 n", " n")  # older keys: above 0
                if key in results:
                    continue
                sampler = sampling.make_sampler(name, int(steps), settings.diffusion_args, cache_interval=interval,
                                                cache_start=args.cache_start, cache_above=args.cache_above)
                calls.clear()
                start = time.perf_counter()
                images, stats = sample_digits(model, settings, sampler, labels.tolist(), cfg, args.seed)
                seconds = time.perf_counter() - start
                score = scorer.score(images, labels)
                results[key] = dict(sampler=name, steps=int(steps), cfg=cfg, interval=interval,
                                    start=args.cache_start, above=args.cache_above, samples=len(labels),
                                    nfe=stats.nfe,
                                    block_evals=len(calls), seconds=seconds, accuracy=score["accuracy"],
                                    frechet_distance=score["frechet_distance"])
                save_json(results, args.out)
                print(f"{key}: {results[key]}", file=sys.stderr, flush=True)
    return results


def table(results):
    """Markdown rows with ratios to the uncached run of the same sampler, guidance and sample count."""
    rows = ["| sampler | cfg | interval | start | above | block evals | fewer x | wall s | faster x | accuracy | d acc (pts) "
            "| FD | FD / uncached |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        base = reference(results, r)
        if base is None:
            continue
        rows.append(f"| {r['sampler']}-{r['steps']} | {r['cfg']:g} | {r['interval']} | {r['start']} | "
                    f"{r.get('above', 0):g} | {r['block_evals']} | "
                    f"{base['block_evals'] / r['block_evals']:.2f} | {r['seconds']:.1f} | "
                    f"{base['seconds'] / r['seconds']:.2f} | {r['accuracy']:.1%} | "
                    f"{100 * (r['accuracy'] - base['accuracy']):+.1f} | {r['frechet_distance']:.2f} | "
                    f"{r['frechet_distance'] / base['frechet_distance']:.2f} |")
    return "\n".join(rows)


def reference(results, r):
    return next((b for b in results.values() if b["interval"] == 1 and all(
        b[k] == r[k] for k in ("sampler", "steps", "cfg", "samples"))), None)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series = {}
    for r in results.values():
        base = reference(results, r)
        if base is not None:
            label = (f"{r['sampler']}-{r['steps']}, cfg {r['cfg']:g}, start {r['start']}, "
                     f"above {r.get('above', 0):g} ({r['samples']} samples)")
            series.setdefault(label, []).append((base["block_evals"] / r["block_evals"],
                                                 r["frechet_distance"] / base["frechet_distance"],
                                                 100 * (r["accuracy"] - base["accuracy"]), r["interval"]))
    for label, points in series.items():
        points = sorted(set(points) | {(1.0, 1.0, 0.0, 1)})  # the uncached reference opens every line
        speed, fd, acc, intervals = zip(*points)
        line, = axes[0].plot(speed, fd, "o-", label=label)
        axes[1].plot(speed, acc, "o-", color=line.get_color(), label=label)
        for x, y, n in zip(speed, fd, intervals):
            axes[0].annotate(str(n), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    axes[0].axhline(1.1, color="grey", ls="--", lw=0.8)
    axes[0].set(xlabel="fewer block evaluations (x, uncached = 1)", ylabel="Frechet distance / uncached",
                title="Frechet distance (labels: --cache-interval)")
    axes[1].axhline(-1, color="grey", ls="--", lw=0.8)
    axes[1].set(xlabel="fewer block evaluations (x, uncached = 1)", ylabel="accuracy - uncached (points)",
                title="accuracy")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.axvline(1.4, color="grey", ls=":", lw=0.8)
    fig.suptitle("Block caching on the digits (DiT-T/2, eps): dashed = the 10% / 1-point bounds, dotted = 1.4x")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


def big_model_wall_times(intervals, steps=10, batch=2, repeats=2):
    """Wall time of guided DDIM on a random DiT-S/2 at 32x32x4 latents for each interval (best of repeats)."""
    torch.manual_seed(0)
    model = create_model("DiT-S/2", input_size=32, num_classes=1000).eval()
    for p in model.parameters():  # random, not zero-initialised gates and outputs: every block does work
        p.data.normal_(0, 0.02)
    noise = torch.randn(batch, 4, 32, 32)
    calls = count_blocks(model)
    rows = []
    for interval in intervals:
        sampler = sampling.make_sampler("ddim", steps, cache_interval=interval)
        best = float("inf")
        for _ in range(repeats):
            calls.clear()
            start = time.perf_counter()
            sampling.generate(model, sampler, [1] * batch, 4.0, noise)
            best = min(best, time.perf_counter() - start)
        rows.append((interval, len(calls), best))
    print(f"DiT-S/2, 32x32x4 latents, guided DDIM-{steps}, batch {batch} (x2 for guidance), best of {repeats}:")
    print("| interval | block evals | fewer x | wall s | faster x |\n|---|---|---|---|---|")
    for interval, evals, seconds in rows:
        print(f"| {interval} | {evals} | {rows[0][1] / evals:.2f} | {seconds:.2f} | {rows[0][2] / seconds:.2f} |")


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.big:
        big_model_wall_times(args.intervals)
        return
    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    score_runs(args, results)
    print(table(results))
    plot(results, args.figure)
    print(f"figure: {args.figure}", file=sys.stderr)


if __name__ == "__main__":
    main()
