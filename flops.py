"""Parameters and Gflops of DiT configs and conditioning blocks, counted as the paper counts them.

The paper (Peebles & Xie, Table 4) counts one multiply-add as one flop, for one 256x256 image
(a 32x32x4 latent). torch's FlopCounterMode counts a multiply-add as two, so its total is
halved. The models are built on the meta device: nothing is allocated or computed, so even
DiT-XL/2 takes a second.

    python flops.py          # the paper's configs, every block
    python flops.py --models DiT-XL/2 --blocks adaLN-Zero,cross-attention
    python flops.py --models DiT-T/2 --image-size 8 --vae none --in-channels 1 --num-classes 10
"""
import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from cli import run
from errors import UserError
from models import BLOCKS, DiT, DiT_models, input_hw, model_args_for

# Table 4 of the paper (adaLN-Zero, 256x256): the reference the counts are checked against.
PAPER_GFLOPS = {"DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06, "DiT-B/2": 23.01, "DiT-L/2": 80.70,
                "DiT-XL/8": 7.39, "DiT-XL/4": 29.04, "DiT-XL/2": 118.62}


def params_and_gflops(model_args):
    """(parameters, Gflops of one forward pass of one image) of DiT(**model_args)."""
    with torch.device("meta"):
        model = DiT(**model_args).eval()
        x = torch.zeros(1, model.in_channels, *input_hw(model.config.input_size))
        t, y = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, t, y)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 2e9


def rows(names, blocks, input_size=32, in_channels=4, num_classes=1000):
    """One dict per (config, block): params, gflops and the change from the same config's adaLN-Zero."""
    paper_setting = (input_size, in_channels) == (32, 4)
    out = []
    for name in names:
        args = model_args_for(name, input_size=input_size, in_channels=in_channels, num_classes=num_classes)
        needed = dict.fromkeys(["adaLN-Zero", *blocks])  # the baseline first, each block once
        counts = {block: params_and_gflops({**args, "block": block}) for block in needed}
        for block in blocks:
            params, gflops = counts[block]
            out.append({"model": name, "block": block, "params": params, "gflops": gflops,
                        "vs_adaln_zero": gflops / counts["adaLN-Zero"][1] - 1,
                        "paper": PAPER_GFLOPS.get(name) if block == "adaLN-Zero" and paper_setting else None})
    return out


def markdown(table):
    lines = ["| model | block | parameters | Gflops | vs adaLN-Zero | paper |", "|---|---|---|---|---|---|"]
    for r in table:
        paper = f"{r['paper']:.2f}" if r["paper"] is not None else ""
        lines.append(f"| {r['model']} | {r['block']} | {r['params'] / 1e6:.2f}M | {r['gflops']:.2f} | "
                     f"{r['vs_adaln_zero']:+.1%} | {paper} |")
    return "\n".join(lines)


def split_names(text, allowed, what):
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise UserError(f"unknown {what} {bad[0] if bad else text!r}; choose from {', '.join(allowed)}")
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(PAPER_GFLOPS), help="comma-separated configs")
    parser.add_argument("--blocks", default=",".join(BLOCKS), help="comma-separated conditioning blocks")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--vae", choices=["sd", "none"], default="sd", help="sd: an 8x downsampled latent, 4 channels")
    parser.add_argument("--in-channels", type=int, default=3, help="with --vae none")
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    names = split_names(args.models, list(DiT_models), "model")
    blocks = split_names(args.blocks, BLOCKS, "block")
    latent = args.vae == "sd"
    print(markdown(rows(names, blocks, args.image_size // 8 if latent else args.image_size,
                        4 if latent else args.in_channels, args.num_classes)))


if __name__ == "__main__":
    run(main)
