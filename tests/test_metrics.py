"""metrics.py: metrics.jsonl lines, TensorBoard event files read back, truncation on resume, the --logger
flag, and wandb (a fake module records the calls; a missing package is one clear line)."""
import argparse
import json
import os
import sys
import types

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import cli
import metrics

TRAIN_RECORD = {"step": 100, "epoch": 0, "loss": 0.12, "steps_per_sec": 5.6, "images_per_sec": 700.0,
                "peak_mem_gib": 1.5, "lr": 1e-4}
FID_RECORD = {"step": 200, "fid": 12.3, "eval_num_samples": 1000, "cfg_scale": 1.5}


def read_events(folder):
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def scalar_series(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


def jsonl_lines(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return f.read().splitlines()


def leftover_temp_files(folder):
    return [name for name in os.listdir(folder) if name.startswith(".tmp-")]


# ---- jsonl ----

def test_jsonl_appends_one_json_dumps_line_per_record(tmp_path):
    with metrics.MetricsLog(tmp_path) as log:
        log.log(TRAIN_RECORD)
        log.log(FID_RECORD)
    with metrics.MetricsLog(tmp_path) as log:  # a second run in the same folder appends
        log.log({"step": 300, "loss": 0.1, "note": "text is kept in jsonl"})
    assert jsonl_lines(tmp_path) == [json.dumps(TRAIN_RECORD), json.dumps(FID_RECORD),
                                     json.dumps({"step": 300, "loss": 0.1, "note": "text is kept in jsonl"})]
    assert not os.path.exists(tmp_path / "tensorboard")  # jsonl alone writes nothing else


def test_jsonl_is_always_on(tmp_path):
    log = metrics.MetricsLog(tmp_path, loggers=("tensorboard",))
    assert log.loggers == ("jsonl", "tensorboard")
    log.log({"step": 1, "loss": 2.0})
    log.close()
    assert jsonl_lines(tmp_path) == ['{"step": 1, "loss": 2.0}']


def test_image_rejects_non_uint8_or_bad_shape(tmp_path):
    with metrics.MetricsLog(tmp_path) as log:
        with pytest.raises(ValueError, match="uint8"):
            log.image(1, "samples", np.zeros((4, 4, 3), np.float32))
        with pytest.raises(ValueError, match="channels"):
            log.image(1, "samples", np.zeros((4, 4, 2), np.uint8))


# ---- tensorboard ----

def test_tensorboard_scalars_and_image_read_back(tmp_path):
    grid = np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3)
    with metrics.MetricsLog(tmp_path, loggers=("jsonl", "tensorboard")) as log:
        log.log(TRAIN_RECORD)
        log.log(dict(TRAIN_RECORD, step=110, loss=0.5))
        log.log(FID_RECORD)
        log.image(110, "samples", grid)
    events = read_events(tmp_path / "tensorboard")
    tags = events.Tags()
    assert set(tags["scalars"]) == {"epoch", "loss", "steps_per_sec", "images_per_sec", "peak_mem_gib", "lr",
                                    "fid", "eval_num_samples", "cfg_scale"}  # every numeric field but the step
    assert [(s, round(v, 5)) for s, v in scalar_series(events, "loss")] == [(100, 0.12), (110, 0.5)]
    assert scalar_series(events, "fid") == [(200, pytest.approx(12.3))]
    assert scalar_series(events, "lr") == [(100, pytest.approx(1e-4)), (110, pytest.approx(1e-4))]
    images = events.Images("samples")
    assert [(im.step, im.width, im.height) for im in images] == [(110, 10, 6)]
    assert images[0].encoded_image_string.startswith(b"\x89PNG")


def test_tensorboard_takes_greyscale_images(tmp_path):
    with metrics.MetricsLog(tmp_path, loggers=("tensorboard",)) as log:
        log.image(1, "digits", np.full((8, 5, 1), 200, np.uint8))
    images = read_events(tmp_path / "tensorboard").Images("digits")
    assert [(im.step, im.width, im.height) for im in images] == [(1, 5, 8)]


# ---- truncate_after (resume) ----

def test_truncate_after_drops_later_steps_and_broken_lines(tmp_path):
    lines = ['{"step": 1, "loss": 1.0}', '{"step": 2, "fid": 5.0}', '{"step": 3, "loss": 0.5}',
             '{"loss": 0.4}', '["step", 1]', '{"step": 2, "lo']  # no step, not a dict, cut short by a kill
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    log = metrics.MetricsLog(tmp_path)
    log.truncate_after(2)
    assert jsonl_lines(tmp_path) == lines[:2]
    log.log({"step": 3, "loss": 0.25})
    log.close()
    assert jsonl_lines(tmp_path) == lines[:2] + ['{"step": 3, "loss": 0.25}']
    assert leftover_temp_files(tmp_path) == []


def test_truncate_after_leaves_a_clean_file_untouched_and_a_missing_one_missing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with metrics.MetricsLog(tmp_path) as log:
        log.truncate_after(5)
        assert not path.exists()
        log.log({"step": 4, "loss": 1.0})
        inode = os.stat(path).st_ino
        log.truncate_after(4)
    assert os.stat(path).st_ino == inode  # nothing to drop: not rewritten
    assert jsonl_lines(tmp_path) == ['{"step": 4, "loss": 1.0}']


def test_truncate_after_hides_later_tensorboard_events(tmp_path):
    with metrics.MetricsLog(tmp_path, loggers=("tensorboard",)) as log:  # a run killed after step 3
        for step in (1, 2, 3):
            log.log({"step": step, "loss": float(step)})
        log.image(3, "samples", np.zeros((4, 4, 3), np.uint8))
    with metrics.MetricsLog(tmp_path, loggers=("tensorboard",)) as log:  # resumed from the checkpoint at 1
        log.truncate_after(1)
        log.log({"step": 2, "loss": 20.0})
    events = read_events(tmp_path / "tensorboard")
    assert scalar_series(events, "loss") == [(1, 1.0), (2, 20.0)]
    assert events.Images("samples") == []
    assert [json.loads(line)["step"] for line in jsonl_lines(tmp_path)] == [1, 2]


# ---- the --logger flag ----

def parse(*argv):
    return metrics.add_logger_flag(argparse.ArgumentParser()).parse_args(list(argv))


def test_logger_flag_default_repeat_and_commas():
    args = parse()
    assert args.logger == ("jsonl",) and args.wandb_project == "DiT"
    assert parse("--logger", "tensorboard").logger == ("jsonl", "tensorboard")
    assert parse("--logger", "tensorboard", "--logger", "wandb").logger == ("jsonl", "tensorboard", "wandb")
    assert parse("--logger", "wandb,tensorboard,jsonl").logger == ("jsonl", "wandb", "tensorboard")
    assert parse("--logger", "wandb", "--wandb-project", "mine").wandb_project == "mine"


def test_logger_flag_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        parse("--logger", "tensorboard,mlflow")
    assert "invalid choice: 'tensorboard,mlflow'" in capsys.readouterr().err


def test_check_loggers_normalises_and_rejects_unknown():
    assert metrics.check_loggers("tensorboard, jsonl") == ("jsonl", "tensorboard")
    assert metrics.check_loggers(None) == ("jsonl",)
    with pytest.raises(cli.UserError, match="invalid choice"):
        metrics.check_loggers(["csv"])


# ---- missing optional packages ----

WANDB_MISSING = "--logger wandb needs the wandb package: pip install wandb"


def test_missing_wandb_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail even where it is installed
    for call in (lambda: metrics.check_loggers(["jsonl", "wandb"]),
                 lambda: metrics.MetricsLog(tmp_path, loggers=("wandb",))):
        with pytest.raises(cli.UserError) as info:
            call()
        assert str(info.value) == WANDB_MISSING
    assert metrics.check_loggers(["tensorboard"]) == ("jsonl", "tensorboard")  # others still work
    assert os.listdir(tmp_path) == []  # refused before writing anything


def test_missing_tensorboard_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(cli.UserError) as info:
        metrics.check_loggers(["tensorboard"])
    assert str(info.value) == "--logger tensorboard needs the tensorboard package: pip install tensorboard"


# ---- wandb through a fake module ----

class FakeWandb(types.ModuleType):
    """Stands in for the wandb package and records what it is asked to do."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []

        class Image:
            def __init__(self, array):
                self.array = array

        self.Image = Image

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))

    def log(self, data, step=None):
        self.calls.append(("log", data, step))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    module = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_wandb_receives_init_scalars_and_images_at_their_steps(tmp_path, fake_wandb):
    config = {"model": "DiT-XL/2", "lr": 1e-4}
    log = metrics.MetricsLog(tmp_path, loggers=("wandb",), run_name="my-run", config=config, wandb_project="proj")
    log.log(TRAIN_RECORD)
    log.log(dict(FID_RECORD, note="not a number"))
    log.image(200, "samples", np.full((4, 6, 1), 9, np.uint8))
    log.close()
    log.close()  # a second close does nothing more

    init, *rest = fake_wandb.calls
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert init == ("init", {"project": "proj", "dir": str(tmp_path), "name": "my-run", "config": config,
                             "id": run_id, "resume": "allow"})
    train_scalars = {k: v for k, v in TRAIN_RECORD.items() if k != "step"}
    fid_scalars = {k: v for k, v in FID_RECORD.items() if k != "step"}
    assert rest[:2] == [("log", train_scalars, 100), ("log", fid_scalars, 200)]
    (kind, data, step), finish = rest[2], rest[3:]
    assert (kind, list(data), step) == ("log", ["samples"], 200)
    assert data["samples"].array.shape == (4, 6, 3) and (data["samples"].array == 9).all()
    assert finish == [("finish",)]
    assert len(jsonl_lines(tmp_path)) == 2  # jsonl still written


def test_wandb_resume_reuses_the_run_id_and_names_the_run_after_the_folder(tmp_path, fake_wandb):
    folder = tmp_path / "003-DiT-S-2"
    folder.mkdir()
    metrics.MetricsLog(folder, loggers=("wandb",)).close()
    metrics.MetricsLog(folder, loggers=("wandb",)).close()
    inits = [call[1] for call in fake_wandb.calls if call[0] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] and len(inits[0]["id"]) == 16
    assert inits[0]["name"] == "003-DiT-S-2" and inits[0]["project"] == "DiT"
