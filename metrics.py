"""Training metrics where researchers look: metrics.jsonl always, TensorBoard and Weights & Biases on request.

train.py makes one `MetricsLog` on rank 0 and hands it every record ({"step": 100, "loss": 0.12, ...})
and every sample grid. Each backend gets the same numbers:

- jsonl: one `json.dumps(record)` line per record appended to EXPERIMENT/metrics.jsonl (always on;
  images are not written here, train.py saves them as PNG files);
- tensorboard: each numeric field as a scalar tagged with its name, at the record's step, and the images,
  in event files under EXPERIMENT/tensorboard (`tensorboard --logdir results`);
- wandb: the numeric fields and the images sent to a wandb run kept in EXPERIMENT/wandb; its id is stored in
  EXPERIMENT/wandb_run_id so a resumed training continues the same run.

`--logger` may be repeated or comma-separated: `--logger tensorboard --logger wandb` is the same as
`--logger tensorboard,wandb`. wandb is optional: call `check_loggers` before training starts so a missing
package is reported in one line before any work is done.
"""
import argparse
import json
import numbers
import os
import uuid

import numpy as np

import cli
import files

LOGGERS = ("jsonl", "tensorboard", "wandb")
JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_NAME = "wandb_run_id"


def split_logger_names(text):
    """'tensorboard,wandb' -> ['tensorboard', 'wandb'], each checked against LOGGERS (argparse `type`)."""
    names = [name.strip().lower() for name in str(text).split(",") if name.strip()]
    bad = [name for name in names if name not in LOGGERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(LOGGERS)}; "
                                         f"several may be given comma-separated)")
    return names


def normalize_loggers(names):
    """Loggers as an ordered tuple without repeats, jsonl first (it is always on).

    `names` is a name, a comma-separated string, or a list of either."""
    if isinstance(names, str):
        names = [names]
    flat = ["jsonl"]
    for item in names or ():
        try:
            flat += split_logger_names(item)
        except argparse.ArgumentTypeError as e:
            raise cli.UserError(f"--logger: {e}") from None
    return tuple(dict.fromkeys(flat))


class _AppendLoggers(argparse.Action):
    """--logger given several times accumulates into one flat tuple (argparse's `append` would nest lists)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, normalize_loggers(list(getattr(namespace, self.dest) or ()) + values))


def add_logger_flag(parser):
    """Adds --logger (jsonl, tensorboard, wandb; repeatable or comma-separated) and --wandb-project."""
    parser.add_argument("--logger", type=split_logger_names, action=_AppendLoggers, default=("jsonl",),
                        metavar="{" + ",".join(LOGGERS) + "}",
                        help="where training metrics go: jsonl (metrics.jsonl, always on), tensorboard "
                             "(EXPERIMENT/tensorboard), wandb (needs the wandb package); repeat the flag or "
                             "separate names with commas")
    parser.add_argument("--wandb-project", default="DiT", help="the wandb project of the run (with --logger wandb)")
    return parser


def _import_tensorboard_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's wrapper needs the separate tensorboard package
        raise cli.UserError("--logger tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise cli.UserError("--logger wandb needs the wandb package: pip install wandb") from None
    return wandb


def check_loggers(names):
    """Normalised logger names, after checking each one's package imports; raises cli.UserError if not.

    Call it on every rank before training so a missing package stops all of them at once."""
    names = normalize_loggers(names)
    if "tensorboard" in names:
        _import_tensorboard_writer()
    if "wandb" in names:
        _import_wandb()
    return names


def numeric_fields(record):
    """The fields plotted as scalars: numbers other than the step (bools and strings are not plotted)."""
    return {key: value for key, value in record.items()
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool)}


def as_hwc_rgb(image):
    """A uint8 (H, W, C) array with C in 1, 3, 4 (or (H, W)) as (H, W, 3 or 4): greyscale is repeated
    because TensorBoard's and wandb's image encoders expect colour channels."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"images are logged as uint8 arrays, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"images are logged as (H, W, C) arrays with 1, 3 or 4 channels, got shape {image.shape}")
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def _wandb_run_id(experiment_dir):
    """The experiment's wandb run id, made once and kept in the folder so a resumed training continues it."""
    path = os.path.join(experiment_dir, WANDB_ID_NAME)
    if os.path.isfile(path):
        with open(path) as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    run_id = uuid.uuid4().hex[:16]
    with files.atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(run_id + "\n")
    return run_id


def truncate_jsonl(path, step):
    """Drop records with a step past `step` and lines that do not parse (a line cut short by a kill).

    On resume, what a killed run logged after its last checkpoint would otherwise be logged twice."""
    if not os.path.exists(path):
        return

    def kept(line):
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    with open(path) as f:
        lines = f.readlines()
    keep = [line for line in lines if kept(line)]
    if len(keep) != len(lines):
        with files.atomic_path(path) as tmp, open(tmp, "w") as f:
            f.writelines(keep)


class MetricsLog:
    """One experiment's metrics, written to every chosen logger. Make it on rank 0 only."""

    def __init__(self, experiment_dir, loggers=("jsonl",), run_name=None, config=None, wandb_project="DiT"):
        self.experiment_dir = os.fspath(experiment_dir)
        self.loggers = check_loggers(loggers)
        self.jsonl_path = os.path.join(self.experiment_dir, JSONL_NAME)
        self.tensorboard_dir = os.path.join(self.experiment_dir, TENSORBOARD_DIR)
        self._writer = self._open_tensorboard() if "tensorboard" in self.loggers else None
        self._wandb = None
        if "wandb" in self.loggers:
            self._wandb = _import_wandb()
            self._wandb.init(project=wandb_project, dir=self.experiment_dir,
                             name=run_name or os.path.basename(os.path.abspath(self.experiment_dir)),
                             config=config, id=_wandb_run_id(self.experiment_dir), resume="allow")

    def _open_tensorboard(self, purge_step=None):
        return _import_tensorboard_writer()(log_dir=self.tensorboard_dir, purge_step=purge_step)

    def log(self, record):
        """Write one record: {"step": int, name: value, ...}; numeric fields become scalars."""
        step = int(record["step"])
        with open(self.jsonl_path, "a") as f:  # appended and closed each time: a kill loses at most this line
            f.write(json.dumps(record) + "\n")
        scalars = numeric_fields(record)
        if self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, float(value), global_step=step)
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=step)

    def image(self, step, tag, image):
        """Log a uint8 (H, W, C) image (e.g. a sample grid) under `tag` at `step` (not written to jsonl)."""
        image = as_hwc_rgb(image)
        if self._writer is not None:
            self._writer.add_image(tag, image, global_step=int(step), dataformats="HWC")
        if self._wandb is not None:
            self._wandb.log({tag: self._wandb.Image(image)}, step=int(step))

    def truncate_after(self, step):
        """On resume from `step`: forget what a killed run logged after it.

        metrics.jsonl is rewritten atomically; TensorBoard is reopened with purge_step so its viewer hides
        the old events past `step`. wandb keeps its own history and ignores steps it has seen."""
        truncate_jsonl(self.jsonl_path, step)
        if self._writer is not None:
            self._writer.close()
            self._writer = self._open_tensorboard(purge_step=int(step) + 1)

    def close(self):
        """Flush and close every logger; safe to call twice."""
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
