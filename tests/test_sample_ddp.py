"""sample_ddp.py: 1 and 2 processes (torchrun, gloo) write the same .npz, a resumed run completes
the same set, labels are uniform or balanced, and a folder made with other settings (sampler,
block cache, int8, non-square) is refused."""

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import distributed
import sample_ddp
import sampling
import tiny_dit
import tiny_vae
from conftest import ROOT, cuda_only

tiny_dit.register()


def test_flags_reach_sample_ddp_its_record_and_folder(pixel_ckpt, tmp_path, capsys):
    argv = ["--ckpt", pixel_ckpt, "--device", "cpu", "--num-fid-samples", "3", "--per-proc-batch-size", "2",
            "--sampler", "ddim", "--num-sampling-steps", "4", "--sample-dir", str(tmp_path)]
    plain = sample_ddp.main(argv)
    cached = sample_ddp.main(argv + ["--cache-interval", "2", "--cache-start", "1", "--cache-above", "0.1"])
    assert cached != plain and cached.endswith("-cache-2-from-1-above-0.1.npz")
    with open(cached[:-len(".npz")] + ".json") as f:
        record = json.load(f)
    assert (record["cache_interval"], record["cache_start"], record["cache_above"]) == (2, 1, 0.1)
    assert (np.load(cached)["arr_0"] != np.load(plain)["arr_0"]).any()
    os.remove(cached)  # resuming completes the set from the PNGs, with the same settings
    assert sample_ddp.main(argv + ["--cache-interval", "2", "--cache-start", "1", "--cache-above", "0.1"]) == cached


def test_sample_ddp_loads_model_and_decoder_local_rank_0_first(pixel_ckpt, tmp_path, monkeypatch):
    inside, seen = [], []

    class Recording:
        def __enter__(self):
            inside.append(True)

        def __exit__(self, *exc):
            inside.pop()

    def recorded(function):
        def call(*args, **kwargs):
            seen.append((function.__name__, bool(inside)))
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(distributed, "local_rank0_first", Recording)
    monkeypatch.setattr(sampling, "load_model", recorded(sampling.load_model))
    monkeypatch.setattr(sampling, "load_decoder", recorded(sampling.load_decoder))
    sample_ddp.main(["--ckpt", pixel_ckpt, "--sample-dir", str(tmp_path), "--num-fid-samples", "2",
                     "--per-proc-batch-size", "2", "--num-sampling-steps", "2", "--device", "cpu"])
    assert seen == [("load_model", True), ("load_decoder", True)]


@cuda_only
def test_on_cuda_sample_ddp_labels_are_the_cpus():
    args = argparse.Namespace(global_seed=4, balanced_classes=False)
    cpu_labels, _ = sample_ddp.labels_and_generators(args, 10, range(6), torch.device("cpu"))
    cuda_labels, generators = sample_ddp.labels_and_generators(args, 10, range(6), torch.device("cuda"))
    assert cuda_labels == cpu_labels and all(g.device.type == "cuda" for g in generators)


def test_sample_ddp_records_the_flow_sampler_and_refuses_other_settings(random_flow_ckpt, tmp_path, capsys):
    argv = ["--ckpt", random_flow_ckpt, "--device", "cpu", "--num-fid-samples", "3", "--per-proc-batch-size", "2",
            "--sampler", "sde", "--num-sampling-steps", "3", "--sample-dir", str(tmp_path)]
    npz = sample_ddp.main(argv)
    with open(npz[:-len(".npz")] + ".json") as f:
        record = json.load(f)
    assert (record["sampler"], record["num_sampling_steps"], record["sde_diffusion"], record["atol"]) == (
        "sde", 3, 1.0, None)
    assert np.load(npz)["arr_0"].shape == (3, 8, 8, 3)
    with pytest.raises(SystemExit):
        cli.run(lambda: sample_ddp.main(argv + ["--sde-diffusion", "0.5"]))
    assert "other settings" in capsys.readouterr().err


LAUNCHER = str(ROOT / "tests" / "tiny_dit.py")
SCRIPT = str(ROOT / "sample_ddp.py")
COMMON = ["--device", "cpu", "--num-fid-samples", "7", "--per-proc-batch-size", "2", "--num-sampling-steps", "4"]


@pytest.fixture(scope="module")
def latent_setup(tmp_path_factory):
    """A tiny latent-space checkpoint and the tiny VAE, both as a local folder and under its hub id."""
    root = tmp_path_factory.mktemp("ddp")
    tiny_dit.write_checkpoint(root / "tiny.pt", image_size=32)
    env = {**os.environ, **tiny_vae.hub_cache(root), "OMP_NUM_THREADS": "1"}
    vae_path = os.path.join(root, "hub", "models--stabilityai--sd-vae-ft-ema", "snapshots", tiny_vae.COMMIT)
    return root, env, vae_path


def in_process(root, sample_dir, vae_path):
    """sample_ddp.main as `python sample_ddp.py` runs it, with one thread like each torchrun process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same thread count in every run keeps kernels rounding alike
    try:
        return sample_ddp.main(["--ckpt", str(root / "tiny.pt"), *COMMON, "--vae-path", vae_path,
                                "--sample-dir", str(root / sample_dir)])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single(latent_setup):
    root, _, vae_path = latent_setup
    return in_process(root, "one", vae_path)


def test_one_process_writes_exactly_n_samples_and_settings(single):
    data = np.load(single)
    images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (7, 32, 32, 3)
    assert labels.shape == (7,) and labels.min() >= 0 and labels.max() < 10
    assert images.std() > 1 and not (images[0] == images[1]).all()
    folder = single[:-len(".npz")]
    assert sorted(os.listdir(folder)) == [f"{i:06d}.png" for i in range(7)]
    assert os.path.exists(folder + ".json")


@pytest.mark.slow
def test_two_processes_write_the_same_npz(latent_setup, single):
    """torchrun with 2 gloo processes, the VAE found offline under its hub id."""
    root, env, _ = latent_setup
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", LAUNCHER, SCRIPT,
                    "--ckpt", str(root / "tiny.pt"), *COMMON, "--sample-dir", str(root / "two")],
                   env=env, check=True, cwd=root)
    (two,) = glob.glob(str(root / "two" / "*.npz"))
    a, b = np.load(single), np.load(two)
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])


def test_resumed_run_completes_the_same_set(latent_setup, single):
    root, _, vae_path = latent_setup
    shutil.copytree(os.path.dirname(single), root / "resumed")
    folder = glob.glob(str(root / "resumed" / "*.npz"))[0][:-len(".npz")]
    os.remove(folder + ".npz")
    kept = os.path.join(folder, "000003.png")
    before = os.stat(kept).st_mtime_ns
    for i in (0, 4, 6):
        os.remove(os.path.join(folder, f"{i:06d}.png"))
    resumed = in_process(root, "resumed", vae_path)
    assert os.stat(kept).st_mtime_ns == before  # skipped, not redone
    np.testing.assert_array_equal(np.load(resumed)["arr_0"], np.load(single)["arr_0"])


def test_balanced_classes_and_pixel_space(tmp_path, pixel_ckpt):
    npz = sample_ddp.main(["--ckpt", pixel_ckpt, "--device", "cpu", "--num-fid-samples", "20",
                           "--per-proc-batch-size", "8", "--num-sampling-steps", "2", "--sampler", "ddim",
                           "--balanced-classes", "--sample-dir", str(tmp_path)])
    data = np.load(npz)
    assert data["arr_0"].shape == (20, 8, 8, 3)  # grey samples, stored as RGB for the evaluators
    assert (data["arr_0"][..., 0] == data["arr_0"][..., 2]).all()
    assert np.bincount(data["arr_1"], minlength=10).tolist() == [2] * 10


def test_other_settings_in_the_same_folder_are_refused(tmp_path, pixel_ckpt, capsys):
    argv = ["--ckpt", pixel_ckpt, "--device", "cpu", "--num-fid-samples", "2", "--num-sampling-steps", "2",
            "--sample-dir", str(tmp_path)]
    sample_ddp.main(argv)
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: sample_ddp.main(argv + ["--no-tf32"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "other settings" in err and "precision" in err


def test_rerun_with_other_weights_behind_the_same_path_is_refused(tmp_path, capsys):
    """An interrupted run, then the file at --ckpt replaced (e.g. a newer last.pt): the rerun must not
    fill the gaps with the new weights' samples."""
    ckpt = tmp_path / "last.pt"
    tiny_dit.write_checkpoint(ckpt, image_size=8, vae="none", in_channels=1, seed=0)
    argv = ["--ckpt", str(ckpt), "--device", "cpu", "--num-fid-samples", "3", "--num-sampling-steps", "2",
            "--sample-dir", str(tmp_path / "samples")]
    folder = sample_ddp.main(argv)[:-len(".npz")]
    first_weights = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    os.remove(os.path.join(folder, "000001.png"))  # the run was interrupted here
    tiny_dit.write_checkpoint(ckpt, image_size=8, vae="none", in_channels=1, seed=1)
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: sample_ddp.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "other settings" in err and "ckpt_sha256" in err
    assert not os.path.exists(os.path.join(folder, "000001.png"))
    with open(folder + ".json") as f:
        assert json.load(f).get("ckpt_sha256") == first_weights  # the record still describes the samples


def test_json_of_an_older_version_without_the_hash_is_completed_with_a_warning(tmp_path, pixel_ckpt):
    argv = ["--ckpt", pixel_ckpt, "--device", "cpu", "--num-fid-samples", "2", "--num-sampling-steps", "2",
            "--sample-dir", str(tmp_path)]
    folder = sample_ddp.main(argv)[:-len(".npz")]
    with open(folder + ".json") as f:
        record = json.load(f)
    del record["ckpt_sha256"]
    with open(folder + ".json", "w") as f:
        json.dump(record, f)
    os.remove(os.path.join(folder, "000000.png"))
    with pytest.warns(UserWarning, match="does not record ckpt_sha256"):
        sample_ddp.main(argv)
    assert os.path.exists(os.path.join(folder, "000000.png"))


@pytest.mark.parametrize("extra, expected", [
    (["--cfg-scale", "nan"], ["--cfg-scale", "finite"]),
    (["--image-size", "-8"], ["--image-size", "-8"]),
    (["--image-size", "0"], ["--image-size", "0"]),
    (["--vae-batch-size", "0"], ["--vae-batch-size", "at least 1"]),
    (["--sample-dir", "{file}/samples"], ["--sample-dir", "cannot write", "{file}"]),
])
def test_values_that_would_fail_after_sampling_are_refused_first(tmp_path, capsys, extra, expected):
    """The checkpoint does not exist: an error about it would mean the check came too late."""
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the sample folder should be")
    extra = [x.replace("{file}", str(blocker)) for x in extra]
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: sample_ddp.main(["--ckpt", str(tmp_path / "missing.pt"), "--device", "cpu",
                                         "--sample-dir", str(tmp_path / "out"), *extra]))
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert e.value.code == 2 and len(lines) == 1, lines
    for text in expected:
        assert text.replace("{file}", str(blocker)) in lines[0], lines[0]


def test_a_rerun_remakes_damaged_images_and_names_them(tmp_path, pixel_ckpt, capsys):
    argv = ["--ckpt", pixel_ckpt, "--device", "cpu", "--num-fid-samples", "4", "--num-sampling-steps", "2",
            "--sample-dir", str(tmp_path)]
    first = np.load(sample_ddp.main(argv))["arr_0"]
    folder = glob.glob(str(tmp_path / "*.npz"))[0][:-len(".npz")]
    open(os.path.join(folder, "000001.png"), "wb").close()  # 0 bytes

    Image.new("RGB", (5, 7)).save(os.path.join(folder, "000002.png"))  # another size
    capsys.readouterr()
    again = np.load(sample_ddp.main(argv))["arr_0"]
    err = capsys.readouterr().err
    assert "re-making 2 damaged image(s)" in err and "000001.png (empty)" in err and "000002.png (7x5, not 8x8)" in err
    assert "sampling 2 of 4 images" in err, err
    np.testing.assert_array_equal(again, first)


def test_a_corrupt_settings_record_is_one_line(tmp_path, pixel_ckpt, capsys):
    argv = ["--ckpt", pixel_ckpt, "--device", "cpu", "--num-fid-samples", "2", "--num-sampling-steps", "2",
            "--sample-dir", str(tmp_path)]
    folder = sample_ddp.main(argv)[:-len(".npz")]
    with open(folder + ".json", "w") as f:
        f.write('{"model": "DiT-')  # cut off
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: sample_ddp.main(argv))
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert e.value.code == 2 and len(lines) == 1 and ".json, the record of the samples' settings, is not readable" \
        in lines[0] and "delete it" in lines[0], lines


def test_nan_weights_and_a_huge_cfg_scale_write_no_samples(tmp_path, pixel_ckpt, capsys):
    ckpt = torch.load(pixel_ckpt, weights_only=True)
    ckpt["ema"]["final_layer.linear.weight"][1, 2] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    base = ["--device", "cpu", "--num-fid-samples", "2", "--num-sampling-steps", "2"]
    for extra, words in ((["--ckpt", str(tmp_path / "nan.pt")], "final_layer.linear.weight"),
                         (["--ckpt", pixel_ckpt, "--cfg-scale", "1e30"], "--cfg-scale 1e+30")):
        out = tmp_path / extra[1].replace("/", "_")[-8:]
        with pytest.raises(SystemExit) as e:
            cli.run(lambda: sample_ddp.main([*base, *extra, "--sample-dir", str(out)]))
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and "NaN or infinite" in err, err
        assert not glob.glob(str(out / "*" / "*.png")) and not glob.glob(str(out / "*.npz"))


def test_samples_whose_noise_came_from_another_device_are_refused(tmp_path):
    """CUDA runs draw their noise on the GPU (another stream than the CPU generators): a restart on the
    other kind of device would mix two noise streams in one folder. Records older than the field drew
    on the CPU."""
    folder = str(tmp_path / "samples")
    for earlier in ({"noise_device": "cpu"}, {}):  # {}: a record written before noise_device existed
        with open(f"{folder}.json", "w") as f:
            json.dump({"model": "DiT-XL/2", **earlier}, f)
        sample_ddp.check_same_settings(folder, {"model": "DiT-XL/2", "noise_device": "cpu"}, ("noise_device",))
        with pytest.raises(cli.UserError, match="noise_device"):
            sample_ddp.check_same_settings(folder, {"model": "DiT-XL/2", "noise_device": "cuda"}, ("noise_device",))
    assert "noise_device" in sample_ddp.IMAGE_SETTINGS


def test_sample_ddp_npz_is_n_by_h_by_w(pixel_run, tmp_path):
    _, ckpt = pixel_run
    npz = sample_ddp.main(["--ckpt", ckpt, "--device", "cpu", "--num-fid-samples", "5", "--per-proc-batch-size", "2",
                           "--num-sampling-steps", "3", "--sample-dir", str(tmp_path)])
    assert "-size-8x16-" in os.path.basename(npz)
    arrays = np.load(npz)
    assert arrays["arr_0"].shape == (5, 8, 16, 3) and arrays["arr_0"].dtype == np.uint8
    assert arrays["arr_1"].shape == (5,)
    # A restart into the same folder (the settings, with their [8, 16], read back from JSON) completes it.
    os.remove(glob.glob(os.path.join(npz[:-len(".npz")], "000003.png"))[0])
    assert np.load(sample_ddp.main(["--ckpt", ckpt, "--device", "cpu", "--num-fid-samples", "5",
                                    "--per-proc-batch-size", "2", "--num-sampling-steps", "3",
                                    "--sample-dir", str(tmp_path)]))["arr_0"].shape == (5, 8, 16, 3)


def test_sample_ddp_keeps_int8_samples_apart(pixel_ckpt, tmp_path):
    """int8 samples differ slightly from fp32's (this random model's saturate to the same pixels), so they get
    their own folder and record."""
    import numpy as np

    import sample_ddp

    argv = ["--ckpt", pixel_ckpt, "--device", "cpu", "--num-fid-samples", "2", "--per-proc-batch-size", "2",
            "--num-sampling-steps", "3", "--sample-dir", str(tmp_path)]
    plain, int8 = sample_ddp.main(argv), sample_ddp.main(argv + ["--quantize", "int8"])
    assert int8 == plain[:-len(".npz")] + "-int8.npz"
    cached = sample_ddp.main(argv + ["--quantize", "int8", "--cache-interval", "2"])  # int8 blocks reused
    assert cached == plain[:-len(".npz")] + "-cache-2-from-0-int8.npz"
    for path, quantize in ((plain, "none"), (int8, "int8")):
        with open(path[:-len(".npz")] + ".json") as f:
            assert json.load(f)["quantize"] == quantize
    images = [np.load(path)["arr_0"].astype(np.float64) for path in (plain, int8)]
    assert images[0].shape == images[1].shape and np.abs(images[0] - images[1]).mean() < 0.05 * 255
