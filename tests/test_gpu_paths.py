"""Issue 26's CUDA paths, checked on CPU (docs/gpu.md lists them): one download per machine under
torchrun (2 gloo processes, a loopback server), the process group's timeout and barrier, a CPU
checkpoint's optimiser state placed for the fused kernel (parameters on the meta device stand in
for a GPU), checkpoints memory-mapped on resume, --vae-precision reaching the encoder, sampling
decisions by noise level without reading a timestep back from the device, and per-sample noise
generators on the sampling device. The tests marked for CUDA run only where a GPU is visible."""
import argparse
import datetime
import http.server
import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

import checkpoint
import cli
import distributed
import download
import sample_ddp
import sampling
import tiny_dit
import tiny_vae
import train
import vae as vae_lib
from conftest import subprocess_env, torchrun

tiny_dit.register()
FLOW_ARGS = {"objective": "flow", "t_sampling": "uniform", "t_mean": 0.0, "t_scale": 1.0}
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ------------------------------------------------------------------ part 1: one download per machine
@pytest.fixture
def file_server(tmp_path):
    """A loopback server of the files in tmp_path/served, recording each request's path."""
    served = tmp_path / "served"
    served.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield SimpleNamespace(folder=served, url=f"http://127.0.0.1:{httpd.server_address[1]}", requests=requests)
    httpd.shutdown()
    httpd.server_close()


LOAD_SCRIPT = """
import os, sys
import torch
import checkpoint, distributed
os.chdir(sys.argv[1])  # pretrained_models/ lands there
rank, world_size, device = distributed.setup("cpu", timeout_min=2)
distributed.barrier()
with distributed.local_rank0_first():
    loaded = checkpoint.load("DiT-XL-2-256x256.pt")
torch.save(loaded.state_dict, f"rank{rank}.pt")
distributed.barrier()
distributed.cleanup()
"""


def test_two_processes_download_released_weights_once_and_both_load_them(tmp_path, file_server):
    """Under torchrun, local rank 0 fetches while rank 1 waits at the barrier, then rank 1 finds the
    file in place: the server sees one request and both ranks hold the weights."""
    weights = {"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3)}
    torch.save(weights, file_server.folder / "DiT-XL-2-256x256.pt")
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    work = tmp_path / "work"
    work.mkdir()
    torchrun(script, work, env={**subprocess_env(), download.MIRROR_ENV: file_server.url})
    assert file_server.requests == ["/DiT-XL-2-256x256.pt"]
    for rank in (0, 1):
        loaded = torch.load(work / f"rank{rank}.pt", weights_only=True)
        assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert os.listdir(work / "pretrained_models") == ["DiT-XL-2-256x256.pt"]  # no .part file left


def test_local_rank0_first_orders_the_block_by_local_rank(monkeypatch):
    """Local rank 0 runs the block, then waits; the others wait, then run it (the barrier calls)."""
    for local_rank, expected in (("0", ["block", "barrier"]), ("1", ["barrier", "block"])):
        events = []
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        monkeypatch.setattr(distributed, "barrier", lambda: events.append("barrier"))
        with distributed.local_rank0_first():
            events.append("block")
        assert events == expected
    events.clear()
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(RuntimeError), distributed.local_rank0_first():
        raise RuntimeError("a failed download")
    assert events == ["barrier"]  # rank 0 still releases the others


def test_sample_ddp_loads_model_and_decoder_local_rank_0_first(pixel_ckpt, tmp_path, monkeypatch):
    inside, seen = [], []

    class Recording:
        def __enter__(self):
            inside.append(True)

        def __exit__(self, *exc):
            inside.pop()

    def recorded(function):
        def call(*args, **kwargs):
            seen.append((function.__name__, bool(inside)))
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(distributed, "local_rank0_first", Recording)
    monkeypatch.setattr(sampling, "load_model", recorded(sampling.load_model))
    monkeypatch.setattr(sampling, "load_decoder", recorded(sampling.load_decoder))
    sample_ddp.main(["--ckpt", pixel_ckpt, "--sample-dir", str(tmp_path), "--num-fid-samples", "2",
                     "--per-proc-batch-size", "2", "--num-sampling-steps", "2", "--device", "cpu"])
    assert seen == [("load_model", True), ("load_decoder", True)]


# ------------------------------------------------------------------ part 12: the group's timeout
def test_setup_hands_its_timeout_to_the_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    calls = []

    def record(*args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("stop before joining")

    monkeypatch.setattr(dist, "init_process_group", record)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="stop"):
        distributed.setup("cpu", timeout_min=45)
    assert calls[0]["timeout"] == datetime.timedelta(minutes=45)
    monkeypatch.setenv("RANK", "0")  # under torchrun too
    with pytest.raises(RuntimeError, match="stop"):
        distributed.setup("cpu", timeout_min=3)
    assert calls[1]["timeout"] == datetime.timedelta(minutes=3)


def test_train_passes_dist_timeout_min_default_30(monkeypatch, tmp_path):
    seen = []

    def record(device=None, timeout_min=None):
        seen.append(timeout_min)
        raise cli.UserError("stop before joining")

    monkeypatch.setattr(distributed, "setup", record)
    for extra, expected in (((), 30), (("--dist-timeout-min", "90"), 90)):
        with pytest.raises(cli.UserError, match="stop"):
            train.main(["--data-path", str(tmp_path), "--results-dir", str(tmp_path / "r"), *extra])
        assert seen[-1] == expected
    with pytest.raises(SystemExit):
        train.parse_args(["--dist-timeout-min", "0"])


# ------------------------------------------------------------------ part 3: the optimiser state's place
def fused_resume_state():
    """A CPU run's checkpoint (foreach AdamW, one step), and a State to restore it into on the meta
    device (a stand-in for CUDA) with --compile, which picks the fused kernel."""
    kwargs = dict(input_size=8, in_channels=1, num_classes=3)
    model = tiny_dit.tiny(**kwargs)
    opt = torch.optim.AdamW(model.parameters(), **train.adamw_kernel(torch.device("cpu")))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    ckpt = {"model_args": dict(model.model_args), "model": model.state_dict(), "ema": model.state_dict(),
            "opt": opt.state_dict(), "train_steps": 1}
    on_meta = tiny_dit.tiny(**kwargs).to("meta")
    args = argparse.Namespace(lr=1e-4, weight_decay=0.0, compile=True)
    state = train.State(on_meta, tiny_dit.tiny(**kwargs).to("meta"),
                        torch.optim.AdamW(on_meta.parameters(), **train.adamw_kernel(torch.device("meta"), True)),
                        torch.amp.GradScaler("cpu", enabled=False))
    return state, ckpt, args


@pytest.mark.filterwarnings("ignore:.*to a meta parameter")  # the weights themselves do not matter here
def test_a_cpu_checkpoint_resumed_for_the_fused_kernel_has_its_state_where_the_kernel_reads_it():
    state, ckpt, args = fused_resume_state()
    train.restore(state, ckpt, "ckpt.pt", args, steps_per_epoch=10)
    assert all(group["fused"] for group in state.opt.param_groups)
    for param in state.model.parameters():
        found = state.opt.state[param]
        assert found["step"].device == param.device and found["step"].dtype == torch.float32
        for key in ("exp_avg", "exp_avg_sq"):
            assert found[key].device == param.device and found[key].dtype == param.dtype
        param.grad = torch.zeros_like(param)
    state.opt.step()  # the fused kernel runs on the restored state
    assert all(state.opt.state[p]["step"].device == p.device for p in state.model.parameters())


def test_a_fused_checkpoint_resumed_for_foreach_keeps_step_on_the_cpu():
    """The other way (a GPU run's checkpoint resumed on CPU without --compile): foreach reads step on
    the CPU, as PyTorch's own loading leaves it."""
    kwargs = dict(input_size=8, in_channels=1, num_classes=3)
    model = tiny_dit.tiny(**kwargs)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    fresh = tiny_dit.tiny(**kwargs)
    other = torch.optim.AdamW(fresh.parameters(), foreach=True)
    other.load_state_dict(opt.state_dict())
    other.param_groups[0].update(train.adamw_kernel(torch.device("cpu")))
    train.place_optimizer_state(other)
    assert all(other.state[p]["step"].device.type == "cpu" for p in fresh.parameters())
    for p in fresh.parameters():
        p.grad = torch.ones_like(p)
    other.step()


# ------------------------------------------------------------------ part 10: memory-mapped resume
def test_load_train_memory_maps_the_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "0000010.pt"
    written = tiny_dit.write_checkpoint(path, image_size=8, vae="none", in_channels=1)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: (calls.append(kwargs), real_load(*args, **kwargs))[1])
    ckpt = checkpoint.load_train(str(path))
    assert calls and calls[0]["mmap"] is True and calls[0]["weights_only"] is True
    assert all(torch.equal(ckpt["ema"][k], written["ema"][k]) for k in written["ema"])
    legacy = tmp_path / "legacy.pt"  # not a zip file: read, as torch cannot map it
    torch.save(written, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(checkpoint.load_train(str(legacy))["ema"]["pos_embed"], written["ema"]["pos_embed"])
    assert calls[-1]["mmap"] is False


# ------------------------------------------------------------------ part 8: --vae-precision
def test_vae_precision_reaches_the_encoder_and_fp32_is_todays(tmp_path):
    vae = tiny_vae.make_tiny_vae()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    flip = torch.tensor([False, True, False, True])
    noise = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    latents = {}
    for precision in ("fp32", "bf16"):
        run = SimpleNamespace(device=torch.device("cpu"),
                              args=argparse.Namespace(feature_path=None, vae_precision=precision))
        latents[precision], _ = train.model_input(run, (images, torch.zeros(4, dtype=torch.long)), flip, noise, vae)
    x = images.float() / 127.5 - 1
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    mean, std = vae.encode(x).latent_dist.mean, vae.encode(x).latent_dist.std
    assert torch.equal(latents["fp32"], vae_lib.sample_latents(mean, std, noise=noise))  # the release's, exactly
    error = (latents["bf16"] - latents["fp32"]).pow(2).mean().sqrt() / latents["fp32"].pow(2).mean().sqrt()
    assert 0 < error < 0.05  # bf16's rounding (8 bits of mantissa), not another computation
    assert train.parse_args([]).vae_precision == "fp32"


# ------------------------------------------------------------------ part 9: sampling without host syncs
@pytest.mark.parametrize("name, steps, diffusion_args", [
    ("ddpm", 5, None), ("ddim", 5, None), ("dpm-solver", 5, None), ("euler", 4, FLOW_ARGS), ("heun", 3, FLOW_ARGS),
    ("sde", 4, FLOW_ARGS)])
@pytest.mark.parametrize("seeded", [False, True])
def test_noise_level_decisions_read_no_timestep_back(name, steps, diffusion_args, seeded, monkeypatch):
    """--cfg-interval and --cache-interval decide by each call's noise level: from the host's copy of
    the timestep, so no float(t[0]) (a device-to-host sync on a GPU) per model call."""
    kwargs = dict(input_size=8, in_channels=1, num_classes=10)
    model = tiny_dit.tiny(**kwargs)
    model.load_state_dict(tiny_dit.random_state_dict(0, **kwargs))
    sampler = sampling.make_sampler(name, steps, diffusion_args, cfg_interval=(0.2, 0.8), cache_interval=2)
    generators = sampling.seeded_generators(0, [0, 1])
    step_noise = (lambda: sampling.draw(generators, (1, 8, 8))) if seeded else None
    reads = []
    real_float = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: (reads.append(self.shape), real_float(self))[1])
    out, stats = sampling.generate(model.eval(), sampler, [1, 2], 3.0, torch.randn(2, 1, 8, 8),
                                   step_noise=step_noise)
    assert reads == [] and stats.nfe > 0 and torch.isfinite(out).all()


def test_seeded_generators_live_on_a_cuda_device_and_stay_the_cpus_elsewhere(monkeypatch):
    made = []
    real_generator = torch.Generator

    class Recording:
        def __new__(cls, device="cpu"):
            made.append(torch.device(device))
            return real_generator()

    cpu = [g.initial_seed() for g in sampling.seeded_generators(5, [0, 7])]
    monkeypatch.setattr(torch, "Generator", Recording)
    sampling.seeded_generators(5, [0, 7], torch.device("cuda", 1))
    sampling.seeded_generators(5, [0, 7], "cpu")
    assert made == [torch.device("cuda", 1)] * 2 + [torch.device("cpu")] * 2
    monkeypatch.undo()
    # The seeds (and so the CPU draws) are the release's: (global seed, index) alone.
    assert cpu == [g.initial_seed() for g in sampling.seeded_generators(5, [0, 7], "cpu")]
    assert cpu[0] == sampling.seeded_generators(5, [3, 0])[1].initial_seed()


@cuda_only
def test_on_cuda_a_samples_image_does_not_depend_on_its_batch(tmp_path):
    ckpt = str(tmp_path / "tiny.pt")
    tiny_dit.write_checkpoint(ckpt, image_size=8, vae="none", in_channels=1)
    kwargs = dict(cfg_scale=2.0, sampler="ddpm", num_sampling_steps=6, seed=3, device="cuda")
    both = sampling.generate_from_checkpoint(ckpt, [1, 2, 1], batch_size=3, **kwargs)
    alone = sampling.generate_from_checkpoint(ckpt, [2], batch_size=1, **kwargs)
    np.testing.assert_allclose(both[1:2].astype(int), alone.astype(int), atol=1)
    generators = sampling.seeded_generators(0, [0, 1], "cuda")
    assert sampling.draw(generators, (1, 8, 8)).device.type == "cuda"


@cuda_only
def test_on_cuda_sample_ddp_labels_are_the_cpus():
    args = argparse.Namespace(global_seed=4, balanced_classes=False)
    cpu_labels, _ = sample_ddp.labels_and_generators(args, 10, range(6), torch.device("cpu"))
    cuda_labels, generators = sample_ddp.labels_and_generators(args, 10, range(6), torch.device("cuda"))
    assert cuda_labels == cpu_labels and all(g.device.type == "cuda" for g in generators)
