"""digits.py: the demo's data and quality figure (real digits score high, noise scores at chance),
and the sampler and block-cache flags reaching `digits.py score`."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import cli
import digits
import sampling
import tiny_dit
from diffusion import samplers

tiny_dit.register()


def test_flags_reach_digits_score(pixel_ckpt, monkeypatch):
    seen = {}

    def fake_generate(ckpt, labels, **kwargs):
        seen.update(kwargs)
        return (np.zeros((len(labels), 8, 8, 1), np.uint8), SimpleNamespace(name="ddim", steps=4),
                sampling.Stats(nfe=4))
    monkeypatch.setattr(sampling, "generate_from_checkpoint", fake_generate)
    monkeypatch.setattr(digits, "DigitScorer", lambda: SimpleNamespace(
        score=lambda images, labels: {"accuracy": 0.0, "frechet_distance": 0.0}))
    digits.main(["score", "--ckpt", pixel_ckpt, "--per-class", "1", "--cache-interval", "3", "--cache-start", "1",
                 "--cache-above", "0.2"])
    assert (seen["cache_interval"], seen["cache_start"], seen["cache_above"]) == (3, 1, 0.2)


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


def test_prepare_refuses_a_folder_of_the_users_own_files(tmp_path, capsys):
    """Their 3/0003.png is a name prepare would write, their cats/ a class it would not: neither is touched."""
    out = tmp_path / "mine"
    (out / "3").mkdir(parents=True)
    (out / "3" / "0003.png").write_bytes(b"the user's own image")
    (out / "cats").mkdir()
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: digits.main(["prepare", "--out", str(out)]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "did not write" in err and "new or empty folder" in err
    assert (out / "3" / "0003.png").read_bytes() == b"the user's own image"
    assert sorted(os.listdir(out)) == ["3", "cats"] and os.listdir(out / "3") == ["0003.png"]


def test_prepare_refuses_files_it_would_not_write_and_a_file_for_the_folder(tmp_path):
    out = tmp_path / "digits"
    digits.prepare(str(out))
    (out / "cats").mkdir()
    (out / "cats" / "tom.png").write_bytes(b"a cat")
    with pytest.raises(cli.UserError, match=r"holds cats/tom\.png, which digits\.py prepare does not write"):
        digits.prepare(str(out))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError, match="--out .* is a file, not a folder"):
        digits.prepare(str(tmp_path / "a_file"))


def test_prepare_finishes_its_own_interrupted_folder_and_clears_its_temp_files(tmp_path):
    """A kill between writing a temp PNG and renaming it: the rerun completes the folder without the
    temp file (which the loaders would otherwise skip, but which must not stay)."""
    out = tmp_path / "digits"
    digits.prepare(str(out))
    os.remove(out / digits.DONE_MARK)
    os.remove(out / "3" / "0003.png")
    (out / "3" / ".tmp-k1ll3d.png").write_bytes((out / "3" / "0013.png").read_bytes())  # complete, not renamed
    digits.prepare(str(out))
    assert (out / digits.DONE_MARK).exists() and (out / "3" / "0003.png").exists()
    assert [name for name in os.listdir(out / "3") if name.startswith(".")] == []
    assert sum(len(os.listdir(out / str(c))) for c in range(10)) == 1797


@pytest.mark.parametrize("size, vae, channels, problem", [(16, "ema", 4, "16 px latent-space (--vae ema) model"),
                                                          (16, "none", 1, "16 px pixel-space model")],
                         ids=["latent", "pixel-16"])
def test_score_refuses_a_checkpoint_of_other_images_before_sampling(tmp_path, capsys, monkeypatch, size, vae,
                                                                    channels, problem):
    import sampling
    import tiny_dit

    def never(*args, **kwargs):
        raise AssertionError("sampled a checkpoint whose images the digit classifier cannot read")

    monkeypatch.setattr(sampling, "generate_from_checkpoint", never)
    ckpt = tmp_path / "other.pt"
    tiny_dit.write_checkpoint(ckpt, image_size=size, vae=vae, in_channels=channels)
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: digits.main(["score", "--ckpt", str(ckpt), "--device", "cpu"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and problem in err and "8x8 pixel-space" in err


def test_score_takes_an_8x8_pixel_checkpoint_on_to_sampling(pixel_ckpt):
    digits.check_digits_checkpoint(pixel_ckpt)  # no error: the classifier reads these samples


def test_digits_score_picks_the_flow_sampler(trained, capsys, monkeypatch):
    monkeypatch.setattr(digits, "DigitScorer", lambda: SimpleNamespace(
        score=lambda images, labels: {"accuracy": 0.0, "frechet_distance": 0.0}))
    monkeypatch.setattr(digits, "NUM_CLASSES", 3)
    digits.main(["score", "--ckpt", trained["flow"], "--per-class", "1"])
    assert capsys.readouterr().out.startswith(f"heun-{samplers.SAMPLERS['heun'].steps} cfg 4.0")
