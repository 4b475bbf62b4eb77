"""download.py: released weights from a loopback HTTP server (resume after a cut, restart when the
server cannot resume, no network, a mirror's error page refused, partial files per process, one
download per machine under torchrun) and refusal of pickled code."""

import glob
import hashlib
import http.server
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import cli
import download
import tiny_dit
from conftest import subprocess_env, torchrun

tiny_dit.register()


NAME = "DiT-XL-2-256x256.pt"


class Server:
    """A 127.0.0.1 file server. mode: "ok"; "cut_first" (the first response stops halfway);
    "always_cut"; "no_range" (ignores Range and always sends the whole file)."""

    def __init__(self, payload, mode="ok"):
        self.payload, self.mode, self.requests = payload, mode, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                data, start = server.payload, 0
                if rng and server.mode != "no_range":
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.mode == "always_cut" or (server.mode == "cut_first" and len(server.requests) == 1)
                # A cut sends half of what was announced, then drops the connection.
                self.wfile.write(body[: len(body) // 2] if cut else body)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/models"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def weights(tmp_path):
    state_dict = {"w": torch.arange(300_000, dtype=torch.float32), "b": torch.ones(3)}
    path = tmp_path / "src.pt"
    torch.save(state_dict, path)
    return state_dict, path.read_bytes()


@pytest.fixture
def serve(monkeypatch, tmp_path):
    servers = []
    monkeypatch.chdir(tmp_path)  # pretrained_models/ lands here

    def start(payload, mode="ok"):
        server = Server(payload, mode)
        servers.append(server)
        monkeypatch.setenv(download.MIRROR_ENV, server.url)
        return server
    yield start
    for server in servers:
        server.close()


def partials():
    return glob.glob(os.path.join("pretrained_models", "*.part"))


def test_download_once_then_reuse(serve, weights):
    state_dict, payload = weights
    server = serve(payload)
    loaded = download.find_model(NAME)
    assert torch.equal(loaded["w"], state_dict["w"]) and torch.equal(loaded["b"], state_dict["b"])
    assert server.requests == [(f"/models/{NAME}", None)]
    assert os.listdir("pretrained_models") == [NAME]
    download.find_model(NAME)
    assert len(server.requests) == 1  # cached: not fetched again


def test_cut_transfer_resumes_from_the_partial_file(serve, weights):
    _, payload = weights
    server = serve(payload, "cut_first")
    path = download.download_model(NAME)
    with open(path, "rb") as f:
        assert f.read() == payload
    assert server.requests[0][1] is None and server.requests[1][1] == f"bytes={len(payload) // 2}-"
    assert partials() == []


def test_interrupted_download_is_never_renamed_and_resumes_on_the_next_run(serve, weights):
    _, payload = weights
    server = serve(payload, "always_cut")
    with pytest.raises(RuntimeError) as e:
        download.download_model(NAME)
    message = str(e.value)
    assert "run again to resume" in message and download.MIRROR_ENV in message and "--ckpt" in message
    assert "\n" not in message
    assert not os.path.exists(os.path.join("pretrained_models", NAME))
    [part] = partials()
    assert f"-{os.getpid()}-" in part  # this process's own name
    have = os.path.getsize(part)
    assert 0 < have < len(payload)

    server.mode = "ok"
    path = download.download_model(NAME)
    assert server.requests[-1][1] == f"bytes={have}-"
    with open(path, "rb") as f:
        assert f.read() == payload


def test_server_without_range_support_restarts_cleanly(serve, weights):
    _, payload = weights
    server = serve(payload, "no_range")
    os.makedirs("pretrained_models")
    with open(os.path.join("pretrained_models", NAME + ".part"), "wb") as f:
        f.write(b"stale bytes from an earlier try")
    path = download.download_model(NAME)
    assert server.requests[0][1] == "bytes=31-"  # asked to resume, got the whole file: overwritten
    with open(path, "rb") as f:
        assert f.read() == payload


def test_no_network_gives_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(download.MIRROR_ENV, f"http://127.0.0.1:{port}")
    with pytest.raises(RuntimeError) as e:
        download.find_model(NAME)
    message = str(e.value)
    assert f"127.0.0.1:{port}/{NAME}" in message and "--ckpt" in message and download.MIRROR_ENV in message
    assert "\n" not in message


def test_download_script_fetches_all_released_weights(serve, weights, capsys):
    _, payload = weights
    serve(payload)
    download.main(["--dir", "weights"])
    assert sorted(os.listdir("weights")) == sorted(download.RELEASED_MODELS)
    assert capsys.readouterr().out.count("weights") == 2


class Payload:
    """Unpickling this calls os.mkdir(marker): it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"ema": {"w": torch.ones(1)}, "args": Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ValueError) as e:
        download.find_model(str(tmp_path / "evil.pt"))
    assert "refused" in str(e.value) and "evil.pt" in str(e.value)
    assert not marker.exists()
    # Unpickling the payload with plain pickle does run its code: the marker test is live.
    pickle.loads(pickle.dumps(Payload(str(marker))))
    assert marker.exists()


def test_download_script_takes_the_config_name_as_tutorials_write_it(serve, weights):
    _, payload = weights
    server = serve(payload)
    download.main(["DiT-XL/2", "--dir", "both"])
    assert sorted(os.listdir("both")) == sorted(download.RELEASED_MODELS)
    download.main(["DiT-XL/2", "--image-size", "512", "--dir", "one"])
    assert os.listdir("one") == ["DiT-XL-2-512x512.pt"]
    download.main(["DiT-XL-2-256x256.pt", "--dir", "file"])  # the file-name form keeps working
    assert os.listdir("file") == ["DiT-XL-2-256x256.pt"]
    assert len(server.requests) == 4


@pytest.mark.parametrize("argv, expected", [
    (["DiT-B/2"], ["'DiT-B/2'", "DiT-XL/2", "--image-size", "DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt"]),
    (["DiT-XL-2-256x256.pt", "nonsense"], ["'nonsense'", "DiT-XL/2"]),
    (["DiT-XL-2-256x256.pt", "--image-size", "512"], ["DiT-XL-2-256x256.pt", "--image-size 512"]),
])
def test_download_script_refuses_unknown_names_in_one_line_before_fetching(serve, weights, capsys, argv,
                                                                           expected):
    server = serve(weights[1])
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: download.main(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), err
    for text in expected:
        assert text in err, err
    assert server.requests == [] and not os.path.exists("pretrained_models")


def test_checkpoint_hash_streams_files_and_resolves_released_names(serve, weights, tmp_path, monkeypatch):
    _, payload = weights
    serve(payload)
    monkeypatch.setattr(download, "CHUNK", 1000)  # many chunks: the digest must still be the whole file's
    assert download.checkpoint_sha256(NAME) == hashlib.sha256(payload).hexdigest()  # downloaded first
    os.makedirs("folder/sub")
    (tmp_path / "folder" / "sub" / "a.bin").write_bytes(b"abc")
    before = download.checkpoint_sha256("folder")
    (tmp_path / "folder" / "sub" / "a.bin").write_bytes(b"abd")
    assert download.checkpoint_sha256("folder") != before
    assert download.checkpoint_sha256("facebook/DiT-XL-2-256") is None  # a hub id: no local file to hash


# ------------------------------------------------------------------ checking what came back
HTML = b"<!DOCTYPE html>\n<html><body>Mirror maintenance: back soon</body></html>\n"


def test_a_mirror_answering_200_with_a_web_page_is_refused_and_nothing_is_kept(serve, weights, capsys):
    _, payload = weights
    server = serve(HTML)
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: download.main([NAME]))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and len(errors) == 1, errors  # (the rest is the progress bar)
    err = errors[0]
    assert f"{server.url}/{NAME}" in err and f"{len(HTML)} bytes" in err and "<!DOCTYPE html>" in err, err
    assert download.MIRROR_ENV in err and "--ckpt" in err
    assert not os.path.exists("pretrained_models")  # neither the page under the weights' name nor a .part (nor
    # the folder, made for this download)

    server.payload = payload  # the mirror is fixed: the next run fetches the weights
    with open(download.download_model(NAME), "rb") as f:
        assert f.read() == payload


@pytest.mark.parametrize("bad", ["eight_bytes", "html", "list"])
def test_bad_weights_already_in_place_are_fetched_again(serve, weights, capsys, tmp_path, bad):
    state_dict, payload = weights
    server = serve(payload)
    os.makedirs("pretrained_models")
    target = os.path.join("pretrained_models", NAME)
    if bad == "list":
        torch.save([torch.ones(1)], target)
    else:
        with open(target, "wb") as f:
            f.write(b"12345678" if bad == "eight_bytes" else HTML)
    loaded = download.find_model(NAME)
    assert torch.equal(loaded["w"], state_dict["w"]) and len(server.requests) == 1
    err = capsys.readouterr().err
    assert f"{target} holds" in err and "fetching it again" in err, err
    download.find_model(NAME)  # now good: neither fetched nor reported again
    assert len(server.requests) == 1 and "fetching" not in capsys.readouterr().err


def test_each_process_downloads_into_its_own_part_file(serve, weights):
    """A partial file of a live downloader is left alone; one of a process that has ended is
    resumed from (and the other leftovers deleted)."""
    _, payload = weights
    server = serve(payload)
    os.makedirs("pretrained_models")
    path = os.path.join("pretrained_models", NAME)
    host = socket.gethostname()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    live = f"{path}.{host}-{os.getppid()}-0a0a0a0a.part"  # our parent process: alive, writing just now
    dead, smaller = f"{path}.{host}-{ended.pid}-0b0b0b0b.part", f"{path}.{host}-{ended.pid}-0c0c0c0c.part"
    for name, data in ((live, b"live writer's bytes"), (dead, payload[:1000]), (smaller, payload[:10])):
        with open(name, "wb") as f:
            f.write(data)
    claimed = download._claim_partial(path, 60)
    assert f"-{os.getpid()}-" in claimed and os.path.getsize(claimed) == 1000  # the larger leftover
    assert not os.path.exists(dead) and not os.path.exists(smaller)
    again = download._claim_partial(path, 60)  # a later download of this process takes it over
    assert again != claimed and not os.path.exists(claimed) and os.path.getsize(again) == 1000
    os.rename(again, dead)  # as the ended process left it

    with open(download.download_model(NAME), "rb") as f:
        assert f.read() == payload
    assert server.requests == [(f"/models/{NAME}", "bytes=1000-")]  # resumed from the ended process's file
    with open(live, "rb") as f:
        assert f.read() == b"live writer's bytes"
    os.utime(live, (time.time() - 120, time.time() - 120))  # untouched for longer than a stalled transfer waits
    assert download._claim_partial(path, 60) and not os.path.exists(live)


def test_a_failed_download_leaves_no_empty_folder_and_a_file_as_dir_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(download.MIRROR_ENV, f"http://127.0.0.1:{port}")
    with pytest.raises(download.DownloadError):
        download.find_model(NAME)
    assert os.listdir(tmp_path) == []  # no empty pretrained_models/ behind
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: download.main([NAME, "--dir", str(tmp_path / "a-file")]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--dir" in err and "is a file, not a folder" in err and err.count("\n") == 1, err


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
