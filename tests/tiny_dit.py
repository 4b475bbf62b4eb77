"""A tiny named DiT config and train.py-style checkpoints of it, for sampling tests.

`register()` adds TINY_MODEL to the named configs (models.MODEL_SIZES, DiT_models) in this process. Scripts run in a
subprocess get it through this file as a launcher, which registers it and then runs the real
script unchanged as __main__:

    python tests/tiny_dit.py sample.py --ckpt tiny.pt ...
    torchrun --nproc_per_node=2 tests/tiny_dit.py sample_ddp.py --ckpt tiny.pt ...
"""
import os
import runpy
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import models  # noqa: E402

TINY_MODEL = "DiT-TestTiny/2"


def tiny(**kwargs):
    return models.DiT(depth=2, hidden_size=32, patch_size=2, num_heads=2, **kwargs)


def register():
    """Make DiT-TestTiny/2 a named config, as if it were in models.MODEL_SIZES."""
    models.MODEL_SIZES["TestTiny"] = (2, 32, 2)
    models.DiT_models[TINY_MODEL] = models._config(TINY_MODEL)


def random_state_dict(seed, **kwargs):
    """Weights with every layer non-zero (a fresh DiT outputs exactly zero: adaLN-Zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # the initial weights from the seed too, not from whatever ran before
        torch.manual_seed(seed)
        model = tiny(**kwargs)
    state_dict = model.state_dict()
    for name, value in state_dict.items():
        if name != "pos_embed":
            scale = 0.02 if name.startswith("final_layer.linear") else 0.2
            value.add_(scale * torch.randn(value.shape, generator=generator))
    return state_dict


def write_checkpoint(path, image_size, num_classes=10, vae="ema", in_channels=3, seed=0):
    """A train.py checkpoint: model and EMA weights differ so tests can tell which is used."""
    pixel = vae == "none"
    kwargs = dict(input_size=image_size if pixel else image_size // 8, num_classes=num_classes,
                  in_channels=in_channels if pixel else 4)
    args = {"model": TINY_MODEL, "image_size": image_size, "num_classes": num_classes, "vae": vae,
            "in_channels": in_channels if pixel else 4, "global_seed": 0}
    checkpoint = {"model": random_state_dict(seed + 1, **kwargs), "ema": random_state_dict(seed, **kwargs),
                  "opt": {}, "args": args, "train_steps": 10, "epoch": 1}
    torch.save(checkpoint, path)
    return checkpoint


if __name__ == "__main__":
    register()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
