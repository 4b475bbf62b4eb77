"""The demo's data and quality figure: real digits score high, noise scores at chance."""
import os

import numpy as np
import pytest
from PIL import Image

import cli
import digits


def test_prepare_writes_an_image_folder(tmp_path):
    out = tmp_path / "digits"
    digits.prepare(str(out))
    classes = sorted(c for c in os.listdir(out) if not c.startswith("."))
    assert classes == [str(c) for c in range(10)]
    files = [f for c in classes for f in os.listdir(out / c)]
    assert len(files) == 1797
    image = Image.open(out / "3" / sorted(os.listdir(out / "3"))[0])
    assert image.size == (8, 8) and image.mode == "L"
    digits.prepare(str(out))  # a second call finds the folder complete and writes nothing
    assert len([f for c in classes for f in os.listdir(out / c)]) == 1797


@pytest.mark.slow
def test_quality_figure_real_digits_versus_noise():
    images, labels = digits.load_real_digits()
    fit = np.arange(len(images)) % 2 == 0
    scorer = digits.DigitScorer(fit_indices=np.flatnonzero(fit))
    real = scorer.score(images[~fit], labels[~fit])  # held-out real digits
    assert real["accuracy"] > 0.9
    assert min(real["per_class_accuracy"].values()) > 0.75

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(900, 8, 8), dtype=np.uint8)
    fake_labels = np.repeat(np.arange(10), 90)
    junk = scorer.score(noise, fake_labels)
    assert junk["accuracy"] < 0.25  # chance is 0.1
    assert junk["frechet_distance"] > 5 * real["frechet_distance"]


def test_quality_figure_accepts_channels_last_rgb():
    images, labels = digits.load_real_digits()
    scorer = digits.DigitScorer()
    rgb = np.repeat(images[:200, :, :, None], 3, axis=-1)
    assert scorer.score(rgb, labels[:200])["accuracy"] > 0.95


def test_score_refuses_nothing_to_score_in_one_line_before_sampling(tmp_path, capsys):
    """The checkpoint does not exist: an error about it would mean the check came too late."""
    missing = str(tmp_path / "missing.pt")
    for extra, flag in ((["--per-class", "0"], "--per-class"), (["--batch-size", "0"], "--batch-size"),
                        (["--cfg-scale", "nan"], "--cfg-scale")):
        with pytest.raises(SystemExit) as e:
            cli.run(lambda: digits.main(["score", "--ckpt", missing, *extra]))
        err = capsys.readouterr().err.strip().splitlines()
        # Our one line, or argparse's usage followed by its one error line.
        assert e.value.code == 2 and "error: " in err[-1] and flag in err[-1], err
        assert len(err) == 1 or err[0].startswith("usage:"), err
