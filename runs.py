"""The experiment folders train.py writes (results/NNN-MODEL/): their numbering, the checkpoint a
`--resume` continues and where, the data a run was trained on (compared on a resume), the lock
that keeps a second run out of a folder, and the log. train.py is the only caller; the rules are
in docs/training.md ("What a run keeps")."""
import atexit
import dataclasses
import glob
import itertools
import logging
import os
import re
import socket
import sys
import time

import checkpoint
import cli
import data
import download
from errors import first_line

def model_string(args):
    return args.model.replace("/", "-")


def experiment_dirs(args):
    """This model's experiment folders (every model's when --model is not given), oldest first (by
    number: 999 comes before 1000)."""
    model = re.escape(model_string(args)) if args.model else r"DiT-.+"
    pattern = re.compile(r"^(\d{3,})-" + model + "$")
    if not os.path.isdir(args.results_dir):
        return []
    found = [(int(m.group(1)), d) for d in os.listdir(args.results_dir) if (m := pattern.match(d))]
    return [os.path.join(args.results_dir, d) for _, d in sorted(found)]


def checkpoints_in(experiment):
    return sorted(glob.glob(os.path.join(glob.escape(experiment), "checkpoints", "[0-9]" * 7 + ".pt")))


def new_experiment_dir(args):
    try:
        os.makedirs(args.results_dir, exist_ok=True)
        used = [int(d.split("-")[0]) for d in os.listdir(args.results_dir) if re.match(r"^\d+-", d)]
        path = os.path.join(args.results_dir, f"{max(used, default=-1) + 1:03d}-{model_string(args)}")
        os.makedirs(path)
    except OSError as e:
        raise cli.UserError(f"cannot create an experiment folder in --results-dir {args.results_dir!r} "
                            f"({e.strerror or e}); pass a writable folder") from None
    return path


@dataclasses.dataclass
class Resume:
    """What --resume chose: a checkpoint (loaded) and the folder to continue in (None: a new one)."""
    path: str = None
    ckpt: dict = None
    experiment_dir: str = None
    note: str = ""


def find_resume(args):
    """The checkpoint to resume and where to continue; run on rank 0 only. A resume on other data than
    the checkpoint's is refused unless --allow-data-change (check_same_data)."""
    resume = pick_resume(args)
    if resume.ckpt is not None:
        check_same_data(args, resume)
    return resume


def pick_resume(args):
    if args.resume is None:
        return Resume()
    if args.resume == "auto":
        return find_latest_readable(args)
    if not os.path.isfile(args.resume):
        raise cli.UserError(f"--resume {args.resume!r} does not exist; pass a checkpoint file or auto")
    ckpt = checkpoint.load_train(args.resume)
    folder = os.path.dirname(os.path.abspath(args.resume))
    if os.path.basename(folder) != "checkpoints":
        return Resume(args.resume, ckpt, None, "it is not in an experiment folder")
    experiment = os.path.dirname(folder)
    later = [p for p in checkpoints_in(experiment) if step_of(p) > ckpt["train_steps"]]
    if later:  # continuing there would overwrite or prune the first run's later work
        return Resume(args.resume, ckpt, None, f"{experiment} holds {len(later)} later checkpoint(s), kept as they are")
    return Resume(args.resume, ckpt, experiment)


def data_identity(args, dataset=None):
    """What data this run reads: its folder, image count and class names (an image folder's, or as the
    features' metadata records them). Recorded in the checkpoints' args (log_start), compared on a
    resume. dataset: the one built (else the folder is listed). An image folder counts its image files,
    readable or not, so that the listing and the built data set (which drops unreadable ones) agree."""
    if args.feature_path:
        meta = dataset.meta if dataset is not None else data.FeatureShards.read_meta(args.feature_path)
        return {"path": os.path.realpath(args.feature_path), "images": meta.get("num_images"),
                "classes": meta.get("classes")}
    if dataset is None:  # a listing only: no image is read
        dataset = data.ImageFolder(args.data_path, args.image_size or 256, in_memory=False, quiet=True)
    return {"path": os.path.realpath(args.data_path), "images": dataset.listed, "classes": list(dataset.classes)}


def describe_data(identity):
    classes = identity.get("classes") or []
    names = ", ".join(classes[:4]) + (", ..." if len(classes) > 4 else "")
    return f"{identity.get('path')} ({identity.get('images')} images, {len(classes)} classes: {names})"


def check_same_data(args, resume):
    """Refuse (or, with --allow-data-change, note) a resume whose checkpoint was trained on other data.
    Checkpoints written before the data was recorded are not compared."""
    recorded = (resume.ckpt.get("args") or {}).get("data_identity")
    if not recorded:
        return
    current = data_identity(args)
    if recorded == current:
        return
    text = (f"--resume {resume.path} was trained on {describe_data(recorded)}, but this run reads "
            f"{describe_data(current)}")
    if not args.allow_data_change:
        raise cli.UserError(f"{text}; pass the same data, or --allow-data-change to continue on the new data")
    print(f"note: {text}; continuing on the new data (--allow-data-change)", file=sys.stderr)


def find_latest_readable(args):
    """--resume auto: the newest checkpoint that loads, falling back past truncated ones."""
    for experiment in reversed(experiment_dirs(args)):
        skipped = []
        for path in reversed(checkpoints_in(experiment)):
            try:
                ckpt = checkpoint.load_train(path)
            except cli.UserError as e:
                print(f"warning: skipping {path}: {first_line(e)}", file=sys.stderr)
                skipped.append(path)
                continue
            note = f"newer checkpoint(s) could not be read: {', '.join(skipped)}" if skipped else ""
            return Resume(path, ckpt, None if skipped else experiment, note)
    return Resume()


def step_of(path):
    return int(os.path.basename(path)[:7])


def make_logger(experiment_dir, rank):
    logger = logging.getLogger("dit.train")
    logger.handlers.clear()
    logger.propagate = False
    if rank == 0:
        logger.setLevel(logging.INFO)
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        log_file = logging.FileHandler(os.path.join(experiment_dir, "log.txt"))
        for handler in (logging.StreamHandler(sys.stdout), log_file):
            handler.setFormatter(fmt)
            logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


LOCK_FILE = "run.lock"


def lock_experiment(folder):
    """Take the experiment folder for this process (rank 0), so that two runs (two `--resume auto`)
    never write into one folder: an exclusive lock file holding the owner's host and pid, removed at
    exit. A lock whose process has ended on this host (killed: nothing removed it) is taken over,
    saying so; one held by a live process, or by another host, is refused in one line."""
    path = os.path.join(folder, LOCK_FILE)
    mine = f"{socket.gethostname()} {os.getpid()}\n"
    for attempt in itertools.count():
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = read_lock(path)
            if owner is None:  # gone meanwhile, or just created and not yet written: look again shortly
                if attempt > 20 and os.path.exists(path):  # its writer died between the two
                    print(f"taking over {path}: it names no process", file=sys.stderr)
                    os.remove(path)
                time.sleep(0.1)
                continue
            host, pid = owner
            if host == socket.gethostname() and pid == os.getpid():
                os.remove(path)  # an earlier run of this process (train.main called again from Python)
                continue
            if host == socket.gethostname() and not download.process_alive(pid):
                print(f"taking over {path}: its run (pid {pid} on this host) has ended without removing it",
                      file=sys.stderr)
                os.remove(path)
                continue
            where = "on this host" if host == socket.gethostname() else f"on host {host}"
            raise cli.UserError(f"{folder} is in use by another training run (pid {pid} {where}, lock file {path}); "
                                f"wait for it to finish, or delete the lock file if that run is gone")
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        atexit.register(release_lock, path, mine)
        return path


def read_lock(path):
    """(host, pid) of a lock file, None when it is gone or not yet written."""
    try:
        with open(path) as f:
            host, pid = f.read().split()
        return host, int(pid)
    except (FileNotFoundError, ValueError):
        return None


def release_lock(path, mine):
    try:
        with open(path) as f:
            if f.read() == mine:
                os.remove(path)
    except FileNotFoundError:
        pass
