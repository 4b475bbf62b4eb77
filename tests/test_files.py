"""files.py: atomic writes, stale temp files, JSON and torch round trips, safe loading that refuses
pickled code, and output paths checked before the work."""

import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch

import cli
import files


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
