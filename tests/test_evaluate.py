"""evaluate.py: metric definitions on constructed inputs, ADM-format checks, caching, and the real Inception
loading + hook path end to end on random stand-in weights (offline)."""
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.metrics import pairwise_distances
from sklearn.neighbors import NearestNeighbors

import cli
import evaluate
from conftest import ROOT
from inception_stub import TinyFeatures, write_fake_inception_weights

CLOSED_URL = "http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth"


def images(n, seed=0, size=16, low=0, high=256, channels=3):
    return np.random.default_rng(seed).integers(low, high, (n, size, size, channels), dtype=np.uint8)


def write_batch(path, arr=None, **arrays):
    if arr is not None:
        arrays["arr_0"] = arr
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture(scope="session")
def fake_torch_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("torch_home")
    write_fake_inception_weights(str(home))
    return str(home)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty TORCH_HOME and an unreachable weights URL: any download attempt fails at once."""
    home = tmp_path / "empty_torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    import pytorch_fid.inception
    monkeypatch.setattr(pytorch_fid.inception, "FID_WEIGHTS_URL", CLOSED_URL)
    return home


def run_main(argv, capsys):
    """evaluate.main as the command line runs it; returns (exit code, stderr)."""
    with pytest.raises(SystemExit) as exc:
        cli.run(lambda: evaluate.main(argv))
    return exc.value.code, capsys.readouterr().err


# --- FID -------------------------------------------------------------------------------------


def test_fid_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert evaluate.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)
    # the same rotation of both Gaussians changes no distance, but makes the covariances full
    q = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    rotated = evaluate.frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-7)
    assert evaluate.frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="differ in shape"):
        evaluate.frechet_distance(mu1, np.diag(v1), mu2[:5], np.diag(v2[:5]))


def test_fid_offsets_a_singular_product(monkeypatch):
    real_sqrtm, seen = scipy.linalg.sqrtm, []

    def first_call_fails(m):
        seen.append(m.copy())
        return np.full_like(m, np.nan) if len(seen) == 1 else real_sqrtm(m)

    monkeypatch.setattr(scipy.linalg, "sqrtm", first_call_fails)
    s1, s2 = np.diag([1.0, 2.0, 0.0]), np.diag([3.0, 0.5, 0.0])
    with pytest.warns(UserWarning, match="singular"):
        fid = evaluate.frechet_distance(np.zeros(3), s1, np.ones(3), s2)
    offset = np.eye(3) * evaluate.FID_EPS
    np.testing.assert_allclose(seen[1], (s1 + offset) @ (s2 + offset))
    expected = 3 + (1 + 3 - 2 * np.sqrt(3)) + (2 + 0.5 - 2)
    assert fid == pytest.approx(expected, abs=1e-5)


def test_fid_imaginary_parts(monkeypatch):
    s = np.eye(2)
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: m + 1e-6j)  # rounding-size: dropped
    assert evaluate.frechet_distance(np.zeros(2), s, np.zeros(2), s) == pytest.approx(0, abs=1e-9)
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: m + 0.5j * np.eye(2))
    with pytest.raises(ValueError, match="imaginary part of 0.5"):
        evaluate.frechet_distance(np.zeros(2), s, np.zeros(2), s)


# --- Inception Score -------------------------------------------------------------------------


def test_inception_score_constructed_logits():
    assert evaluate.inception_score(np.zeros((100, 10))) == pytest.approx(1.0)
    one_hot = 1e4 * np.eye(8)[np.arange(40) % 8]  # confident and evenly spread over 8 classes
    assert evaluate.inception_score(one_hot) == pytest.approx(8.0)
    assert evaluate.inception_score(one_hot[:20][np.arange(20) % 8 < 2]) == pytest.approx(2.0)
    # ADM averages over consecutive splits of 5,000: one class, then four classes -> (1 + 4) / 2
    labels = np.concatenate([np.zeros(5000, int), np.arange(5000) % 4])
    assert evaluate.inception_score(1e4 * np.eye(4)[labels]) == pytest.approx(2.5)
    assert evaluate.inception_score(1e4 * np.eye(4)[labels], split_size=10000) != pytest.approx(2.5)


# --- precision and recall --------------------------------------------------------------------


def line(xs):
    return np.stack([np.asarray(xs, np.float32), np.zeros(len(xs), np.float32)], 1)


def test_manifold_radii_exclude_the_point_itself():
    radii = evaluate.manifold_radii(line(range(20)), k=3).numpy()
    # neighbours of an inner point at 1, 1, 2 -> 3rd is 2 away; an end's at 1, 2, 3 (squared distances)
    np.testing.assert_array_equal(radii, [9, 4] + [4] * 16 + [4, 9])


@pytest.mark.parametrize("batch_size", [3, 10000])
def test_precision_recall_constructed_sets(batch_size):
    ref = line(range(20))
    # five samples among ref points 0..4, five far away: half the samples are real-looking (precision 0.5);
    # their balls (radii 3, 2, 2, 2, 3 around 0.5..4.5) reach ref points 0..7 only (recall 8/20)
    samples = line([0.5, 1.5, 2.5, 3.5, 4.5, 1000, 1001, 1002, 1003, 1004])
    p, r = evaluate.precision_recall(ref, samples, k=3, batch_size=batch_size)
    assert (p, r) == (0.5, pytest.approx(0.4))


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(70, 5)).astype(np.float32)
    samples = (rng.normal(size=(50, 5)) * 0.7 + 0.6).astype(np.float32)
    ref_r = NearestNeighbors(n_neighbors=4).fit(ref).kneighbors(ref)[0][:, 3]
    sam_r = NearestNeighbors(n_neighbors=4).fit(samples).kneighbors(samples)[0][:, 3]
    d = pairwise_distances(ref, samples)
    expected = (d <= ref_r[:, None]).any(0).mean(), (d <= sam_r[None, :]).any(1).mean()
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    for batch_size in (7, 10000):
        assert evaluate.precision_recall(ref, samples, batch_size=batch_size) == pytest.approx(expected)
    with pytest.raises(ValueError, match="more than 3"):
        evaluate.precision_recall(ref[:3], samples)


# --- compute_metrics with a stand-in feature extractor ---------------------------------------


def test_same_batch_scores_perfectly(tmp_path):
    ref = write_batch(tmp_path / "ref.npz", images(30))
    out = evaluate.compute_metrics(ref, images(30), feature_extractor=TinyFeatures(cache_key=None))
    assert set(out) == {"fid", "sfid", "inception_score", "precision", "recall"}
    assert out["fid"] == pytest.approx(0, abs=1e-6) and out["sfid"] == pytest.approx(0, abs=1e-6)
    assert out["precision"] == 1 and out["recall"] == 1
    assert out["inception_score"] > 1


def test_metrics_follow_the_definitions(tmp_path):
    ref_images, sample_images = images(40, seed=1), images(30, seed=2, low=60)
    ref = write_batch(tmp_path / "ref.npz", ref_images)
    extractor = TinyFeatures(cache_key=None)
    out = evaluate.compute_metrics(ref, sample_images, feature_extractor=extractor)
    f_ref, f_sam = (TinyFeatures()(torch.from_numpy(x)) for x in (ref_images, sample_images))
    f_ref, f_sam = ({k: v.numpy().astype(np.float64) for k, v in f.items()} for f in (f_ref, f_sam))

    def fid(a, b):
        return evaluate.frechet_distance(a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T))

    assert out["fid"] == pytest.approx(fid(f_ref["pool"], f_sam["pool"]), rel=1e-5) and out["fid"] > 1
    assert out["sfid"] == pytest.approx(fid(f_ref["spatial"], f_sam["spatial"]), rel=1e-5)
    assert out["inception_score"] == pytest.approx(evaluate.inception_score(f_sam["logits"]), rel=1e-5)
    assert (out["precision"], out["recall"]) == pytest.approx(evaluate.precision_recall(f_ref["pool"], f_sam["pool"]))
    # same numbers with the samples in an npz, and only what is asked for
    sam = write_batch(tmp_path / "sam.npz", sample_images)
    some = evaluate.compute_metrics(ref, sam, metrics=("fid", "recall"), feature_extractor=extractor)
    assert some == pytest.approx({"fid": out["fid"], "recall": out["recall"]})
    with pytest.raises(ValueError, match="unknown metric 'kid'"):
        evaluate.compute_metrics(ref, sam, metrics=("fid", "kid"), feature_extractor=extractor)


def test_reference_statistics_are_used_as_they_are(tmp_path):
    sample_images = images(20, seed=3)
    extractor = TinyFeatures(cache_key=None)
    f_sam = extractor(torch.from_numpy(sample_images))["pool"].numpy().astype(np.float64)
    mu, sigma = np.full(16, 0.5), np.eye(16) * 2
    expected = evaluate.frechet_distance(mu, sigma, f_sam.mean(0), np.cov(f_sam.T))
    # with images too: FID from the stored statistics, precision/recall from the images
    ref = write_batch(tmp_path / "ref.npz", images(25, seed=4), mu=mu, sigma=sigma)
    out = evaluate.compute_metrics(ref, sample_images, metrics=("fid", "precision"), feature_extractor=extractor)
    assert out["fid"] == pytest.approx(expected, rel=1e-6) and 0 <= out["precision"] <= 1
    # statistics only: the samples are the only images the network sees
    stats_only = write_batch(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    extractor.images_seen = 0
    out = evaluate.compute_metrics(stats_only, sample_images, metrics=("fid",), feature_extractor=extractor)
    assert out["fid"] == pytest.approx(expected, rel=1e-6) and extractor.images_seen == 20
    for metrics, problem in ((("recall",), "precision and recall need"), (("sfid",), "no mu/sigma")):
        with pytest.raises(ValueError, match=problem):
            evaluate.compute_metrics(stats_only, sample_images, metrics=metrics, feature_extractor=extractor)


def test_npz_variants_read_alike(tmp_path):
    ref_images, sample_images = images(9, seed=13), images(7, seed=14)
    ref = write_batch(tmp_path / "ref.npz", ref_images)
    extractor = TinyFeatures(cache_key=None)
    expected = evaluate.compute_metrics(ref, sample_images, batch_size=4, feature_extractor=extractor)
    np.savez_compressed(tmp_path / "compressed.npz", sample_images)
    np.savez(tmp_path / "fortran.npz", np.asfortranarray(sample_images))
    for name in ("compressed.npz", "fortran.npz"):
        got = evaluate.compute_metrics(ref, str(tmp_path / name), batch_size=4, feature_extractor=extractor)
        assert got == pytest.approx(expected), name


def test_grey_images_are_scored_as_rgb(tmp_path):
    ref = write_batch(tmp_path / "ref.npz", images(12, seed=5))
    grey = images(10, seed=6, channels=1)
    extractor = TinyFeatures(cache_key=None)
    out_grey = evaluate.compute_metrics(ref, grey, feature_extractor=extractor)
    out_rgb = evaluate.compute_metrics(ref, np.repeat(grey, 3, axis=3), feature_extractor=extractor)
    assert out_grey == pytest.approx(out_rgb)


def test_statistics_are_cached_per_file(tmp_path):
    ref = write_batch(tmp_path / "ref.npz", images(20, seed=7))
    sam = write_batch(tmp_path / "sam.npz", images(15, seed=8))
    first = TinyFeatures()
    out = evaluate.compute_metrics(ref, sam, batch_size=4, feature_extractor=first)
    assert first.images_seen == 35
    assert os.path.isfile(ref + ".stats.npz") and os.path.isfile(sam + ".stats.npz")
    again = TinyFeatures()
    assert evaluate.compute_metrics(ref, sam, feature_extractor=again) == pytest.approx(out)
    assert again.images_seen == 0
    # a rewritten file (new mtime) is processed again; the reference still comes from its cache
    write_batch(sam, images(15, seed=9))
    os.utime(sam, ns=(os.stat(sam).st_atime_ns, os.stat(sam).st_mtime_ns + 10**9))
    changed = TinyFeatures()
    assert evaluate.compute_metrics(ref, sam, feature_extractor=changed)["fid"] != pytest.approx(out["fid"])
    assert changed.images_seen == 15
    # features from another network never come from this cache
    other = TinyFeatures(seed=1, cache_key="tiny-features-seed1")
    evaluate.compute_metrics(ref, sam, feature_extractor=other)
    assert other.images_seen == 35
    # a cache folder instead of beside the files; none at all with cache=False
    elsewhere = TinyFeatures()
    evaluate.compute_metrics(ref, sam, feature_extractor=elsewhere, cache_dir=str(tmp_path / "cache"))
    assert elsewhere.images_seen == 35 and len(os.listdir(tmp_path / "cache")) == 2
    before = sorted(os.listdir(tmp_path))
    uncached = TinyFeatures(cache_key="never-written")
    evaluate.compute_metrics(ref, sam, feature_extractor=uncached, cache=False)
    assert uncached.images_seen == 35 and sorted(os.listdir(tmp_path)) == before


# --- bad input: one line, before any network is loaded ---------------------------------------


@pytest.mark.parametrize("arrays, problem", [
    ({"images": images(4)}, "has no arr_0 array (it holds: images)"),
    ({"arr_0": images(4).astype(np.float32)}, "dtype float32, not uint8"),
    ({"arr_0": images(4).transpose(0, 3, 1, 2).copy()}, "shape (4, 3, 16, 16), not N x H x W x 3"),
    ({"arr_0": images(4)[0]}, "shape (16, 16, 3)"),
    ({"arr_0": images(1)}, "holds 1 image(s)"),
])
def test_bad_batches_are_one_line_errors(tmp_path, capsys, offline, arrays, problem):
    ref = write_batch(tmp_path / "ref.npz", images(4))
    bad = write_batch(tmp_path / "bad.npz", **arrays)
    for argv in ([ref, bad], [bad, ref]):
        code, err = run_main(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
        assert problem in err and "bad.npz" in err


def test_missing_and_non_npz_files(tmp_path, capsys, offline):
    ref = write_batch(tmp_path / "ref.npz", images(4))
    code, err = run_main([ref, str(tmp_path / "nope.npz")], capsys)
    assert code == 2 and "nope.npz' does not exist" in err and err.count("\n") == 1
    (tmp_path / "text.npz").write_text("not a zip")
    code, err = run_main([str(tmp_path / "text.npz"), ref], capsys)
    assert code == 2 and "is not an .npz file" in err and err.count("\n") == 1
    with zipfile.ZipFile(tmp_path / "garbled.npz", "w") as z:
        z.writestr("arr_0.npy", b"not an array")
    code, err = run_main([ref, str(tmp_path / "garbled.npz")], capsys)
    assert code == 2 and "has an unreadable arr_0" in err and err.count("\n") == 1
    code, err = run_main([ref, ref, "--metrics", "fid,fud"], capsys)
    assert code == 2 and "unknown metric 'fud'" in err


# --- the Inception network: loading, hooks, offline behaviour ---------------------------------


def test_weights_missing_offline_is_one_line(tmp_path, capsys, offline):
    ref = write_batch(tmp_path / "ref.npz", images(4))
    code, err = run_main([ref, ref, "--device", "cpu"], capsys)
    # a note that the download starts, then the error on one line
    assert code == 2 and err.startswith("downloading the FID Inception weights") and err.count("\n") == 2
    err = err.splitlines()[1]
    assert err.startswith("error: ")
    expected_path = os.path.join(str(offline), "hub", "checkpoints", "pt_inception-2015-12-05-6726825d.pth")
    assert "could not download the FID Inception weights" in err and expected_path in err
    assert not os.path.exists(expected_path)


def test_unusable_cached_weights_are_one_line(tmp_path, capsys, offline):
    ref = write_batch(tmp_path / "ref.npz", images(4))
    path = offline / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"truncated download")
    code, err = run_main([ref, ref, "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and "corrupt" in err
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    code, err = run_main([ref, ref, "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and "does not hold the FID Inception weights" in err


def test_network_matches_pytorch_fid(monkeypatch):
    import pytorch_fid.inception as pf

    ours = evaluate.build_fid_inception()
    monkeypatch.setattr(pf, "load_state_dict_from_url", lambda *a, **k: ours.state_dict())
    theirs = pf.fid_inception_v3()  # loads strictly: same names and shapes
    assert [(n, type(m)) for n, m in ours.named_modules()] == [(n, type(m)) for n, m in theirs.named_modules()]


def test_features_are_read_where_adm_reads_them(fake_torch_home, monkeypatch):
    import pytorch_fid.inception as pf

    monkeypatch.setenv("TORCH_HOME", fake_torch_home)
    monkeypatch.setattr(pf, "FID_WEIGHTS_URL", CLOSED_URL)  # must come from the cache
    extractor = evaluate.load_inception("cpu")
    assert extractor.cache_key.startswith("fid-inception-")
    batch = torch.from_numpy(images(2, seed=10, size=40))
    with torch.inference_mode():
        feats = extractor(batch)
        # pool_3 against pytorch-fid's own wrapper (its preprocessing, its copy of the weights)
        x = batch.permute(0, 3, 1, 2).float() / 255
        (pool,) = pf.InceptionV3([3]).eval()(x)
        torch.testing.assert_close(feats["pool"], pool.flatten(1), rtol=1e-4, atol=1e-4)
        assert feats["pool"].abs().mean() > 1e-3  # the stand-in weights give non-degenerate features
        # mixed_6/conv: Mixed_6d's 1x1 branch, first 7 channels, flattened channels-last (17 x 17 x 7)
        net = extractor.net
        h = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c"]:
            h = getattr(net, name)(h)
        branch = net.Mixed_6d.branch1x1(h)
        assert branch.shape[1:] == (192, 17, 17) and feats["spatial"].shape == (2, 2023)
        torch.testing.assert_close(feats["spatial"].view(2, 17, 17, 7), branch[:, :7].permute(0, 2, 3, 1))
        # logits are the fc weights alone, ADM's unbiased softmax input
        assert feats["logits"].shape == (2, 1008)
        torch.testing.assert_close(feats["logits"], feats["pool"] @ net.fc.weight.T)
        assert not torch.allclose(feats["logits"], net.fc(feats["pool"]))


@pytest.mark.slow
def test_command_line_end_to_end(tmp_path, fake_torch_home):
    # FID and sFID are left out here: with 4 images their 2048-d covariances are singular (the matrix root
    # fails, as in ADM), and one 2048-d sqrtm takes tens of seconds on a small CPU; the FID path is tested
    # above with a small stand-in network, and the features it reads are checked against pytorch-fid.
    ref = write_batch(tmp_path / "ref.npz", images(4, seed=11, size=24))
    sam = write_batch(tmp_path / "samples.npz", images(4, seed=12, size=32, low=40))
    env = {**os.environ, "TORCH_HOME": fake_torch_home, "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, str(ROOT / "evaluate.py"), ref, sam, "--device", "cpu", "--batch-size", "4",
           "--allow-size-mismatch"]  # 24 px against 32 px: both resized to 299 px, with a warning
    run = subprocess.run(cmd + ["--metrics", "is,precision,recall"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "24x24 images but the samples are 32x32" in run.stderr
    out = json.loads((tmp_path / "samples_metrics.json").read_text())
    for key, label in [("inception_score", "Inception Score"), ("precision", "Precision"), ("recall", "Recall")]:
        assert np.isfinite(out[key]) and f"{label}: {out[key]}" in run.stdout
    assert "fid" not in out and "FID" not in run.stdout
    assert out["inception_score"] >= 1 and 0 <= out["precision"] <= 1 and 0 <= out["recall"] <= 1
    assert os.path.isfile(ref + ".stats.npz") and os.path.isfile(sam + ".stats.npz")
    # the second run reads both batches from the cache (no network pass), and writes where --output says
    again = subprocess.run(cmd + ["--output", str(tmp_path / "m.json"), "--metrics", "recall,is"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("using cached statistics") == 2 and "Inception features" not in again.stderr
    second = json.loads((tmp_path / "m.json").read_text())
    assert second["inception_score"] == pytest.approx(out["inception_score"]) and "precision" not in second
    assert second["recall"] == pytest.approx(out["recall"])


# --- references and samples of other image sizes ---------------------------------------------


def test_other_resolution_than_the_reference_is_refused_before_any_network(tmp_path, capsys, offline):
    """32 px references against 64 px samples: one line naming both sizes and the override."""
    ref = write_batch(tmp_path / "ref.npz", images(4, size=32))
    sam = write_batch(tmp_path / "sam.npz", images(4, size=64))
    code, err = run_main([ref, sam, "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "32x32" in err and "64x64" in err and "--allow-size-mismatch" in err
    # statistics-only references carry no size: only stored mu/sigma are compared
    stats_only = write_batch(tmp_path / "stats.npz", mu=np.zeros(16), sigma=np.eye(16))
    out = evaluate.compute_metrics(stats_only, sam, metrics=("fid",), feature_extractor=TinyFeatures(cache_key=None))
    assert np.isfinite(out["fid"])


def test_other_resolution_is_scored_with_a_warning_when_allowed(tmp_path):
    ref = write_batch(tmp_path / "ref.npz", images(12, size=32, seed=1))
    sam = images(10, size=64, seed=2)
    extractor = TinyFeatures(cache_key=None)
    with pytest.raises(ValueError, match="--allow-size-mismatch"):
        evaluate.compute_metrics(ref, sam, feature_extractor=extractor)
    assert extractor.images_seen == 0
    with pytest.warns(UserWarning, match="32x32 images but the samples are 64x64"):
        out = evaluate.compute_metrics(ref, sam, feature_extractor=extractor, allow_size_mismatch=True)
    assert extractor.images_seen == 22 and out["fid"] > 0


# --- statistics that cannot be scored, and outputs that cannot be written: one line, before the work ------


def never_sqrtm(matrix):
    raise AssertionError("sqrtm ran on statistics that should have been refused (NaN: it can run for hours)")


def test_nan_statistics_stored_in_the_reference_are_named_before_any_network(tmp_path, monkeypatch):
    monkeypatch.setattr(scipy.linalg, "sqrtm", never_sqrtm)
    sigma = np.eye(16)
    sigma[3, 5] = np.nan
    ref = write_batch(tmp_path / "ref.npz", images(12, seed=1), mu=np.zeros(16), sigma=sigma)
    extractor = TinyFeatures(cache_key=None)
    with pytest.raises(cli.UserError) as info:
        evaluate.compute_metrics(ref, images(10, seed=2), metrics=("fid",), feature_extractor=extractor)
    assert "ref.npz' stores statistics holding NaN or infinite values (sigma)" in str(info.value)
    assert extractor.images_seen == 0


def test_nan_features_of_the_samples_are_named_and_never_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(scipy.linalg, "sqrtm", never_sqrtm)

    class NaNFeatures(TinyFeatures):
        def __call__(self, batch):
            features = super().__call__(batch)
            features["pool"][0, 0] = float("nan")
            return features

    ref = write_batch(tmp_path / "ref.npz", mu=np.zeros(16), sigma=np.eye(16))
    sam = write_batch(tmp_path / "sam.npz", images(10, seed=2))
    with pytest.raises(cli.UserError, match=r"the samples give statistics holding NaN or infinite values \(mu, "
                                            r"sigma\).*check the images"):
        evaluate.compute_metrics(ref, sam, metrics=("fid",), feature_extractor=NaNFeatures())
    assert not os.path.exists(sam + ".stats.npz")  # the next run computes them again


def test_frechet_distance_refuses_nan_without_the_matrix_root(monkeypatch):
    monkeypatch.setattr(scipy.linalg, "sqrtm", never_sqrtm)
    with pytest.raises(cli.UserError, match="NaN or infinite"):
        evaluate.frechet_distance(np.zeros(3), np.eye(3), np.full(3, np.inf), np.eye(3))


def test_stored_statistics_of_the_wrong_size_are_refused_before_the_network(tmp_path, capsys, offline):
    """16-d statistics against Inception's 2048-d pool: refused without downloading the network."""
    ref = write_batch(tmp_path / "ref.npz", images(4), mu=np.zeros(16), sigma=np.eye(16))
    code, err = run_main([ref, ref, "--metrics", "fid", "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "stores mu of shape (16,) and sigma of shape (16, 16)" in err and "2048-d pool features" in err
    assert "drop mu/sigma from the file" in err


@pytest.mark.parametrize("mu, sigma", [(np.zeros(8), np.eye(8)), (np.zeros(16), np.eye(15)),
                                       (np.zeros((1, 16)), np.eye(16))], ids=["other-size", "sigma", "mu-2d"])
def test_stored_statistics_must_fit_the_extractors_features(tmp_path, mu, sigma):
    ref = write_batch(tmp_path / "ref.npz", images(12, seed=1), mu_s=mu, sigma_s=sigma)
    extractor = TinyFeatures(cache_key=None)
    extractor.feature_dims = {"pool": 16, "spatial": 12}
    with pytest.raises(cli.UserError, match="stores mu_s of shape .* but sfid compares Gaussians of the 12-d"):
        evaluate.compute_metrics(ref, images(10, seed=2), metrics=("sfid",), feature_extractor=extractor)
    assert extractor.images_seen == 0


def test_an_output_that_cannot_be_written_is_refused_before_the_network(tmp_path, capsys, offline):
    ref = write_batch(tmp_path / "ref.npz", images(4))
    (tmp_path / "out").mkdir()
    code, err = run_main([ref, ref, "--output", str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--output" in err and "out' is a folder, not a file" in err
    (tmp_path / "a_file").write_text("x")
    code, err = run_main([ref, ref, "--output", str(tmp_path / "a_file" / "m.json"), "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and "which is a file" in err


def test_a_folder_given_for_a_batch_is_named(tmp_path, capsys, offline):
    ref = write_batch(tmp_path / "ref.npz", images(4))
    code, err = run_main([ref, str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1 and "is a folder, not a file" in err and "does not exist" not in err


def test_nan_in_adm_sized_statistics_is_one_line_from_the_command_line(tmp_path, capsys, offline):
    """The issue's case: 2048-d stored statistics holding NaN (sqrtm would hang for hours)."""
    mu = np.zeros(2048, np.float32)
    mu[7] = np.nan
    ref = write_batch(tmp_path / "ref.npz", images(4), mu=mu, sigma=np.eye(2048, dtype=np.float32))
    code, err = run_main([ref, ref, "--metrics", "fid", "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "stores statistics holding NaN or infinite values (mu)" in err
