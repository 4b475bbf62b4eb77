"""Fine-tuning with a class remap, measured on the built-in digits (docs/training.md).

    python benchmarks/finetune_digits.py                     # --steps 800 --finetune-steps 100
    python benchmarks/finetune_digits.py --steps 2000 --out /tmp/finetune

Trains DiT-T/2 on the ten digits (as demo.sh, on one process), then fine-tunes it with
`train.py --init-from` on a two-class folder holding only the 7s (new class 0) and the 3s (new
class 1), with --class-map {"0": 7, "1": 3}. Prints digits.py's classifier accuracy on samples of
the two new classes (read as the digits they were mapped from; DPM-Solver++ 25 steps, cfg 4 and
1) for the source model, the fine-tuned model at step 0 (the remapped class table alone) and after
fine-tuning. The source run resumes when repeated.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MAP = {0: 7, 1: 3}  # new class -> digit


def train(out, data, steps, *extra):
    cmd = [sys.executable, "train.py", "--vae", "none", "--in-channels", "1", "--image-size", "8", "--no-hflip",
           "--data-path", data, "--results-dir", out, "--global-batch-size", "128", "--max-steps", str(steps),
           "--lr", "2e-3", "--ema-decay", "0.995", "--log-every", "100", "--ckpt-every", "100000", "--device", "cpu",
           *extra]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return sorted(glob.glob(os.path.join(out, "*", "checkpoints", "*.pt")))[-1]  # the latest run's last


def accuracy(ckpt, labels, digits, per_class, cfg_scale, seed=0):
    import digits as digits_lib
    import sampling

    wanted = np.repeat(labels, per_class)
    images = sampling.generate_from_checkpoint(ckpt, wanted.tolist(), cfg_scale=cfg_scale, sampler="dpm-solver",
                                               num_sampling_steps=25, seed=seed)
    truth = np.repeat(digits, per_class)
    return digits_lib.DigitScorer().score(images, truth)["accuracy"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="finetune_out")
    parser.add_argument("--steps", type=int, default=800, help="training steps on all ten digits")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=100)
    args = parser.parse_args()
    import digits as digits_lib

    data, pair = os.path.join(args.out, "digits"), os.path.join(args.out, "sevens-and-threes")
    digits_lib.prepare(data)
    for new, digit in MAP.items():
        if not os.path.isdir(os.path.join(pair, str(new))):
            shutil.copytree(os.path.join(data, str(digit)), os.path.join(pair, str(new)))
    source = train(os.path.join(args.out, "source"), data, args.steps, "--model", "DiT-T/2", "--num-classes", "10",
                   "--resume", "auto")
    with open(os.path.join(args.out, "map.json"), "w") as f:
        json.dump({str(k): v for k, v in MAP.items()}, f)
    start = train(os.path.join(args.out, "start"), pair, 1, "--init-from", source, "--num-classes", "2",
                  "--class-map", os.path.join(args.out, "map.json"), "--lr", "1e-12")
    tuned = train(os.path.join(args.out, "tuned"), pair, args.finetune_steps, "--init-from", source,
                  "--num-classes", "2", "--class-map", os.path.join(args.out, "map.json"))
    labels, digits = list(MAP), list(MAP.values())
    for cfg in (4.0, 1.0):
        print(json.dumps({"cfg": cfg,
                          "source model, digits 7 and 3": accuracy(source, digits, digits, args.per_class, cfg),
                          "remapped, step 0": accuracy(start, labels, digits, args.per_class, cfg),
                          f"fine-tuned {args.finetune_steps} steps": accuracy(tuned, labels, digits, args.per_class,
                                                                                cfg)}))

if __name__ == "__main__":
    main()
