"""The released DiT weights: downloading them, and `find_model` as the reference has it.

`find_model(name_or_path)` returns a state_dict: a released name (DiT-XL-2-256x256.pt,
DiT-XL-2-512x512.pt) is downloaded once into pretrained_models/, a path is read as the reference
reads it (a train.py checkpoint yields its EMA weights; checkpoint.load reads every other format).
Every load goes through torch.load(weights_only=True), so a file carrying pickled code is refused
before any of it runs.

Downloads go to `<name>.<host>-<pid>-<random>.part` (one per process, so concurrent downloaders
never write into one file) and are renamed only once complete, with the size the server
announced, and checked to be PyTorch weights (a mirror's HTML error page is refused, and weights
already in pretrained_models/ that fail the check are fetched again). An interrupted download
resumes from the partial file a finished process left (or restarts if the server cannot resume).
Set DIT_MODELS_URL to fetch from a mirror instead of the original host.

    python download.py                           # fetch all released weights (both resolutions)
    python download.py DiT-XL/2                  # the same, named as the tutorials do
    python download.py DiT-XL/2 --image-size 512 # one resolution: DiT-XL-2-512x512.pt
    python download.py DiT-XL-2-256x256.pt       # one file by name (".pt" may be left off)

`checkpoint_sha256(name_or_path)` identifies the weights a name or path stands for by content, so
a run can tell when the file behind a path was replaced.
"""
import argparse
import glob
import hashlib
import http.client
import os
import re
import secrets
import socket
import sys
import time
import urllib.error
import urllib.request

import torch
from tqdm.auto import tqdm

import cli
import files

RELEASED_MODELS = ("DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt")
RELEASED_CONFIG = "DiT-XL/2"  # the one config with released weights, at these image sizes:
RELEASED_SIZES = (256, 512)
DEFAULT_BASE_URL = "https://dl.fbaipublicfiles.com/DiT/models"
MIRROR_ENV = "DIT_MODELS_URL"
PRETRAINED_DIR = "pretrained_models"
ATTEMPTS = 3  # resumed tries within one call before giving up
CHUNK = 1 << 20


class DownloadError(cli.UserError, RuntimeError):
    """The weights could not be fetched: one line for the user (a RuntimeError for older callers)."""


class _Interrupted(Exception):
    """The transfer stopped before the announced size; the partial file is kept for resuming."""


def model_url(name):
    base = os.environ.get(MIRROR_ENV) or DEFAULT_BASE_URL
    return f"{base.rstrip('/')}/{name}"


def _fetch_once(url, part, timeout):
    """Append to `part` from where it stops (or start over); returns once `part` is complete."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file is not a prefix the server can continue: start over
            os.remove(part)
            return _fetch_once(url, part, timeout)
        raise
    with response:
        total = None
        content_range = response.headers.get("Content-Range", "")
        if have and response.status == 206 and content_range.startswith(f"bytes {have}-"):
            mode = "ab"
            match = re.search(r"/(\d+)$", content_range)
            total = int(match.group(1)) if match else None
        else:  # the server sent the whole file: restart cleanly
            have, mode = 0, "wb"
            if response.headers.get("Content-Length") is not None:
                total = int(response.headers["Content-Length"])
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                         desc=os.path.basename(url), leave=False) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except http.client.IncompleteRead as e:
                    f.write(e.partial)
                    raise _Interrupted() from None
                if not chunk:
                    break
                f.write(chunk)
                bar.update(len(chunk))
    size = os.path.getsize(part)
    if total is not None and size != total:
        if size > total:  # cannot be a prefix of this file any more
            os.remove(part)
        raise _Interrupted()


def download_model(name, root=PRETRAINED_DIR, timeout=60):
    """Path of released weights `name` under `root`, downloading them first if needed."""
    if name not in RELEASED_MODELS:
        raise cli.UserError(f"{name!r} is not a released DiT model; choose one of {', '.join(RELEASED_MODELS)} "
                            f"or pass a local checkpoint path")
    path = os.path.join(root, name)
    if os.path.isfile(path):
        problem = _weights_problem(path)
        if problem is None:
            return path
        print(f"{path} holds {problem}, not the weights: fetching it again", file=sys.stderr)
        os.remove(path)
    files.check_output_folder(root, "the download folder")  # a file there: one line, not a traceback
    created = not os.path.isdir(root)
    os.makedirs(root, exist_ok=True)
    try:
        url, part = model_url(name), _claim_partial(path, timeout)
        _fetch(url, part, timeout)
        _check_download(url, part, name)
    except BaseException:
        if created and not os.listdir(root):  # made for this download, which left nothing to resume
            os.rmdir(root)
        raise
    os.replace(part, path)
    return path


def _fetch(url, part, timeout):
    """Fetch `url` into `part`, resuming up to ATTEMPTS times; one line when it cannot."""
    reason = None
    for _ in range(ATTEMPTS):
        try:
            _fetch_once(url, part, timeout)
            return
        except _Interrupted:
            have = os.path.getsize(part) if os.path.exists(part) else 0
            reason = f"the transfer stopped after {have} bytes"
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            reason = str(getattr(e, "reason", None) or e) or type(e).__name__
            if not isinstance(e, urllib.error.HTTPError) and isinstance(getattr(e, "reason", None), OSError):
                break  # no connection at all: retrying now will not help
    retry = "run again to resume" if os.path.exists(part) else "check the network and run again"
    raise DownloadError(f"could not download {url} ({reason}); {retry}, set {MIRROR_ENV} to a mirror, "
                        f"or pass --ckpt PATH to weights you already have")


def _check_download(url, part, name):
    """Refuse (deleting it) a complete download that is not weights: a mirror answering 200 with
    an HTML page must not be saved as the weights and kept by every later run."""
    problem = _weights_problem(part)
    if problem is None:
        return
    os.remove(part)
    raise DownloadError(f"{url} sent {problem}, not the weights; check that {MIRROR_ENV} (now "
                        f"{os.environ.get(MIRROR_ENV) or 'unset'}) is a folder serving {name}, or pass --ckpt PATH "
                        f"to weights you already have")


def _weights_problem(path):
    """What `path` holds when it is not released weights, else None. Weights are a non-empty dict of
    tensors under torch.load(weights_only=True); download.py records no checksums of the released
    files, so this is the check. A zip-format file is memory-mapped: checking gigabytes reads little."""
    try:
        weights = files.load_torch(path, "downloaded weights", mmap=True)
    except cli.UserError:  # corrupt, not PyTorch, or pickled objects refused: all not the weights
        return f"{os.path.getsize(path)} bytes that are not a PyTorch file (starting {_first_bytes(path)!r})"
    if not isinstance(weights, dict) or not weights or not all(torch.is_tensor(v) for v in weights.values()):
        return f"a PyTorch file holding {_summary(weights)}, not a state_dict of tensors"
    return None


def _first_bytes(path, count=48):
    with open(path, "rb") as f:
        return f.read(count).decode("utf-8", errors="replace")


def _summary(value):
    if isinstance(value, dict) and value:
        return f"a dict with keys {', '.join(map(str, list(value)[:4]))}"
    return "an empty dict" if isinstance(value, dict) else f"a {type(value).__name__}"


def _claim_partial(path, timeout):
    """This process's own .part name for `path`, holding the largest partial download that an
    earlier process left behind (so the transfer resumes from it). The other leftovers are
    deleted; a partial whose writer may still be running is left alone."""
    mine = f"{path}.{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.part"
    leftovers = [p for p in glob.glob(glob.escape(path) + ".*part") if _abandoned(p, path, timeout)]
    claimed = False
    for leftover in sorted(leftovers, key=_size, reverse=True):
        try:
            if claimed:
                os.remove(leftover)
            else:
                os.rename(leftover, mine)  # atomic: of two processes claiming one file, one gets it
                claimed = True
        except FileNotFoundError:
            continue  # another downloader claimed or removed it first
    return mine


def _abandoned(partial, path, timeout):
    """Whether nobody writes `partial` any more: the older code's `<name>.part`; or one untouched for
    longer than a stalled transfer waits; or one of this host whose process has ended (or is this
    one: downloads within a process run one after the other)."""
    if partial == path + ".part":
        return True
    owner = partial[len(path) + 1:-len(".part")].rsplit("-", 2)
    if len(owner) != 3 or not owner[1].isdigit():
        return False  # not a name this module writes
    try:
        if time.time() - os.path.getmtime(partial) > timeout:
            return True
    except FileNotFoundError:
        return False
    host, pid = owner[0], int(owner[1])
    return host == socket.gethostname() and (pid == os.getpid() or not process_alive(pid))


def process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def _size(path):
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return -1


def find_model(name_or_path):
    """The state_dict to sample with, as the reference's find_model: released weights by name
    (pretrained_models/ first, else downloaded), else the file at the path; a train.py checkpoint
    gives its EMA weights (as sampling does: the paper samples from the EMA). For .safetensors files
    and diffusers folders use checkpoint.load(name_or_path).state_dict."""
    path = os.fspath(name_or_path)
    if path in RELEASED_MODELS and not os.path.isfile(path):
        path = download_model(path)
    ckpt = files.load_torch(path, "checkpoint", mmap=True)  # a train.py checkpoint's optimiser state stays unread
    return ckpt["ema"] if isinstance(ckpt, dict) and "ema" in ckpt else ckpt


def checkpoint_sha256(name_or_path):
    """sha256 of the weights a --ckpt value stands for: a file, a folder's files (by relative path
    and content), or a released name's downloaded file. None for anything else (a hub id)."""
    path = os.fspath(name_or_path)
    if path in RELEASED_MODELS and not os.path.isfile(path):
        path = download_model(path)
    if os.path.isfile(path):
        return file_sha256(path)
    if not os.path.isdir(path):
        return None
    digest = hashlib.sha256()
    for folder, subfolders, names in os.walk(path):
        subfolders.sort()  # a fixed walk order, so the digest depends on the contents only
        for name in sorted(names):
            full = os.path.join(folder, name)
            digest.update(f"{os.path.relpath(full, path)}\0{file_sha256(full)}\0".encode())
    return digest.hexdigest()


def file_sha256(path):
    """Streamed in CHUNK-sized pieces: the released weights are gigabytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def released_names(names, image_size=None):
    """File names to fetch for command-line names: DiT-XL/2 (each of RELEASED_SIZES, or image_size)
    or released file names. Checked in full before anything is downloaded."""
    sizes = [image_size] if image_size else list(RELEASED_SIZES)
    files = []
    for name in names or [RELEASED_CONFIG]:
        if name in (RELEASED_CONFIG, RELEASED_CONFIG.replace("/", "-")):
            files += [f"DiT-XL-2-{size}x{size}.pt" for size in sizes]
            continue
        filename = name if name.endswith(".pt") else name + ".pt"
        if filename not in RELEASED_MODELS:
            raise cli.UserError(f"unknown released model {name!r}; give {RELEASED_CONFIG} (both resolutions, or "
                                f"one with --image-size {' or '.join(map(str, RELEASED_SIZES))}) or a file "
                                f"name: {', '.join(RELEASED_MODELS)}")
        if image_size and filename != f"DiT-XL-2-{image_size}x{image_size}.pt":
            raise cli.UserError(f"{name} is not the --image-size {image_size} weights; drop one of the two")
        files.append(filename)
    return list(dict.fromkeys(files))  # each file once, in the order asked


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*",
                        help=f"{RELEASED_CONFIG} or file names {', '.join(RELEASED_MODELS)} (default: all)")
    parser.add_argument("--image-size", type=int, choices=RELEASED_SIZES, default=None,
                        help="only the weights for this resolution (default: both)")
    parser.add_argument("--dir", default=PRETRAINED_DIR, help="where to put them")
    args = parser.parse_args(argv)
    files.check_output_folder(args.dir, "--dir")
    for name in released_names(args.names, args.image_size):
        print(download_model(name, args.dir))


if __name__ == "__main__":
    cli.run(main)
