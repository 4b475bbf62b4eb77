"""Released DiT weights and checkpoint loading.

`find_model(name_or_path)` returns a state_dict: a released name (DiT-XL-2-256x256.pt,
DiT-XL-2-512x512.pt) is downloaded once into pretrained_models/, anything else is a local
file (a train.py checkpoint yields its EMA weights). Every load goes through
torch.load(weights_only=True), so a file carrying pickled code is refused before any of it runs.

Downloads go to `<name>.part` and are renamed only once complete, with the size the server
announced; an interrupted download resumes from the partial file (or restarts if the server
cannot resume). Set DIT_MODELS_URL to fetch from a mirror instead of the original host.

    python download.py                      # fetch all released weights
    python download.py DiT-XL-2-256x256.pt  # fetch one
"""
import argparse
import http.client
import os
import re
import urllib.error
import urllib.request

from tqdm.auto import tqdm

import cli
from files import load_torch

RELEASED_MODELS = ("DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt")
DEFAULT_BASE_URL = "https://dl.fbaipublicfiles.com/DiT/models"
MIRROR_ENV = "DIT_MODELS_URL"
PRETRAINED_DIR = "pretrained_models"
ATTEMPTS = 3  # resumed tries within one call before giving up
CHUNK = 1 << 20


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
        raise ValueError(f"{name!r} is not a released DiT model; choose one of {', '.join(RELEASED_MODELS)} "
                         f"or pass a local checkpoint path")
    path = os.path.join(root, name)
    if os.path.isfile(path):
        return path
    os.makedirs(root, exist_ok=True)
    url, part = model_url(name), path + ".part"
    reason = None
    for _ in range(ATTEMPTS):
        try:
            _fetch_once(url, part, timeout)
            os.replace(part, path)
            return path
        except _Interrupted:
            have = os.path.getsize(part) if os.path.exists(part) else 0
            reason = f"the transfer stopped after {have} bytes"
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            reason = str(getattr(e, "reason", None) or e) or type(e).__name__
            if not isinstance(e, urllib.error.HTTPError) and isinstance(getattr(e, "reason", None), OSError):
                break  # no connection at all: retrying now will not help
    retry = "run again to resume" if os.path.exists(part) else "check the network and run again"
    raise RuntimeError(f"could not download {url} ({reason}); {retry}, set {MIRROR_ENV} to a mirror, "
                       f"or pass --ckpt PATH to weights you already have")


def load_checkpoint(name_or_path):
    """(state_dict, args) from released weights or a local file; args is {} unless train.py wrote it."""
    if name_or_path in RELEASED_MODELS and not os.path.isfile(name_or_path):
        name_or_path = download_model(name_or_path)
    checkpoint = load_torch(name_or_path, "checkpoint")
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {name_or_path!r} holds a {type(checkpoint).__name__}, not a state_dict "
                         f"or a train.py checkpoint")
    args = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    if "ema" in checkpoint:  # train.py checkpoint: sample from the EMA weights, as the paper does
        return checkpoint["ema"], args
    if "model" in checkpoint and isinstance(checkpoint["model"], dict):
        return checkpoint["model"], args
    return checkpoint, args


def find_model(name_or_path):
    """The state_dict to sample with: released weights by name, or a local checkpoint."""
    return load_checkpoint(name_or_path)[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(RELEASED_MODELS),
                        help=f"released weights to fetch (default: all of {', '.join(RELEASED_MODELS)})")
    parser.add_argument("--dir", default=PRETRAINED_DIR, help="where to put them")
    args = parser.parse_args(argv)
    for name in args.names:
        print(download_model(name, args.dir))


if __name__ == "__main__":
    cli.run(main)
