"""Atomic file writes: a crash never leaves a half-written checkpoint, shard or image that
looks complete. Write to a temporary file in the same folder, then rename over the target.

Also the checks around files, each a one-line error: a missing path or a folder where a file is
read, an output path that is a folder (or a file where a folder belongs), and a checkpoint that is
corrupt as opposed to one that weights_only refuses for the Python objects it holds."""
import contextlib
import errno
import glob
import json
import os
import pickle
import pickletools
import shutil
import tempfile
import zipfile

import torch

from errors import UserError

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


def check_input_file(path, what):
    """Refuse a missing path or a folder where a file is read, naming which of the two it is."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path!r} is a folder, not a file; give the path of the file itself")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist; check the path")
    return path


def check_output_file(path, what):
    """Refuse, before any work, a file to be written whose path is a folder or lies under a file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path!r} is a folder, not a file; give the path of a file (inside that "
                                f"folder if you like)")
    _check_parents_are_folders(path, what)


def check_output_folder(path, what):
    """Refuse, before any work, a folder to be written whose path is a file or lies under one."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{what} {path!r} is a file, not a folder; give a new or existing folder")
    _check_parents_are_folders(path, what)


def _check_parents_are_folders(path, what):
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"{what} {path!r} lies under {parent!r}, which is a file; choose another path")


# How much of a file is read to tell a pickle from random bytes (torch's data.pkl is kilobytes).
PICKLE_PROBE_BYTES = 64 << 20


def _first_pickle(path):
    """The bytes torch.load unpickles first: data.pkl inside a zip checkpoint, else the file's start."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            if name is None:
                return b""
            with z.open(name) as f:
                return f.read(PICKLE_PROBE_BYTES)
    with open(path, "rb") as f:
        return f.read(PICKLE_PROBE_BYTES)


def is_well_formed_pickle(path):
    """Whether the file holds a complete pickle (opcodes read up to STOP, none run): a checkpoint that
    weights_only refuses for what it holds, rather than random bytes, an HTML page or a cut-off file."""
    try:
        opcodes = sum(1 for _ in pickletools.genops(_first_pickle(path)))
    except Exception:  # pickletools raises ValueError for bad opcodes and truncation; zipfile its own
        return False
    return opcodes > 1  # more than a lone STOP, which one random byte in 256 would be


def load_torch(path, what="checkpoint", mmap=False, fix="re-download or re-save it"):
    """torch.load(weights_only=True) with one-line errors for missing, corrupt or unsafe files; fix:
    what the error tells the user to do about a corrupt file. mmap: map a zip-format file's tensors
    from the page cache instead of reading them into this process's memory (older, non-zip files
    are read)."""
    path = check_input_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError here
        text = str(e).strip()
        lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(e).__name__]
        if isinstance(e, pickle.UnpicklingError) and is_well_formed_pickle(path):
            first = next((line for line in lines if "Unsupported" in line), lines[0])
            raise UserError(f"{what} {path!r} holds pickled Python objects beyond tensors and plain values, "
                            f"and was refused without running them ({first[:200]}); re-save it with tensors "
                            f"only or use a trusted file") from None
        # the weights-only unpickler's complaint about a random opcode would only mislead here
        detail = "" if isinstance(e, pickle.UnpicklingError) else f": {lines[0][:200]}"
        raise UserError(f"{what} {path!r} is not a readable PyTorch file (truncated or corrupt{detail}); "
                        f"{fix}") from None


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
