"""The small shared modules as they behave today: vae.py (where the VAE comes from, latent sampling, chunked
decoding), files.py (atomic writes, safe loading), cli.py (image conversion, class labels, autocast) and
distributed.py (device choice, a group of one, CPU thread sharing)."""
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist

import cli
import distributed
import files
import vae as vae_lib

# ---- vae.py ----


def test_vae_source_hub_names_and_local_folders(tmp_path):
    assert vae_lib.vae_source("ema") == "stabilityai/sd-vae-ft-ema"
    assert vae_lib.vae_source("mse") == "stabilityai/sd-vae-ft-mse"
    assert vae_lib.vae_source("mse", vae_path=str(tmp_path)) == str(tmp_path)  # --vae-path wins
    assert vae_lib.vae_source("ema", vae_path="") == "stabilityai/sd-vae-ft-ema"  # an empty --vae-path is unset


def test_vae_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--vae-path .* is not a folder"):
        vae_lib.vae_source("ema", vae_path=str(tmp_path / "missing"))
    a_file = tmp_path / "config.json"
    a_file.write_text("{}")
    for bad in ("none", "xl", str(a_file), str(tmp_path), None):  # a local folder goes to --vae-path
        with pytest.raises(cli.UserError, match="is not one of ema, mse .*; pass a local diffusers folder with "
                                                "--vae-path"):
            vae_lib.vae_source(bad)


def test_sample_latents_arithmetic():
    mean = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    std = torch.tensor([[0.5, 1.0], [2.0, 0.0]])
    noise = torch.tensor([[2.0, -1.0], [0.5, 7.0]])
    expected = torch.tensor([[2.0, -3.0], [1.0, 3.0]]) * 0.18215
    assert torch.allclose(vae_lib.sample_latents(mean, std, noise=noise), expected)
    assert vae_lib.LATENT_SCALE == 0.18215


def test_sample_latents_draws_from_the_generator():
    mean, std = torch.randn(2, 4, 3, 3), torch.rand(2, 4, 3, 3)
    drawn = vae_lib.sample_latents(mean, std, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(drawn, (mean + std * noise) * vae_lib.LATENT_SCALE)
    other = vae_lib.sample_latents(mean, std, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(drawn, other)


def test_decode_in_chunks_equals_one_decode():
    import tiny_vae

    model = tiny_vae.make_tiny_vae()
    latents = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    whole = model.decode(latents / vae_lib.LATENT_SCALE).sample
    chunked = vae_lib.decode(model, latents, chunk_size=2)  # chunks of 2, 2 and 1
    assert chunked.shape == (5, 3, 32, 32) and chunked.dtype == torch.float32
    assert torch.allclose(chunked, whole, atol=1e-5)
    assert torch.allclose(vae_lib.decode(model, latents, chunk_size=64), whole, atol=1e-5)


# ---- files.py ----


def temp_files(folder):
    return [name for name in os.listdir(folder) if name.startswith(".tmp-")]


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"  # the folder is made as needed
    with files.atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(target.parent) and tmp.endswith(".txt")
        with open(tmp, "w") as f:
            f.write("new")
        assert not target.exists()  # nothing appears at the target before the block ends
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert temp_files(target.parent) == []


def test_atomic_path_failure_keeps_old_content_and_no_temp_file(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with files.atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert temp_files(tmp_path) == []


def test_remove_stale_temp_files_removes_only_ours(tmp_path):
    (tmp_path / ".tmp-abc.pt").write_bytes(b"half")  # left by a process killed inside atomic_path
    (tmp_path / "0000100.pt").write_bytes(b"kept")
    (tmp_path / "tmp-not-ours.pt").write_bytes(b"kept")
    assert files.remove_stale_temp_files(tmp_path) == [str(tmp_path / ".tmp-abc.pt")]
    assert sorted(os.listdir(tmp_path)) == ["0000100.pt", "tmp-not-ours.pt"]
    assert files.remove_stale_temp_files(tmp_path) == []


def test_save_json_round_trip(tmp_path):
    obj = {"b": [1, 2.5, None], "a": {"x": "y"}, "flag": True}
    path = tmp_path / "args.json"
    files.save_json(obj, path)
    text = path.read_text()
    assert json.loads(text) == obj
    assert text.endswith("}\n") and text.index('"a"') < text.index('"b"')  # sorted keys, final newline


def test_save_torch_load_torch_round_trip(tmp_path):
    obj = {"model": {"w": torch.randn(3, 2)}, "train_steps": 7, "args": {"lr": 1e-4, "model": "DiT-S/2"}}
    path = tmp_path / "0000007.pt"
    files.save_torch(obj, path)
    back = files.load_torch(path)
    assert torch.equal(back["model"]["w"], obj["model"]["w"])
    assert back["train_steps"] == 7 and back["args"] == obj["args"]
    assert temp_files(tmp_path) == []


RAN = []  # what the pickled objects below would record if they were ever unpickled


def record_run(what):
    RAN.append(what)


class RunsCodeOnLoad:
    """Unpickling this calls record_run: a pickle that carries code."""

    def __reduce__(self):
        return record_run, ("reduce",)


class PlainInstance:
    """An ordinary class instance; unpickling it would call __setstate__."""

    def __init__(self):
        self.value = 1

    def __setstate__(self, state):
        record_run("setstate")
        self.__dict__.update(state)


@pytest.mark.parametrize("payload, marker", [(RunsCodeOnLoad(), b"record_run"), (PlainInstance(), b"PlainInstance")],
                         ids=["reduce", "instance"])
def test_load_torch_refuses_pickled_code_without_running_it(tmp_path, payload, marker):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": payload}, path)
    assert marker in path.read_bytes()  # the file really names the code that plain unpickling would run
    RAN.clear()
    with pytest.raises(cli.UserError, match="was refused without running them") as info:
        files.load_torch(path, what="checkpoint")
    assert RAN == []
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_load_torch_reports_truncated_and_missing_files(tmp_path):
    path = tmp_path / "cut.pt"
    files.save_torch({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(cli.UserError, match="features .* is not a readable PyTorch file .truncated or corrupt") as info:
        files.load_torch(path, what="features")
    assert "\n" not in str(info.value) and "re-download or re-save it" in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        files.load_torch(tmp_path / "nothing.pt")


def test_load_torch_names_a_folder_given_for_a_file(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder, not a file") as info:
        files.load_torch(tmp_path)
    assert "does not exist" not in str(info.value) and str(tmp_path) in str(info.value)


@pytest.mark.parametrize("content", [np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
                                     b"<html><body>mirror error page</body></html>", b""],
                         ids=["random-bytes", "html", "empty"])
def test_load_torch_tells_a_corrupt_file_from_a_refused_pickle(tmp_path, content):
    """Random bytes are not a security refusal (the weights-only unpickler stops at their first byte)."""
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(cli.UserError) as info:
        files.load_torch(path)
    assert "is not a readable PyTorch file (truncated or corrupt" in str(info.value)
    assert "pickled Python objects" not in str(info.value) and "Unsupported" not in str(info.value)


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_load_torch_refuses_real_pickles_of_objects_whatever_their_protocol(tmp_path, protocol):
    """Plain pickle files, not torch's zip format: refused as objects (not called corrupt), never run."""
    path = tmp_path / "objects.pt"
    path.write_bytes(pickle.dumps({"extra": PlainInstance()}, protocol=protocol))
    RAN.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about protocol 4
        with pytest.raises(cli.UserError, match="holds pickled Python objects .* refused without running them"):
            files.load_torch(path)
    assert RAN == []


def test_output_paths_are_checked_before_the_work(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(IsADirectoryError, match="--output .* is a folder, not a file"):
        files.check_output_file(tmp_path, "--output")
    with pytest.raises(NotADirectoryError, match="lies under .*a_file.*, which is a file"):
        files.check_output_file(tmp_path / "a_file" / "m.json", "--output")
    with pytest.raises(NotADirectoryError, match="--feature-path .* is a file, not a folder"):
        files.check_output_folder(tmp_path / "a_file", "--feature-path")
    files.check_output_file(tmp_path / "new" / "deeper" / "m.json", "--output")  # created when written
    files.check_output_folder(tmp_path / "new", "--feature-path")
    files.check_output_folder(tmp_path, "--feature-path")


# ---- cli.py ----


def test_to_uint8_values_and_layout():
    images = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).reshape(1, 1, 2, 3).repeat(2, 3, 1, 1)
    images[1] *= -1
    out = cli.to_uint8(images)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (2, 2, 3, 3)  # N, H, W, C
    # 127.5 x + 128, clamped to [0, 255], then truncated (as the original sample_ddp.py)
    assert out[0, :, :, 0].ravel().tolist() == [0, 0, 128, 191, 255, 255]
    assert out[1, :, :, 2].ravel().tolist() == [255, 255, 128, 64, 0, 0]
    assert np.array_equal(cli.to_uint8(images.to(torch.bfloat16)), out)  # half precision is converted first


def test_parse_class_labels_forms():
    assert cli.parse_class_labels("207 360 387", 1000) == [207, 360, 387]
    assert cli.parse_class_labels("207,360", 1000) == [207, 360]
    assert cli.parse_class_labels(" 1, 2 ,3 ", 10) == [1, 2, 3]
    assert cli.parse_class_labels(5, 10) == [5]
    assert cli.parse_class_labels("0 9", 10) == [0, 9]  # both ends of the range
    assert cli.parse_class_labels("", 10) == []  # callers decide what an empty list means


def test_parse_class_labels_errors():
    for text, bad in (("10", 10), ("3 -1", -1), ("1000", 1000)):
        num_classes = 1000 if bad == 1000 else 10
        with pytest.raises(cli.UserError, match=rf"class label {bad} is out of range: labels must be in "
                                                rf"\[0, {num_classes - 1}\]"):
            cli.parse_class_labels(text, num_classes)
    for text in ("cat dog", "1.5", "3;4"):
        with pytest.raises(cli.UserError, match="must be integers separated by spaces or commas"):
            cli.parse_class_labels(text, 10)


def test_autocast_is_a_no_op_for_fp32_and_tf32():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    cpu = torch.device("cpu")
    for precision in ("fp32", "tf32"):
        with cli.autocast(precision, cpu):
            assert not torch.is_autocast_enabled("cpu")
            assert (a @ b).dtype == torch.float32
    with cli.autocast("bf16", cpu):
        assert (a @ b).dtype == torch.bfloat16  # the contrast: bf16 does cast


def test_set_tf32_leaves_cpu_runs_alone():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    cli.set_tf32("bf16" if not before[0] else "fp32", torch.device("cpu"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


# ---- distributed.py ----


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


# ------------------------------------------------------------------ cli.run: one line for the user, tracebacks for bugs
@pytest.mark.parametrize("error", [cli.UserError("--lr -1 is out of range"), FileNotFoundError("no such file x.pt"),
                                   OSError(28, "No space left on device"), PermissionError(13, "Permission denied")])
def test_run_shortens_user_and_environment_errors(error, capsys):
    def main():
        raise error

    with pytest.raises(SystemExit) as e:
        cli.run(main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("error", [ValueError("mat1 and mat2 shapes cannot be multiplied"), RuntimeError("boom"),
                                   KeyError("weight"), OSError(5, "Input/output error")])
def test_run_lets_bugs_keep_their_traceback(error):
    def main():
        raise error

    with pytest.raises(type(error)):  # propagates: Python prints the whole traceback
        cli.run(main)


def test_run_names_cuda_out_of_memory(capsys):
    def main():
        raise cli.OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(SystemExit):
        cli.run(main)
    err = capsys.readouterr().err
    assert "ran out of memory" in err and "batch size" in err and err.count("\n") == 1, err
