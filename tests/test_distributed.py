"""distributed.py: device choice, a group of one, CPU thread sharing, local rank 0 first, and the
process group's timeout."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist

import cli
import distributed
import tiny_dit

tiny_dit.register()


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


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in (None, "", "auto", "cpu"):
        assert distributed.pick_device(name) == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(cli.UserError, match="no CUDA GPU is visible; use --device cpu"):
            distributed.pick_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.pick_device("auto") == torch.device("cuda")
    assert distributed.pick_device("cuda:1") == torch.device("cuda", 1)
    assert distributed.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(cli.UserError, match="--device cuda:2 asks for GPU 2 but only 2 CUDA device"):
        distributed.pick_device("cuda:2")


@pytest.mark.parametrize("flag, environ, count, expected", [
    ("auto", {}, 0, "cpu"),
    ("cpu", {"LOCAL_RANK": "1"}, 2, "cpu"),
    ("auto", {}, 2, "cuda:0"),
    ("cuda", {}, 2, "cuda:0"),
    ("cuda:1", {}, 2, "cuda:1"),  # outside torchrun an explicit index is honoured
    ("auto", {"LOCAL_RANK": "1"}, 2, "cuda:1"),  # under torchrun: this process's GPU
    ("cuda", {"LOCAL_RANK": "3"}, 2, "cuda:1"),
    ("cuda:1", {"LOCAL_RANK": "1"}, 2, "cuda:1"),  # an index that agrees with torchrun
])
def test_choose_device_is_a_function_of_flag_environment_and_device_count(flag, environ, count, expected):
    assert distributed.choose_device(flag, environ, count) == torch.device(expected)


@pytest.mark.parametrize("flag, environ, count, problem", [
    ("cuda:1", {"LOCAL_RANK": "0"}, 2, "--device cuda:1 contradicts torchrun, which gives this process "
                                       "(LOCAL_RANK 0) cuda:0"),
    ("cuda:2", {}, 2, "asks for GPU 2 but only 2 CUDA device(s) are visible"),
    ("cuda", {}, 0, "no CUDA GPU is visible"),
    ("gpu", {}, 2, "is not a device"),
])
def test_choose_device_refuses_in_one_line(flag, environ, count, problem):
    with pytest.raises(cli.UserError) as info:
        distributed.choose_device(flag, environ, count)
    assert problem in str(info.value) and "\n" not in str(info.value)


def test_setup_takes_the_device_from_choose_device(monkeypatch):
    """setup hands choose_device the process's environment and the visible count (CPU here)."""
    seen = []

    def record(*args):
        seen.append(args)
        raise cli.UserError("stop before joining a group")

    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setattr(distributed, "choose_device", record)
    with pytest.raises(cli.UserError, match="stop"):
        distributed.setup("cuda:1")
    assert seen[0][0] == "cuda:1" and seen[0][1]["LOCAL_RANK"] == "5"
    assert seen[0][2] == distributed.visible_cuda_devices()


def test_pick_device_unknown_name_is_a_user_error():
    with pytest.raises(cli.UserError):
        distributed.pick_device("gpu")


def test_setup_and_cleanup_as_a_group_of_one(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    assert distributed.mean_over_ranks(3, torch.device("cpu")) == 3.0  # without a group: the value itself
    try:
        assert distributed.setup("cpu") == (0, 1, torch.device("cpu"))
        assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
        assert distributed.setup("cpu") == (0, 1, torch.device("cpu"))  # a second call joins the same group
        mean = distributed.mean_over_ranks(2.5, torch.device("cpu"))
        assert mean == 2.5 and isinstance(mean, float)
        distributed.barrier()  # a group of one does not wait
    finally:
        distributed.cleanup()
    assert not dist.is_initialized()
    distributed.cleanup()  # twice is harmless


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def test_share_cpu_threads_splits_cores_between_local_processes(monkeypatch, restore_threads):
    cpu = torch.device("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    torch.set_num_threads(7)
    distributed.share_cpu_threads(cpu)
    assert torch.get_num_threads() == max(1, available_cores() // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * available_cores()))  # more processes than cores
    distributed.share_cpu_threads(cpu)
    assert torch.get_num_threads() == 1
    distributed.share_cpu_threads(cpu, threads=3)  # an explicit count wins
    assert torch.get_num_threads() == 3


def test_share_cpu_threads_leaves_a_lone_process_and_gpus_alone(monkeypatch, restore_threads):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    torch.set_num_threads(5)
    distributed.share_cpu_threads(torch.device("cpu"))
    assert torch.get_num_threads() == 5
    distributed.share_cpu_threads(torch.device("cpu"), threads=2)
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    distributed.share_cpu_threads(torch.device("cuda"), threads=6)
    assert torch.get_num_threads() == 2


def test_share_cpu_threads_refuses_a_negative_count_in_one_line(restore_threads):
    with pytest.raises(cli.UserError, match="--cpu-threads must be 0 .* or more, got -1"):
        distributed.share_cpu_threads(torch.device("cpu"), threads=-1)
