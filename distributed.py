"""Process-group setup shared by train.py, extract_features.py and sample_ddp.py.

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) each process joins the job's group;
run as plain `python script.py` it forms a group of one, so the same code path serves both.
NCCL on CUDA, gloo on CPU.
"""
import os
import socket

import torch
import torch.distributed as dist

from cli import UserError


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(name=None):
    """torch.device from a --device flag ("auto"/None: CUDA when available, else CPU)."""
    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def setup(device=None):
    """Join (or form) the process group; returns (rank, world_size, device)."""
    device = pick_device(device)
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    return rank, world_size, device


def share_cpu_threads(device, threads=0):
    """On CPU, processes on one machine split its cores instead of oversubscribing them;
    `threads` > 0 sets the count. A lone process keeps torch's own setting."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device.type != "cpu" or (not threads and local_processes == 1):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads or max(1, cores // local_processes))


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def mean_over_ranks(value, device):
    """The mean of a float over all ranks."""
    t = torch.tensor(float(value), device=device, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.item()


def broadcast(value):
    """Rank 0's value (any picklable object) on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value
