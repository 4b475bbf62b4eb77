"""The fast modes of a DiT, in place: --compile (torch.compile; train.py, sample.py, sample_ddp.py,
digits.py score) and, for sampling on CPU, --quantize int8. The default (uncompiled, fp32) model is
untouched by either; docs/speed.md has the figures."""
import ctypes
import warnings

import torch
import torch.nn as nn

from errors import UserError
from models import Mlp


def compile_model(model, inference=False, blocks_only=False, backend="inductor"):
    """The fast mode (--compile): the whole model through torch.compile, in place (calls of the
    model, forward_with_cfg's and DDP's included, run the compiled forward, and the state_dict
    keeps the release's names). The compiler fuses what the release runs as separate
    kernels (bias + GELU, LayerNorm + modulation, gate + residual, the attention's reshapes), and
    the GELU is computed through exp instead of tanh (Mlp.sigmoid_gelu).
    inference=True (sampling) on CPU also freezes the weights into the no-grad graph (Inductor's
    `freezing`: the linear layers' weights pre-packed for MKL's matmul, constants folded); the
    packed copies do not follow later changes, so only a model whose weights are final may be
    compiled so.
    blocks_only compiles each block instead (regional compilation: the blocks share one graph,
    compiled in a fraction of the whole model's time): train.py's choice, where it measured as
    fast as the whole model, and block caching's, whose Python-side choice of the blocks to run
    would make the whole-model graph recompile at every sampling step. Under DDP, Dynamo's DDP
    optimizer is turned off for the process: it would split each compiled block at DDP's bucket
    boundaries (a DiT-XL block into 3 graphs), while the blocks already give DDP its overlap.
    The default (uncompiled) model is untouched; compiled outputs match it to float32 rounding
    (tests/test_speed.py). backend: torch.compile's (tests count graphs with their own)."""
    for module in model.modules():
        if isinstance(module, Mlp):
            module.sigmoid_gelu = True
    if blocks_only:
        torch._dynamo.config.optimize_ddp = False
        for block in model.blocks:
            block.compile(backend=backend)
        return model
    if not (inference and next(model.parameters()).device.type == "cpu"):
        model.compile(backend=backend)
        return model
    compiled = torch.compile(model.forward, backend=backend)

    def frozen_forward(*args, **kwargs):
        # Dynamo reads `freezing` from the global config as it traces (torch.compile's options
        # reach only Inductor), so it is set around each call, and left as it was outside them.
        with torch._inductor.config.patch(freezing=True):
            return compiled(*args, **kwargs)

    model.forward = frozen_forward  # Module.__call__ (and so forward_with_cfg) runs it
    return model


def quantize_model(model):
    """The int8 mode for sampling on CPU (--quantize int8), in place: every nn.Linear becomes
    PyTorch's dynamically quantized Linear (fbgemm): int8 weights with a scale per output
    channel, the input quantized to int8 at each call from its own range, int32 sums. On an AVX2
    CPU its matmuls run about 1.7x fp32's rate; DiT-S/2's output moves by about 2% (RMS,
    relative), and the digits' accuracy and Frechet distance not measurably (docs/speed.md).
    The convolution, embeddings, norms and attention stay fp32. Inference only; apply before
    compile_model."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic  # optional: see check_quantize

    with warnings.catch_warnings():
        # PyTorch announces a move of eager-mode quantization to torchao; the kernels are its own.
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)


def check_quantize(quantize, device, precision):
    """--quantize int8 needs PyTorch's CPU int8 kernels, in fp32: refused otherwise, before loading."""
    if quantize == "none":
        return
    if torch.device(device).type != "cpu":
        raise UserError(f"--quantize {quantize} runs on CPU only (PyTorch's int8 kernels), not {device}; "
                        f"drop --quantize, or add --device cpu")
    if precision in ("bf16", "fp16"):
        raise UserError(f"--quantize {quantize} computes in fp32; drop --precision {precision}")
    try:
        from torch.ao import quantization  # noqa: F401  (announced to move to torchao)
    except ImportError:
        raise UserError(f"--quantize {quantize} needs torch.ao.quantization, which PyTorch {torch.__version__} "
                        f"does not have; drop --quantize, or use PyTorch 2.14 or older") from None


def keep_freed_memory():
    """Let glibc's malloc keep freed memory for the next call instead of handing it back to the
    kernel. By default it serves large blocks (a batch's activations) with fresh mmap'd pages and
    trims the heap's top, so each forward pass of a sampling process on CPU page-faults its
    activations in anew, the kernel zeroing every page: about 57,000 faults per eager DiT-S/2
    batch-8 forward, which runs 1.17x faster without them (benchmarks/bench_speed.py --what heap).
    The process keeps its peak memory instead. Changes no result; a no-op where the C library is
    not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h's parameter numbers
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, 1 << 30)
