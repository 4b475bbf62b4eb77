"""precision.py: autocast only for bf16/fp16, TF32 switched only on CUDA."""
import torch

import precision as precision_lib


def test_autocast_is_a_no_op_for_fp32_and_tf32():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    cpu = torch.device("cpu")
    for precision in ("fp32", "tf32"):
        with precision_lib.autocast(precision, cpu):
            assert not torch.is_autocast_enabled("cpu")
            assert (a @ b).dtype == torch.float32
    with precision_lib.autocast("bf16", cpu):
        assert (a @ b).dtype == torch.bfloat16  # the contrast: bf16 does cast


def test_set_tf32_leaves_cpu_runs_alone():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precision_lib.set_tf32("bf16" if not before[0] else "fp32", torch.device("cpu"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
