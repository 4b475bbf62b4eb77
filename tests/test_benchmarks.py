"""benchmarks/ scripts without a GPU: bench_gpu.py's data-sheet peak found from the names torch gives
real cards, the precision that follows the card, and its tiny CPU mode; bucket_digits.py's canvases
(each in its own bucket, the digit where it is scored) and a tiny run of the study."""

import json
import subprocess
import sys

import numpy as np
import pytest

import cli
from conftest import ROOT, subprocess_env

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_gpu  # noqa: E402  (after the path is set)
import bucket_digits  # noqa: E402
import data  # noqa: E402


@pytest.mark.parametrize("device_name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0),  # SXM5
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),  # not the SXM's 989
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA L40", 181.0),  # not the L4's 121 (nor, as before, 121 read off "L4" inside "L40")
    ("NVIDIA L4", 121.0),
    ("Tesla V100-SXM2-16GB", 125.0),
    ("Tesla V100-PCIE-32GB", 112.0),
    ("Tesla V100S-PCIE-32GB", 130.0),
    ("Tesla T4", 65.0),
    ("NVIDIA GeForce RTX 4090", 165.2),
])
def test_peak_of_named_cards(device_name, tflops):
    assert bench_gpu.find_peak_tflops(device_name) == tflops


@pytest.mark.parametrize("device_name", ["NVIDIA A10G", "NVIDIA GeForce RTX 4090 D", "NVIDIA GeForce RTX 3090",
                                         "Tesla V100-SXM3-32GB", "NVIDIA RTX 6000 Ada Generation"])
def test_cards_without_a_sheet_figure_here_are_measured_not_guessed(device_name):
    assert bench_gpu.find_peak_tflops(device_name) is None


def test_every_table_key_finds_itself():
    for key, value in bench_gpu.PEAK_TFLOPS.items():
        assert bench_gpu.find_peak_tflops(f"NVIDIA {key}") == value, key


@pytest.mark.parametrize("asked, device_type, capability, chosen", [
    (None, "cuda", (9, 0), "bf16"), (None, "cuda", (8, 0), "bf16"),
    (None, "cuda", (7, 0), "fp16"), (None, "cuda", (7, 5), "fp16"),  # V100, T4: no bf16 tensor cores
    (None, "cpu", None, "fp32"), ("fp16", "cuda", (7, 0), "fp16"), ("bf16", "cuda", (8, 9), "bf16"),
    ("bf16", "cpu", None, "bf16"),
])
def test_precision_follows_the_card(asked, device_type, capability, chosen):
    assert bench_gpu.choose_precision(asked, device_type, capability) == chosen


def test_bf16_asked_on_a_card_without_bf16_tensor_cores_is_refused():
    with pytest.raises(cli.UserError, match=r"compute capability 7\.0\) has no bf16 tensor cores.*--precision fp16"):
        bench_gpu.choose_precision("bf16", "cuda", (7, 0))


@pytest.mark.slow
def test_bench_gpu_tiny_cpu_mode(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--device", "cpu", "--models", "DiT-S/8",
                             "--steps", "2", "--batch-size", "2", "--sample-batch-size", "2", "--ddpm-steps", "3",
                             "--dpm-steps", "5", "--json", str(out)], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["model"] == "DiT-S/8" and row["train_images_per_sec"] > 0 and row["peak_memory_gib"] > 0
    assert row["mfu"] > 0 and row["precision"] == "fp32" and not row["compile"]  # the CPU defaults
    assert row["sample_images_per_sec"]["ddpm-3"] > 0 and row["sample_images_per_sec"]["dpm-solver-5"] > 0
    assert "DiT-S/8" in result.stdout and "MFU" in result.stdout


@pytest.mark.parametrize("height, width", bucket_digits.BUCKETS)
def test_bucket_digits_scores_the_region_where_the_canvas_holds_the_digit(height, width):
    digit = np.random.default_rng(0).integers(1, 256, (8, 8), dtype=np.uint8)
    image = bucket_digits.centred(digit, height, width)
    assert image.shape == (height, width) and image.sum() == digit.sum()  # black margins
    np.testing.assert_array_equal(bucket_digits.centre_region(image[None])[0], digit)


@pytest.mark.slow
def test_bucket_digits_tiny_run(tmp_path):
    """Two training steps and one sample per class: the canvases land in their own buckets, and the
    study writes its figure and an accuracy for each model and size (one per class: the figure's tiles)."""
    result = subprocess.run([sys.executable, "benchmarks/bucket_digits.py", "--steps", "2", "--per-class", "1",
                             "--out", str(tmp_path), "--figure", str(tmp_path / "figure.png")], cwd=ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    canvases = data.BucketedImages(str(tmp_path / "canvases"), bucket_digits.BUCKETS, channels=1)
    written = [tuple(map(int, path[:-len(".png")].rsplit("-", 1)[1].split("x"))) for path in canvases.paths]
    assert len(written) == 3 * 1797 and sorted(set(written)) == sorted(bucket_digits.BUCKETS)
    assert [bucket_digits.BUCKETS[b] for b in canvases.bucket_of.tolist()] == written  # each canvas, its own bucket
    accuracy = json.loads((tmp_path / "accuracy.json").read_text())
    assert len(accuracy) == 2 and all(sorted(sizes) == ["16x8", "8x16", "8x8"] for sizes in accuracy.values())
    assert all(0 <= value <= 1 for sizes in accuracy.values() for value in sizes.values())
    assert (tmp_path / "figure.png").stat().st_size > 0
