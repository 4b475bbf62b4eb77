"""Ablations in one command: train a set of variants on the same data, budget and seed, score
each along the way, and write a figure and a table (the paper's Figure 5, on your data).

    python ablate.py --vary block=adaLN-Zero,adaLN,cross-attention,in-context,mm-dit --steps 2000
    python ablate.py --vary model=DiT-T/2,DiT-T/4 --vary lr=1e-3,2e-3 --seeds 0,1 --out results/grid

Each --vary KEY=V1,V2,... sets the train.py flag --KEY (on/off for switches such as
grad-checkpointing or hflip); several --vary make a grid, --seeds repeats it with other
--global-seed values. Every other flag is passed to train.py unchanged; the defaults are the
demo's (DiT-T/2 on the built-in 8x8 digits in pixel space, batch 128, lr 2e-3, EMA 0.995).

Variants run one after another, each in OUT/runs/<variant>/ through train.py (torchrun with
--nproc processes, or plain python for --nproc 1), checkpointing --evals times. Each checkpoint
is scored with the digits quality figure (digits.py: classifier accuracy and Frechet distance of
--per-class samples per class), and FID is logged by train.py when --eval-ref is given.
Rerunning the command skips what is done: a finished variant (its final checkpoint exists) is
not retrained, scores are cached (a file per scoring setting), and an interrupted run resumes with
--resume auto. Written to OUT: ablation.png (loss and quality against training steps, one curve
per variant, averaged over seeds) and ablation.md (the final figures, parameters, Gflops at the
trained size, steps/s), both atomically, and ablation.json with every number.
"""
import argparse
import contextlib
import dataclasses
import glob
import io
import itertools
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys

import numpy as np

import checkpoint
import digits
import files
import sampling
import train
from checkpoint import load_train
from cli import SAMPLERS, run
from distributed import pick_device
from errors import UserError
from flops import params_and_gflops

ROOT = os.path.dirname(os.path.abspath(__file__))
DIGITS = "data/digits"
# The demo's training flags (demo.sh): what a variant uses unless the command line says otherwise.
DEMO_FLAGS = ["--model", "DiT-T/2", "--vae", "none", "--in-channels", "1", "--image-size", "8", "--num-classes",
              "10", "--no-hflip", "--global-batch-size", "128", "--lr", "2e-3", "--ema-decay", "0.995",
              "--cpu-threads", "1"]
# Set by ablate.py for every variant: giving them would break the resumption or the comparison.
MANAGED_FLAGS = ("--results-dir", "--max-steps", "--ckpt-every", "--keep-last", "--resume", "--global-seed",
                 "--data-path")


@dataclasses.dataclass
class Variant:
    name: str  # "block=adaLN, seed=0"
    flags: list  # the train.py flags that make it
    seed: int
    folder: str  # OUT/runs/<slug>: train.py's --results-dir

    @property
    def group(self):
        """The name without the seed: seeds of one variant are averaged."""
        return self.name.rsplit(", seed=", 1)[0]


# ------------------------------------------------------------------ flags
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other flags go to train.py (e.g. --model, --lr, --precision).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--vary", action="append", required=True, default=argparse.SUPPRESS, metavar="KEY=V1,V2",
                        help="a train.py flag and its values; repeat for a grid")
    parser.add_argument("--steps", type=positive_int, default=2000, help="training steps of every variant")
    parser.add_argument("--seeds", default="0", help="comma-separated --global-seed values, e.g. 0,1")
    parser.add_argument("--evals", type=positive_int, default=4, help="checkpoints scored per run (evenly spaced)")
    parser.add_argument("--out", default="results/ablation", help="output folder")
    parser.add_argument("--nproc", type=positive_int, default=2, help="training processes per variant (torchrun)")
    parser.add_argument("--data-path", default=DIGITS, help="image folder (data/digits: the built-in digits, "
                                                             "prepared on first use)")
    parser.add_argument("--score", choices=["digits", "none"], default="digits",
                        help="digits: accuracy and Frechet distance of the digit classifier (8x8 images, at most "
                             "10 classes); none: only the loss, and FID with --eval-ref")
    parser.add_argument("--per-class", type=positive_int, default=50, help="samples per class for the score")
    parser.add_argument("--cfg-scale", default="1,4", help="guidance scales of the scored samples, comma-separated "
                                                            "(1: none, as the paper's Figure 5; 4: the demo's)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="dpm-solver",
                        help="the scoring sampler; it must fit every variant's --objective")
    parser.add_argument("--num-sampling-steps", type=positive_int, default=25, help="the scoring sampler's steps")
    parser.add_argument("--eval-ref", default=None, help="reference .npz: train.py logs FID at each checkpoint")
    parser.add_argument("--device", default="auto", help="where the scoring samples are drawn")
    args, train_flags = parser.parse_known_args(argv)
    for flag in train_flags:
        if flag.split("=")[0] in MANAGED_FLAGS:
            raise UserError(f"{flag.split('=')[0]} is set by ablate.py for every variant; drop it (use --steps, "
                            f"--seeds, --out or ablate.py's --data-path)")
    return args, train_flags


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_vary(texts):
    """['block=a,b', 'lr=1,2'] -> [('block', ['a', 'b']), ('lr', ['1', '2'])]."""
    out = []
    for text in texts:
        key, _, values = text.partition("=")
        key = key.strip().lstrip("-").replace("_", "-")
        values = [v.strip() for v in values.split(",") if v.strip()]
        if not key or not values:
            raise UserError(f"--vary {text!r} must be KEY=V1,V2,... (e.g. --vary block=adaLN-Zero,adaLN)")
        if f"--{key}" in MANAGED_FLAGS:
            raise UserError(f"--vary {key} is not possible: ablate.py sets --{key} itself (use --seeds for seeds)")
        out.append((key, values))
    return out


def parse_cfg_scales(text):
    try:
        scales = [float(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        scales = []
    if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
        raise UserError(f"--cfg-scale {text!r} must be comma-separated positive numbers, e.g. 1,4")
    return scales


def parse_seeds(text):
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise UserError(f"--seeds {text!r} must be comma-separated integers, e.g. 0,1")
    return seeds


def flag_tokens(key, value):
    """train.py tokens for one varied value: on/off switch flags, else --KEY VALUE."""
    if value == "on":
        return [f"--{key}"]
    if value == "off":
        return [f"--no-{key}"] if train_accepts([f"--no-{key}"]) else []
    return [f"--{key}", value]


def make_variants(args):
    axes = parse_vary(args.vary)
    variants = []
    for seed in parse_seeds(args.seeds):
        for combo in itertools.product(*(values for _, values in axes)):
            pairs = [(key, value) for (key, _), value in zip(axes, combo)]
            name = ", ".join(f"{k}={v}" for k, v in pairs) + f", seed={seed}"
            flags = [token for k, v in pairs for token in flag_tokens(k, v)]
            slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", name.replace(", ", "__").replace("=", "-"))
            variants.append(Variant(name, flags, seed, os.path.join(args.out, "runs", slug)))
    return variants


# ------------------------------------------------------------------ training
def train_argv(args, train_flags, variant):
    """The variant's train.py flags: the demo's, the user's, the varied ones, then ablate.py's."""
    ckpt_every = math.ceil(args.steps / args.evals)
    eval_flags = ["--eval-every", str(ckpt_every), "--eval-ref", args.eval_ref] if args.eval_ref else []
    log_every = ["--log-every", str(max(1, args.steps // 40))]
    return [*DEMO_FLAGS, *log_every, *train_flags, *variant.flags, *eval_flags, "--data-path", args.data_path,
            "--results-dir", variant.folder, "--max-steps", str(args.steps), "--ckpt-every", str(ckpt_every),
            "--keep-last", "0", "--resume", "auto", "--global-seed", str(variant.seed)]


def train_accepts(argv):
    """Whether train.py's flags parse (argparse's message swallowed)."""
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            train.parse_args(argv)
        except SystemExit:
            return False
    return True


def check_variant(args, train_flags, variant):
    """train.py's own checks of the variant's flags, before any training starts; its resolved args."""

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parsed = train.check_args(train.parse_args(train_argv(args, train_flags, variant)))
            resolved = train.apply_checkpoint_settings(parsed, None)  # its model and process, as a fresh run's
    except SystemExit:
        message = stderr.getvalue().strip().splitlines()[-1:] or ["bad flags"]
        raise UserError(f"variant {variant.name}: {message[0].split('error: ')[-1]}") from None
    except UserError as e:
        raise UserError(f"variant {variant.name}: {e}") from None
    if args.score == "digits" and (resolved.image_size != 8 or resolved.num_classes > 10):
        raise UserError(f"variant {variant.name} trains {resolved.image_size}px images of {resolved.num_classes} "
                        f"classes; --score digits needs 8px and at most 10 classes: pass --score none")
    if args.score == "digits":
        check_scoring(args, variant, resolved)
    return resolved


def check_scoring(args, variant, resolved):
    """The scoring sampler's settings against the variant's process, before any training."""
    try:
        sampling.make_sampler(args.sampler, args.num_sampling_steps, resolved.diffusion_args)
    except UserError as e:
        raise UserError(f"variant {variant.name}, scoring: {e}") from None


def checkpoints(variant):
    """{step: path} of the variant's checkpoints, over its experiment folders (later ones win)."""
    paths = sorted(glob.glob(os.path.join(glob.escape(variant.folder), "*", "checkpoints", "[0-9]" * 7 + ".pt")))
    return {int(os.path.basename(p)[:-3]): p for p in paths}


def check_same_flags(variant, argv):
    """A variant folder belongs to one set of train.py flags (else a rerun would mix two experiments)."""
    path = os.path.join(variant.folder, "train_flags.json")
    ignored = ("--max-steps", "--ckpt-every", "--log-every")  # a longer budget continues the same run
    kept = [a for i, a in enumerate(argv) if a not in ignored and (i == 0 or argv[i - 1] not in ignored)]
    if os.path.isfile(path):
        with open(path) as f:
            before = json.load(f)
        if before != kept:
            raise UserError(f"{variant.folder} holds variant {variant.name} trained with other flags "
                            f"({shlex.join(before)}); pass another --out for the new settings")
    else:
        files.save_json(kept, path)


def train_variant(args, train_flags, variant):
    """Run train.py for the variant unless its final checkpoint exists (it resumes if interrupted)."""
    if args.steps in checkpoints(variant):
        print(f"[{variant.name}] trained ({args.steps} steps): not retrained")
        return
    argv = train_argv(args, train_flags, variant)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"] \
        if args.nproc > 1 else [sys.executable]
    command = [*launcher, os.path.join(ROOT, "train.py"), *argv]
    output = os.path.join(variant.folder, "train.out")
    print(f"[{variant.name}] training {args.steps} steps; output in {output}", flush=True)
    with open(output, "a") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if done.returncode != 0:
        with open(output) as f:
            last = ([line.strip() for line in f if line.strip()] or [""])[-1][:300]
        raise UserError(f"training variant {variant.name} failed ({last}); see {output}, fix, then rerun the "
                        f"same command to resume")


# ------------------------------------------------------------------ scoring
def score_settings(args, cfg_scale):
    return {"per_class": args.per_class, "cfg_scale": cfg_scale, "sampler": args.sampler,
            "num_sampling_steps": args.num_sampling_steps}


def score_variant(args, variant, scorer, cfg_scale):
    """{step: digit scores} of every checkpoint at one guidance scale, cached in a file per scoring setting."""
    settings = score_settings(args, cfg_scale)
    path = os.path.join(variant.folder, "scores-cfg{cfg_scale:g}-{sampler}{num_sampling_steps}-{per_class}.json"
                        .format(**settings))
    scores = {}
    if os.path.isfile(path):
        with open(path) as f:
            scores = json.load(f)["steps"]
    for step, ckpt in sorted(checkpoints(variant).items()):
        if str(step) in scores:
            continue
        labels = np.repeat(np.arange(checkpoint.load(ckpt).model_args["num_classes"]), args.per_class)
        images = sampling.generate_from_checkpoint(
            ckpt, labels.tolist(), cfg_scale=cfg_scale, sampler=args.sampler,
            num_sampling_steps=args.num_sampling_steps, seed=0, device=pick_device(args.device))
        result = scorer().score(images, labels)
        scores[str(step)] = {k: result[k] for k in ("accuracy", "frechet_distance")}
        files.save_json({"settings": settings, "steps": scores}, path)
        print(f"[{variant.name}] step {step}, guidance {cfg_scale:g}: accuracy {result['accuracy']:.1%}, "
              f"Frechet distance {result['frechet_distance']:.2f}", flush=True)
    return {int(step): value for step, value in sorted(scores.items(), key=lambda item: int(item[0]))}


def lazy_scorer():
    """The digit classifier, fitted on first use only (a rerun with every score cached skips it)."""
    fitted = []

    def get():
        if not fitted:
            from digits import DigitScorer

            fitted.append(DigitScorer())
        return fitted[0]
    return get


# ------------------------------------------------------------------ results
def read_metrics(variant):
    """The records of metrics.jsonl of the variant's latest experiment folder."""
    found = sorted(glob.glob(os.path.join(glob.escape(variant.folder), "*", "metrics.jsonl")))
    if not found:
        return []
    with open(found[-1]) as f:
        return [json.loads(line) for line in f if line.strip()]


def collect(args, variant, scores):
    """Everything the figure and table show of one variant; scores: {cfg_scale: {step: digit scores}}."""
    records = read_metrics(variant)
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    speeds = [r["steps_per_sec"] for r in records if "steps_per_sec" in r]
    final_ckpt = load_train(checkpoints(variant)[args.steps])
    params, gflops = params_and_gflops(final_ckpt["model_args"])
    tail = [loss for _, loss in losses[-max(1, len(losses) // 10):]]
    return {"name": variant.name, "group": variant.group, "seed": variant.seed, "params": params, "gflops": gflops,
            "steps_per_sec": statistics.median(speeds) if speeds else None,
            "final_loss": statistics.mean(tail) if tail else None, "loss": losses,
            "fid": [(r["step"], r["fid"]) for r in records if "fid" in r],
            "scores": scores}


def final(result, key, cfg_scale=None):
    """The last value of a curve: a score at the final step (at one guidance scale), or the FID."""
    if key == "fid":
        return result["fid"][-1][1] if result["fid"] else None
    scores = result["scores"].get(cfg_scale, {})
    return scores[max(scores)][key] if scores else None


def grouped(results):
    groups = {}
    for result in results:
        groups.setdefault(result["group"], []).append(result)
    return groups


def mean_curve(curves):
    """(steps, mean, low, high) over the seeds' curves [(step, value), ...], on the steps all of them have."""
    common = sorted(set.intersection(*(set(step for step, _ in curve) for curve in curves)))
    values = np.array([[dict(curve)[step] for step in common] for curve in curves], dtype=float).reshape(
        len(curves), len(common))
    return common, values.mean(0), values.min(0), values.max(0)


def score_curve(key, cfg_scale, factor=1):
    """A result's curve [(step, value)] of one score at one guidance scale."""
    return lambda result: [(step, factor * v[key]) for step, v in result["scores"][cfg_scale].items()]


def panels(results):
    """(title, curve of a result, log scale) for each panel that has data."""
    out = [("training loss", lambda r: r["loss"], False)]
    for cfg in results[0]["scores"]:
        out.append((f"digit accuracy (%), guidance {cfg:g}", score_curve("accuracy", cfg, 100), False))
        out.append((f"Frechet distance, guidance {cfg:g}", score_curve("frechet_distance", cfg), True))
    if any(r["fid"] for r in results):
        out.append(("FID", lambda r: r["fid"], True))
    return out


def plot(results, path):
    """One panel per measure against training steps, one curve per variant (mean, min-max over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    shown = panels(results)
    columns = min(3, len(shown))
    rows = math.ceil(len(shown) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False)
    for ax, (title, curve_of, log) in zip(axes.flat, shown):
        for group, members in grouped(results).items():
            steps, mean, low, high = mean_curve([curve_of(m) for m in members])
            line, = ax.plot(steps, mean, label=group, marker="o" if len(steps) <= 12 else None, markersize=3)
            if len(members) > 1:
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        ax.set(title=title, xlabel="training steps")
        if log:  # ticks at 1, 2, 5 x 10^k, written as plain numbers
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
    zoom_past_start(axes.flat[0], [r["loss"] for r in results])
    axes.flat[0].legend(fontsize=8)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def zoom_past_start(ax, curves):
    """y limits of the curves past their first tenth: the first losses would squash the rest flat."""
    last = max((step for curve in curves for step, _ in curve), default=0)
    values = [value for curve in curves for step, value in curve if step > last / 10]
    if values:
        spread = max(values) - min(values)
        ax.set_ylim(min(values) - 0.05 * spread, max(values) + 0.05 * spread)


def cell(values, fmt):
    """'mean' for one seed, 'mean (a, b)' for several; empty when unknown."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    text = fmt(statistics.mean(values))
    return text if len(values) == 1 else f"{text} ({', '.join(fmt(v) for v in values)})"


def table(results):
    cfg_scales, fid = list(results[0]["scores"]), any(r["fid"] for r in results)
    header = ["variant", "parameters", "Gflops", "steps/s", "final loss"] + \
        [f"{name}, guidance {cfg:g}" for cfg in cfg_scales for name in ("accuracy", "Frechet distance")] + \
        (["FID"] if fid else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, members in grouped(results).items():
        row = [group, f"{members[0]['params'] / 1e6:.2f}M", f"{members[0]['gflops']:.4g}",
               cell([m["steps_per_sec"] for m in members], lambda v: f"{v:.2f}"),
               cell([m["final_loss"] for m in members], lambda v: f"{v:.4f}")]
        for cfg in cfg_scales:
            row.append(cell([final(m, "accuracy", cfg) for m in members], lambda v: f"{v:.1%}"))
            row.append(cell([final(m, "frechet_distance", cfg) for m in members], lambda v: f"{v:.2f}"))
        if fid:
            row.append(cell([final(m, "fid") for m in members], lambda v: f"{v:.2f}"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(args, argv, train_flags, results):
    seeds = sorted({r["seed"] for r in results})
    text = [f"# Ablation: {', '.join(args.vary)}", "",
            f"Command: `{shlex.join(['python', 'ablate.py', *argv])}`", "",
            f"Each variant: {args.steps} steps of train.py with `{shlex.join([*DEMO_FLAGS, *train_flags])}` "
            f"(the varied flag replacing its default), data {args.data_path}, seeds {', '.join(map(str, seeds))}.",
            f"Scores at the last step: {args.per_class} samples per class, {args.sampler} "
            f"{args.num_sampling_steps} steps; several seeds: mean (each seed). "
            f"Gflops: one forward pass of one image at the trained size (multiply-add = 1 flop). Final loss: "
            f"the mean of the last tenth of the logged losses.", "", table(results), ""]
    with files.atomic_path(os.path.join(args.out, "ablation.md")) as tmp, open(tmp, "w") as f:
        f.write("\n".join(text))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args, train_flags = parse_args(argv)
    variants, cfg_scales = make_variants(args), parse_cfg_scales(args.cfg_scale)
    if len({v.folder for v in variants}) < len(variants):
        raise UserError("--vary lists the same value twice; give each value once")
    if args.score == "digits":
        pick_device(args.device)  # the scoring device exists: one line now, not after the first training
    for variant in variants:  # everything checked before the first run starts (and before any file is written)
        check_variant(args, train_flags, variant)
    for variant in variants:
        check_same_flags(variant, train_argv(args, train_flags, variant))
    if args.data_path == DIGITS:

        digits.prepare(DIGITS)
    elif not os.path.isdir(args.data_path):
        raise UserError(f"--data-path {args.data_path!r} is not a folder; pass an image folder with one sub-folder "
                        f"per class, or leave it out for the built-in digits")
    scorer, results = lazy_scorer(), []
    for variant in variants:
        train_variant(args, train_flags, variant)
        scores = {cfg: score_variant(args, variant, scorer, cfg) for cfg in cfg_scales} \
            if args.score == "digits" else {}
        results.append(collect(args, variant, scores))
    files.save_json(results, os.path.join(args.out, "ablation.json"))
    plot(results, os.path.join(args.out, "ablation.png"))
    write_report(args, argv, train_flags, results)
    print(table(results))
    print(f"wrote {os.path.join(args.out, 'ablation.png')} and {os.path.join(args.out, 'ablation.md')}")
    return results


if __name__ == "__main__":
    run(main)
