"""Atomic file writes: a crash never leaves a half-written checkpoint, shard or image that
looks complete. Write to a temporary file in the same folder, then rename over the target."""
import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile

import torch

from cli import UserError

TEMP_PREFIX = ".tmp-"  # what atomic_path names its temporary files
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; renamed onto it only if the block succeeds."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=os.path.splitext(path)[1], dir=folder)
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
            raise UserError(f"{what} {path!r} holds pickled Python objects beyond tensors and plain values, "
                             f"and was refused without running them ({first[:200]}); re-save it with tensors "
                             f"only or use a trusted file") from None
        raise UserError(f"{what} {path!r} is corrupt or not a PyTorch file ({first[:200]}); "
                         f"re-download or re-create it") from None


def is_full_disk(error, folder):
    """Whether a failed write ran out of space: errno ENOSPC/EDQUOT, or torch's zip writer's
    "unexpected pos" when the folder has (next to) no free space left."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "unexpected pos" in str(error) or "file write failed" in str(error):
        return True
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def remove_stale_temp_files(folder):
    """Delete temp files atomic_path left behind when a process was killed mid-write (only ours:
    the `.tmp-` prefix); returns their paths. Call it before this run writes into `folder`."""
    stale = sorted(glob.glob(os.path.join(glob.escape(os.fspath(folder)), TEMP_PREFIX + "*")))
    for path in stale:
        os.remove(path)
    return stale
