"""What the command-line scripts share: one-line errors instead of stack traces, precision
flags, and image conversion helpers."""
import contextlib
import sys

import torch

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line."""


def run(main):
    """Call main(); report user-facing errors as a single `error: ...` line and exit 2."""
    try:
        return main()
    except KeyboardInterrupt:
        sys.exit("interrupted")
    except (UserError, ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


def set_tf32(precision, device):
    """TF32 matmuls on CUDA unless fp32 is asked for (the original enables TF32)."""
    if device.type == "cuda":
        allow = precision != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow


def autocast(precision, device):
    """Autocast context for bf16/fp16; a no-op for fp32/tf32."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


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
