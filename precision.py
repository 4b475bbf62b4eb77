"""Numerical precision of a run: --precision's choices, TF32 on CUDA, and autocast for bf16/fp16.
Every script's --precision means the same through these (cli.add_device_flags adds the flag)."""
import contextlib

import torch

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


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
