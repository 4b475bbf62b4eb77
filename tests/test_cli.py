"""cli.py: image sizes (N or HxW) in every script, image conversion, class labels, and the one-line
error runner."""

import argparse

import numpy as np
import pytest
import torch

import cli
import extract_features
import sample
import sample_ddp
import tiny_dit
import train
from conftest import MODEL, run_main

tiny_dit.register()


def test_to_uint8_values_and_layout():
    images = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).reshape(1, 1, 2, 3).repeat(2, 3, 1, 1)
    images[1] *= -1
    out = cli.to_uint8(images)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (2, 2, 3, 3)  # N, H, W, C
    # 127.5 x + 128, clamped to [0, 255], then truncated (as the original sample_ddp.py)
    assert out[0, :, :, 0].ravel().tolist() == [0, 0, 128, 191, 255, 255]
    assert out[1, :, :, 2].ravel().tolist() == [255, 255, 128, 64, 0, 0]
    assert np.array_equal(cli.to_uint8(images.to(torch.bfloat16)), out)  # half precision is converted first


def test_parse_class_labels_forms():
    assert cli.parse_class_labels("207 360 387", 1000) == [207, 360, 387]
    assert cli.parse_class_labels("207,360", 1000) == [207, 360]
    assert cli.parse_class_labels(" 1, 2 ,3 ", 10) == [1, 2, 3]
    assert cli.parse_class_labels(5, 10) == [5]
    assert cli.parse_class_labels("0 9", 10) == [0, 9]  # both ends of the range
    assert cli.parse_class_labels("", 10) == []  # callers decide what an empty list means


def test_parse_class_labels_errors():
    for text, bad in (("10", 10), ("3 -1", -1), ("1000", 1000)):
        num_classes = 1000 if bad == 1000 else 10
        with pytest.raises(cli.UserError, match=rf"class label {bad} is out of range: labels must be in "
                                                rf"\[0, {num_classes - 1}\]"):
            cli.parse_class_labels(text, num_classes)
    for text in ("cat dog", "1.5", "3;4"):
        with pytest.raises(cli.UserError, match="must be integers separated by spaces or commas"):
            cli.parse_class_labels(text, 10)


# ------------------------------------------------------------------ cli.run: one line for the user, tracebacks for bugs
@pytest.mark.parametrize("error", [cli.UserError("--lr -1 is out of range"), FileNotFoundError("no such file x.pt"),
                                   OSError(28, "No space left on device"), PermissionError(13, "Permission denied")])
def test_run_shortens_user_and_environment_errors(error, capsys):
    def main():
        raise error

    with pytest.raises(SystemExit) as e:
        cli.run(main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("error", [ValueError("mat1 and mat2 shapes cannot be multiplied"), RuntimeError("boom"),
                                   KeyError("weight"), OSError(5, "Input/output error")])
def test_run_lets_bugs_keep_their_traceback(error):
    def main():
        raise error

    with pytest.raises(type(error)):  # propagates: Python prints the whole traceback
        cli.run(main)


def test_run_names_cuda_out_of_memory(capsys):
    def main():
        raise cli.OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(SystemExit):
        cli.run(main)
    err = capsys.readouterr().err
    assert "ran out of memory" in err and "batch size" in err and err.count("\n") == 1, err


# ------------------------------------------------------------------ --image-size N or HxW
@pytest.mark.parametrize("text, size", [("256", 256), ("256x384", [256, 384]), ("384x256", [384, 256]),
                                        ("64X64", 64), (" 8x16 ", [8, 16])])
def test_image_size_parses_n_and_height_by_width(text, size):
    assert cli.image_size(text) == size
    assert cli.height_width(size) == ((size, size) if isinstance(size, int) else tuple(size))
    assert cli.image_size(cli.size_text(size)) == size


@pytest.mark.parametrize("text", ["256x", "x384", "abc", "256x384x3", "0", "0x8", "8x0", "-8", "2.5", "256*384", ""])
def test_bad_image_sizes_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="image size|at least 1"):
        cli.image_size(text)


@pytest.mark.parametrize("script", [train.main, sample.main, sample_ddp.main, extract_features.main])
def test_bad_image_size_is_one_clear_line_in_every_script(script, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: script(["--image-size", "256x"]))
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert e.value.code == 2 and len(errors) == 1, errors
    assert "--image-size" in errors[0] and "height x width" in errors[0] and "256x384" in errors[0], errors[0]


def test_latent_sizes_must_divide_by_eight(tmp_path, capsys):
    err = run_main(["--model", MODEL, "--image-size", "256x260", "--data-path", str(tmp_path)], capsys)
    assert err.startswith("error: --image-size 256x260 is not divisible by 8") and err.count("\n") == 1, err
