"""Atomic file writes: a crash never leaves a half-written checkpoint, shard or image that
looks complete. Write to a temporary file in the same folder, then rename over the target."""
import contextlib
import json
import os
import tempfile

import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; renamed onto it only if the block succeeds."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_torch(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_json(obj, path):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")


def save_image(image, path):
    """Save a PIL image atomically; the format follows the target's extension."""
    with atomic_path(path) as tmp:
        image.save(tmp)


def load_torch(path, what="checkpoint"):
    """torch.load(weights_only=True) with one-line errors for missing, corrupt or unsafe files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError here
        text = str(e).strip()
        lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(e).__name__]
        first = next((line for line in lines if "Unsupported" in line), lines[0])
        if "Unsupported global" in text or "Unsupported operand" in text or "GLOBAL" in text:
            raise ValueError(f"{what} {path!r} holds pickled Python objects beyond tensors and plain values, "
                             f"and was refused without running them ({first[:200]}); re-save it with tensors "
                             f"only or use a trusted file") from None
        raise ValueError(f"{what} {path!r} is corrupt or not a PyTorch file ({first[:200]}); "
                         f"re-download or re-create it") from None
