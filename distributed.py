"""Process-group setup shared by train.py, extract_features.py and sample_ddp.py.

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) each process joins the job's group;
run as plain `python script.py` it forms a group of one, so the same code path serves both.
NCCL on CUDA, gloo on CPU. `setup(timeout_min=...)` sets how long a collective or barrier waits
(train.py --dist-timeout-min: the others wait at a barrier while rank 0 writes a checkpoint or
computes FID). `local_rank0_first()` runs a block on each machine's local rank 0 before the
others, so what it downloads (released weights, the hub's VAE) is fetched once per machine.
"""
import contextlib
import datetime
import os
import socket

import torch
import torch.distributed as dist

from errors import UserError


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visible_cuda_devices():
    """How many CUDA devices this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_device(name, cuda_count):
    """torch.device for a --device flag ("auto"/None: CUDA when a device is visible, else CPU), checked
    against the `cuda_count` visible CUDA devices. Pure: the caller passes in what the machine has."""
    if name in (None, "", "auto"):
        name = "cuda" if cuda_count else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not cuda_count:
        raise UserError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= cuda_count:
        raise UserError(f"--device {name} asks for GPU {device.index} but only {cuda_count} CUDA device(s) are "
                        f"visible (cuda:0 to cuda:{cuda_count - 1}); pick one of those")
    return device


def choose_device(name, environ, cuda_count):
    """The device of this process for --device `name`, given the environment (`LOCAL_RANK` when
    launched by torchrun) and the number of visible CUDA devices. Pure, so it is tested without a GPU.

    Under torchrun each process takes GPU LOCAL_RANK (modulo the visible count); an explicit index
    that says otherwise is refused. Outside torchrun an explicit index is honoured; plain cuda is GPU 0."""
    device = parse_device(name, cuda_count)
    if device.type != "cuda":
        return device
    local_rank = environ.get("LOCAL_RANK")
    if local_rank is None:
        return torch.device("cuda", device.index or 0)
    index = int(local_rank) % cuda_count
    if device.index is not None and device.index != index:
        raise UserError(f"--device {name} contradicts torchrun, which gives this process (LOCAL_RANK {local_rank}) "
                        f"cuda:{index}; pass --device cuda (or auto), and choose GPUs with CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", index)


def pick_device(name=None):
    """torch.device from a --device flag, for a single process (auto: CUDA when available, else CPU)."""
    return parse_device(name, visible_cuda_devices())


def setup(device=None, timeout_min=None):
    """Join (or form) the process group; returns (rank, world_size, device). timeout_min: how long
    a collective or barrier waits for the other ranks before the job fails (None: PyTorch's default,
    10 minutes for NCCL)."""
    device = choose_device(device, os.environ, visible_cuda_devices())
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = {} if timeout_min is None else {"timeout": datetime.timedelta(minutes=timeout_min)}
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend, **timeout)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                    **timeout)
    return rank, world_size, device


def share_cpu_threads(device, threads=0):
    """On CPU, processes on one machine split its cores instead of oversubscribing them;
    `threads` > 0 sets the count (0: automatic). A lone process keeps torch's own setting."""
    if threads < 0:
        raise UserError(f"--cpu-threads must be 0 (one share of the cores per process) or more, got {threads}")
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device.type != "cpu" or (not threads and local_processes == 1):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads or max(1, cores // local_processes))


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    """Wait for every rank (for as long as setup's timeout_min)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def local_rank0_first():
    """Run the block on each machine's local rank 0 first, then on the other ranks at once: what
    it downloads or caches (released weights, the VAE from the hub) is fetched once per machine
    (where the file system is not shared) and found in place by the others. Every rank must enter
    it. Rank 0 reaches the barrier even when the block fails, so the others never wait forever:
    they then run the block themselves and fail (or succeed) on their own."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if not first:
        barrier()
    try:
        yield
    finally:
        if first:
            barrier()


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
