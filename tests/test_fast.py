"""fast.py: the fast paths give the default path's results: the compiled model (--compile; whole,
frozen for sampling, or block by block for block caching, also under DDP), the sigmoid GELU, and
int8 quantization (--quantize) within its tolerance.

Tolerance of the compiled model: the compiler fuses and reorders float32 arithmetic (e.g. the
LayerNorm), and the fast mode writes the GELU through exp instead of tanh, so outputs and
gradients agree to rtol 1e-4 with an absolute tolerance of 1e-5 times the largest magnitude, as
the golden files ask across CPUs.

Tolerance of the int8 mode: it rounds every linear layer's input and weights to 255 levels, so it
is an approximation, not a rounding difference. On the test's random model (weights of about
1/sqrt(fan-in), like a trained one's) the output's RMS difference from the default measured 6%
of the output's RMS, 9% guided at scale 4 (which amplifies the conditional-unconditional
difference); the test allows 10% and 15%. DiT-S/2 measured 2.3%, and the digits demo's accuracy and
Frechet distance did not move (docs/speed.md).
"""

import argparse
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import cli
import models
import sampling
import train
from conftest import MODEL, ROOT, assert_close_to_golden, random_model
from fast import check_quantize, compile_model, quantize_model
from tiny_dit import tiny


def inputs():
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10])
    return x, t, y, torch.tensor([0, 1, 0, 0])  # label dropout fixed: training mode would draw it at random


def assert_same_gradients(fast, eager, x, t, y, drop):
    assert_close_to_golden(fast(x, t, y, force_drop_ids=drop), eager(x, t, y, force_drop_ids=drop))
    for model in (eager, fast):
        model(x, t, y, force_drop_ids=drop).square().mean().backward()
    for (name, p), q in zip(eager.named_parameters(), fast.parameters()):
        if p.grad is not None:
            assert_close_to_golden(q.grad, p.grad)


@pytest.mark.slow
def test_compiled_model_matches_the_default_forward_and_gradients():
    x, t, y, drop = inputs()
    eager, fast = random_model(), compile_model(random_model())
    assert_same_gradients(fast, eager, x, t, y, drop)
    assert fast.state_dict().keys() == eager.state_dict().keys()  # checkpoints keep the release's names
    blocks = compile_model(random_model(), blocks_only=True)
    assert_same_gradients(blocks, random_model(), x, t, y, drop)


@pytest.mark.slow
def test_frozen_inference_model_matches_the_default_with_guidance():
    """Sampling's fast mode: the weights frozen into the graph (pre-packed for MKL), called through forward_with_cfg."""
    x, t, y, _ = inputs()
    eager = random_model().eval()
    fast = compile_model(random_model().eval(), inference=True)
    with torch.no_grad():
        assert_close_to_golden(fast(x, t, y), eager(x, t, y))
        assert_close_to_golden(fast.forward_with_cfg(x, t, y, 4.0), eager.forward_with_cfg(x, t, y, 4.0))
    assert not torch._inductor.config.freezing  # set only around the calls


def test_sigmoid_gelu_matches_the_tanh_gelu_and_its_gradient():
    """The fast mode's GELU, x * sigmoid(2u), is the release's 0.5 x (1 + tanh(u)) to float32 rounding,
    on values out to where it saturates."""
    torch.manual_seed(0)
    mlp = models.Mlp(16, 64)
    x = (torch.randn(32, 16) * 4).requires_grad_()
    grads = []
    for sigmoid_gelu in (False, True):
        mlp.sigmoid_gelu = sigmoid_gelu
        out = mlp(x)
        grads.append(torch.autograd.grad(out.square().sum(), x)[0])
        if not sigmoid_gelu:
            expected = out
    assert_close_to_golden(out, expected)
    assert_close_to_golden(grads[1], grads[0])


def test_compile_model_compiles_the_model_or_only_its_blocks():
    whole = compile_model(tiny(input_size=8, in_channels=4, num_classes=10))
    assert whole._compiled_call_impl is not None and whole.blocks[0]._compiled_call_impl is None
    assert all(block.mlp.sigmoid_gelu for block in whole.blocks)
    assert not models.Mlp.sigmoid_gelu  # the default path keeps the release's tanh-GELU
    blocks = compile_model(tiny(input_size=8, in_channels=4, num_classes=10), blocks_only=True)
    assert all(block._compiled_call_impl is not None for block in blocks.blocks)
    assert blocks._compiled_call_impl is None and blocks.final_layer._compiled_call_impl is None


def test_sampling_scripts_take_compile(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    torch.save(random_model().state_dict(), ckpt)
    base = dict(ckpt=str(ckpt), model=MODEL, image_size=8, num_classes=10, vae="none", vae_path=None, block=None,
                context_tokens=None)
    plain, _ = sampling.load_model(argparse.Namespace(**base), torch.device("cpu"))
    fast, _ = sampling.load_model(argparse.Namespace(**base, compile=True), torch.device("cpu"))
    cached, _ = sampling.load_model(argparse.Namespace(**base, compile=True, cache_interval=2), torch.device("cpu"))
    assert plain.forward == plain.__class__.forward.__get__(plain) and "frozen" in fast.forward.__name__
    assert cached._compiled_call_impl is None and "frozen" not in cached.forward.__name__
    assert cached.blocks[0]._compiled_call_impl is not None
    import sample
    import sample_ddp

    for script in (sample, sample_ddp, train):
        assert script.parse_args(["--compile"]).compile and not script.parse_args([]).compile, script.__name__


def rms_error(actual, expected):
    return ((actual - expected).square().mean().sqrt() / expected.square().mean().sqrt()).item()


def test_int8_mode_stays_within_its_tolerance():
    """--quantize int8: every Linear quantized (the convolution, embeddings and norms stay fp32), and the
    outputs near the default's but not equal to them."""
    x, t, y, _ = inputs()
    eager, int8 = random_model().eval(), quantize_model(random_model().eval())
    linears = [name for name, module in eager.named_modules() if type(module) is nn.Linear]
    assert linears and all(isinstance(int8.get_submodule(name), torch.ao.nn.quantized.dynamic.Linear)
                           for name in linears)
    assert int8.x_embedder.proj.weight.dtype == int8.y_embedder.embedding_table.weight.dtype == torch.float32
    with torch.no_grad():
        for call, tolerance in ((lambda model: model(x, t, y), 0.10),
                                (lambda model: model.forward_with_cfg(x, t, y, 4.0), 0.15)):
            assert 0 < rms_error(call(int8), call(eager)) < tolerance


@pytest.mark.slow
def test_int8_mode_compiles():
    """--quantize int8 --compile: the frozen graph calls the same int8 kernels (an input rounded to the next
    int8 level here and there is all that may differ)."""
    x, t, y, _ = inputs()
    int8 = quantize_model(random_model().eval())
    fast = compile_model(quantize_model(random_model().eval()), inference=True)
    with torch.no_grad():
        assert rms_error(fast.forward_with_cfg(x, t, y, 4.0), int8.forward_with_cfg(x, t, y, 4.0)) < 0.01


def test_sampling_scripts_take_quantize(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    torch.save(random_model().state_dict(), ckpt)
    base = dict(ckpt=str(ckpt), model=MODEL, image_size=8, num_classes=10, vae="none", vae_path=None, block=None,
                context_tokens=None, quantize="int8")
    int8, _ = sampling.load_model(argparse.Namespace(**base), torch.device("cpu"))
    fast, _ = sampling.load_model(argparse.Namespace(**base, compile=True), torch.device("cpu"))
    cached, _ = sampling.load_model(argparse.Namespace(**base, compile=True, cache_interval=2), torch.device("cpu"))
    for model in (int8, fast, cached):
        assert isinstance(model.blocks[0].attn.qkv, torch.ao.nn.quantized.dynamic.Linear)
    assert "frozen" in fast.forward.__name__ and cached.blocks[0]._compiled_call_impl is not None
    import sample
    import sample_ddp

    for script in (sample, sample_ddp):
        assert script.parse_args(["--quantize", "int8"]).quantize == "int8", script.__name__
        assert script.parse_args([]).quantize == "none", script.__name__
    assert not hasattr(train.parse_args([]), "quantize")  # inference only
    seen = {}
    monkeypatch.setattr(sampling, "generate_from_checkpoint", lambda ckpt, labels, **kwargs: seen.update(kwargs))
    import digits

    with pytest.raises(TypeError):  # the stub returns nothing to score
        digits.main(["score", "--ckpt", str(ckpt), "--quantize", "int8", "--compile"])
    assert seen["quantize"] == "int8" and seen["compile"]


@pytest.mark.parametrize("device, precision, message", [("cuda", None, "CPU only"),
                                                        ("cpu", "bf16", "drop --precision bf16"),
                                                        ("cpu", "fp16", "drop --precision fp16")])
def test_int8_mode_refuses_what_it_cannot_run(device, precision, message):
    with pytest.raises(cli.UserError, match=message):
        check_quantize("int8", device, precision)
    check_quantize("none", device, precision)  # the default asks nothing


def test_regionally_compiled_blocks_stay_one_graph_under_ddp(tmp_path):
    """train.py --compile compiles each block (compile_model blocks_only) before DDP wraps the model.
    Dynamo's DDP optimizer would split a block's graph at every bucket boundary (3 graphs for this
    12 MB block at 5 MB buckets); compile_model turns it off, so the block stays one graph. Counted
    with a backend that records the graphs it is given (a one-rank gloo group stands in for the ranks)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    before = torch._dynamo.config.optimize_ddp
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.DiT(input_size=4, patch_size=2, hidden_size=512, depth=2, num_heads=8, num_classes=5)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        compile_model(model, blocks_only=True, backend=counting_backend)
        ddp = DDP(model, bucket_cap_mb=5)
        ddp(torch.randn(2, 4, 4, 4), torch.tensor([1, 500]), torch.tensor([0, 1])).square().mean().backward()
    finally:
        dist.destroy_process_group()
        torch._dynamo.config.optimize_ddp = before
        torch._dynamo.reset()
    assert len(graphs) == 1  # both blocks run the one graph: no split, no recompilation


# The page faults of the last 3 of 20 64 MB tensors, each filled and freed, with glibc's malloc as
# it comes or (argv[2] == "keep") after keep_freed_memory; malloc settles on reusing the freed
# block after a few of them.
HEAP_CHILD = r"""
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
import fast
if sys.argv[2] == "keep":
    fast.keep_freed_memory()
for cycle in range(20):
    if cycle == 17:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2**20).fill_(1.0)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 3)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_stops_the_page_faults_of_large_tensors():
    """sample.py's malloc setting: a large tensor freed and allocated again reuses its pages (by default
    glibc maps and faults in fresh ones: 16,384 four-KiB pages per 64 MB)."""
    faults = {mode: float(subprocess.run([sys.executable, "-c", HEAP_CHILD, str(ROOT), mode], capture_output=True,
                                         text=True, check=True).stdout) for mode in ("default", "keep")}
    assert faults["keep"] < faults["default"] / 4 and faults["keep"] < 1000, faults
