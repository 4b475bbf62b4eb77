"""What the command-line scripts share: one-line errors for the user's mistakes (tracebacks for
ours), the flags every script reads the same way, precision, and image conversion helpers."""
import argparse
import errno
import math
import sys

import torch

import models
import precision as precision_lib
from diffusion import samplers
from errors import UserError, first_line  # noqa: F401  (UserError re-exported: cli.UserError is how scripts name it)



# Environment errors whose message already says what is wrong; anything else is a bug to debug.
ENVIRONMENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
FULL_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def is_environment_error(error):
    """True for errors about the machine rather than our code: missing files, no permission,
    a full or read-only disk, GPU out of memory."""
    if isinstance(error, (UserError, *ENVIRONMENT_ERRORS)):
        return True
    if isinstance(error, OSError) and error.errno in FULL_DISK_ERRNOS:
        return True
    return isinstance(error, OUT_OF_MEMORY)


def run(main):
    """Call main(); report user and environment errors as one `error: ...` line (exit 2).
    Every other exception keeps its traceback: it is a bug, in our code or a modified model."""
    try:
        return main()
    except KeyboardInterrupt:
        sys.exit("interrupted")
    except Exception as e:
        if not is_environment_error(e):
            raise
        msg = first_line(e, limit=None)
        if isinstance(e, OUT_OF_MEMORY):
            msg = f"the GPU ran out of memory ({msg[:120]}); lower the batch size or use --precision bf16"
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


def to_uint8(images):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 numpy, converted as the original sample_ddp.py does."""
    images = torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def parse_class_labels(text, num_classes):
    """'207 360 387' or '207,360' -> list of ints, each checked against num_classes."""
    try:
        labels = [int(x) for x in str(text).replace(",", " ").split()]
    except ValueError:
        raise UserError(f"--class-labels {text!r} must be integers separated by spaces or commas") from None
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise UserError(f"class label {bad[0]} is out of range: labels must be in [0, {num_classes - 1}] "
                        f"for --num-classes {num_classes}")
    return labels


# ------------------------------------------------------------------ flags the scripts share
# Added once here so that a flag means the same in train.py, sample.py, sample_ddp.py and digits.py.
VAE_CHOICES = ("ema", "mse", "none")
# The samplers' names, from their table (diffusion/samplers.py, which also says which fit which objective).
SAMPLERS = tuple(samplers.SAMPLERS)


def model_flag_defaults():
    """train.py's model flags when neither given nor resumed: the paper's DiT-XL/2 on 1000 classes
    (RGB in pixel space), each variant at DiTConfig's default."""
    return {"model": "DiT-XL/2", "num_classes": 1000, "in_channels": 3,
            **{field.name: field.default for field in models.variant_fields()}}


def add_model_flags(parser, training):
    """The model's flags, all None when not given. Training: a resume takes the checkpoint's value,
    a fresh run model_flag_defaults(). Sampling: what the checkpoint records (else the released
    DiT-XL/2's settings)."""
    defaults = model_flag_defaults()

    def default(name):
        if training:
            return f" (default {defaults[name]}; a resume: the checkpoint's)"
        return " (default: the checkpoint's)"

    parser.add_argument("--model", choices=list(models.DiT_models), default=None,
                        help="DiT config" + (default("model") if training else " (default: the checkpoint's, else "
                                                                              "DiT-XL/2)"))
    parser.add_argument("--image-size", type=image_size, default=None, metavar="N|HxW",
                        help="image size in pixels, N (square) or HxW (height x width, e.g. 256x384): 256 or 512 "
                             "with the VAE (any multiple of 8), any multiple of the patch in pixel space"
                             + (" (default 256, the features', or a resume's)" if training else default("")))
    parser.add_argument("--num-classes", type=non_negative_int if training else positive_int, default=None,
                        help="class labels" + (" (0: an unconditional model)" if training else "")
                             + default("num_classes"))
    parser.add_argument("--vae", choices=VAE_CHOICES, default=None,
                        help="Stable Diffusion VAE (ema, mse) or none for pixel space"
                             + (" (default ema, or a resume's)" if training else default("")))
    parser.add_argument("--vae-path", default=None, help="a local diffusers AutoencoderKL folder instead of --vae")
    if training:
        parser.add_argument("--in-channels", type=int, choices=[1, 3], default=None,
                            help="pixel space only: 3 = RGB, 1 = greyscale" + default("in_channels"))
    for field in models.variant_fields():  # --block, --pos, ...: one per variant field of models.DiTConfig
        spec = field.metadata["flag"]
        kind = {"action": argparse.BooleanOptionalAction} if field.type is bool else {"type": field.type}
        if spec["choices"]:
            kind["choices"] = spec["choices"]
        parser.add_argument(models.flag_name(field.name), default=None, **kind, help=spec["help"] + default(field.name))


def model_variant_args(args):
    """The DiT arguments the variant flags give (those left at None are not given)."""
    names = (field.name for field in models.variant_fields())
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def add_sampler_flags(parser, cfg_scale, num_sampling_steps=250, sampler="ddpm"):
    """How samples are drawn: the sampler, its steps, classifier-free guidance. `sampler` and
    `num_sampling_steps` are this script's defaults (for eps and v checkpoints); a checkpoint
    whose objective the default sampler does not fit takes that objective's first sampler. Both
    flags default to None, meaning "the default for the checkpoint's objective", which
    sampling.make_sampler resolves (sampling.sampler_options passes the script's defaults along).
    The choices and their help come from the samplers' table (diffusion/samplers.py)."""
    table = samplers.SAMPLERS.values()
    by_objectives = {}
    for entry in table:
        by_objectives.setdefault(entry.objectives, []).append(f"{entry.name} ({entry.help})")
    parser.add_argument("--sampler", choices=list(samplers.SAMPLERS), default=None,
                        help="; ".join(f"{' and '.join(objectives)} checkpoints: {', '.join(names)}"
                                       for objectives, names in by_objectives.items())
                             + f". Default: {sampler} where it fits the checkpoint, else its objective's first")
    own_steps = ", ".join(f"{entry.name} {entry.steps if entry.steps is not None else num_sampling_steps}"
                          for entry in table if entry.steps != 0)
    adaptive = ", ".join(entry.name for entry in table if entry.steps == 0)
    parser.add_argument("--num-sampling-steps", type=positive_int, default=None,
                        help=f"default: {num_sampling_steps} for the default {sampler}; a --sampler given alone runs "
                             f"its own count: {own_steps}; {adaptive}: adaptive, takes no step count")
    parser.set_defaults(default_sampler=sampler, default_sampling_steps=num_sampling_steps)
    parser.add_argument("--cfg-scale", type=finite_float, default=cfg_scale,
                        help="classifier-free guidance scale; 1 = off")
    parser.add_argument("--cfg-all-channels", action="store_true",
                        help="guide all noise channels (the original guides the first three only)")
    parser.add_argument("--cfg-interval", type=finite_float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                        help="guide only at noise levels in [LOW, HIGH] (Kynkaanniemi et al. 2024), levels in "
                             "[0, 1]: t for flow, timestep/1000 for eps and v; elsewhere the conditional "
                             "prediction alone, at half the cost (default: guidance at every step)")
    parser.add_argument("--atol", type=finite_float, default=1e-6, help="dopri5: absolute tolerance")
    parser.add_argument("--rtol", type=finite_float, default=1e-3, help="dopri5: relative tolerance")
    parser.add_argument("--sde-diffusion", type=finite_float, default=1.0,
                        help="sde: the diffusion coefficient w(t) = VALUE * t (SiT's default form); 0 = euler")
    parser.add_argument("--cache-interval", type=positive_int, default=1, metavar="N",
                        help="faster sampling, training-free (sampling.BlockCache): every N-th model evaluation "
                             "runs all blocks and keeps the residual of those from --cache-start on; the others "
                             "reuse it and run only the earlier blocks (default 1: no caching)")
    parser.add_argument("--cache-start", type=non_negative_int, default=0, metavar="K",
                        help="with --cache-interval: blocks 0 .. K-1 run at every evaluation (default 0)")
    parser.add_argument("--cache-above", type=finite_float, default=0.0, metavar="LEVEL",
                        help="with --cache-interval: reuse only at noise levels of LEVEL and above (t for flow, "
                             "timestep/1000 for eps and v); the steps below run every block (default 0)")


def add_device_flags(parser, precision, compile=False, quantize=False):
    """--device and --precision; `precision` is the script's default (None: PyTorch's own settings).
    compile=True adds --compile, the model's fast mode (fast.compile_model); quantize=True adds
    --quantize, the sampling scripts' int8 mode on CPU (fast.quantize_model)."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", choices=precision_lib.PRECISIONS, default=precision,
                        help="fp32 | tf32 (TF32 matmuls on CUDA) | bf16 | fp16 (autocast); default "
                             + (precision or "PyTorch's own settings, as the original sample.py"))
    if compile:
        parser.add_argument("--compile", action="store_true",
                            help="fast mode: torch.compile the model (fast.compile_model; train.py: also fused "
                                 "AdamW); outputs match the default to float rounding; the first batch waits for the "
                                 "compiler")
    if quantize:
        parser.add_argument("--quantize", choices=("none", "int8"), default="none",
                            help="int8: the linear layers in int8 on CPU (fast.quantize_model; with --compile "
                                 "about 1.5x the default fp32 forward of DiT-S/2 on an AVX2 CPU); outputs move by "
                                 "about 2%%, so the samples differ slightly from fp32's (default none)")


def image_size(text):
    """--image-size: `N` (square) or `HxW`, height x width in pixels (`256x384` is 256 high, 384
    wide). An int for a square size, also written `NxN`, so square runs record exactly what they
    always did; else [H, W] (a list: it reads back from JSON unchanged)."""
    parts = str(text).strip().lower().split("x")
    try:
        sides = [int(part) for part in parts]
    except ValueError:
        sides = []
    if not 1 <= len(sides) <= 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not an image size; give N for a square (e.g. 256) or HxW, "
                                         f"height x width in pixels (e.g. 256x384)")
    if min(sides) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1{' on each side' if len(sides) == 2 else ''}, "
                                         f"got {text}")
    return size_value(sides[0], sides[-1])


def size_value(height, width):
    """The canonical image or latent size: an int when square, else [height, width]."""
    return int(height) if height == width else [int(height), int(width)]


def height_width(size):
    """(height, width) of a size given as an int (square) or a 2-item [height, width]."""
    if not isinstance(size, (list, tuple)):
        return int(size), int(size)
    height, width = size
    return int(height), int(width)


def size_text(size):
    """'256' for a square size, '256x384' (height x width) otherwise, as --image-size takes it."""
    height, width = height_width(size)
    return str(height) if height == width else f"{height}x{width}"


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value
