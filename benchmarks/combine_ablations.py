"""One figure and table from several ablate.py output folders (ablate.py varies one flag at a time; a
variant that changes several flags is a second command): each folder's variants, renamed if asked.

    python benchmarks/combine_ablations.py results/ablation_pos results/ablation_modern_block \
        --rename "results/ablation_modern_block:pos=rope->pos=rope + qk-norm, swiglu, rmsnorm" --out docs/ablation_modern.png
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ablate  # noqa: E402
from cli import UserError, run  # noqa: E402


def load(folder):
    """ablate.py's results of a folder, with the JSON's string keys turned back into numbers."""
    path = os.path.join(folder, "ablation.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: run ablate.py with --out {folder} first")
    with open(path) as f:
        results = json.load(f)
    for r in results:
        r["scores"] = {float(cfg): {int(step): v for step, v in steps.items()} for cfg, steps in r["scores"].items()}
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--rename", action="append", default=[], metavar="FOLDER:OLD->NEW",
                        help="show FOLDER's variant OLD (its name without the seed) as NEW")
    parser.add_argument("--out", required=True, help="the figure (.png); the table is printed")
    args = parser.parse_args()
    renames = {}
    for text in args.rename:
        folder, _, names = text.partition(":")
        old, _, new = names.partition("->")
        if not old or not new:
            raise UserError(f"--rename {text!r} must be FOLDER:OLD->NEW")
        renames[(os.path.normpath(folder), old)] = new
    results = []
    for folder in args.folders:
        for r in load(folder):
            for (where, old), new in renames.items():
                if where == os.path.normpath(folder) and r["group"] == old:
                    r["name"] = new + r["name"][len(old):]
                    r["group"] = new
            results.append(r)
    ablate.plot(results, args.out)
    print(ablate.table(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run(main)
