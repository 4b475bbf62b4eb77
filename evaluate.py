"""Score a batch of samples against a reference batch: FID, sFID, Inception Score, precision, recall.

The definitions are those of the ADM evaluation suite (Dhariwal & Nichol, 2021), whose numbers the
DiT paper reports, computed in PyTorch with the TF Inception-v3 weights as ported by pytorch-fid:

    FID        Frechet distance of the 2048-d pool_3 features
    sFID       the same on the first 7 channels of mixed_6/conv (Mixed_6d's 1x1 branch, 17x17x7 = 2023-d)
    IS         exp(E KL(p(y|x) || p(y))) over the 1008-way softmax of pool_3 @ W (no bias), in splits of 5,000
    precision  fraction of samples inside the reference manifold  } manifolds: balls reaching each point's
    recall     fraction of the reference inside the sample manifold } 3rd nearest neighbour (pool_3 features)

Both files are ADM-format .npz batches (arr_0: uint8, N x H x W x 3), as sample_ddp.py writes. A reference
that already carries mu, sigma, mu_s, sigma_s (like ADM's VIRTUAL_imagenet256_labeled.npz) has those used
as they are; its images are still read for precision and recall. Features and statistics of each file are
cached beside it (FILE.stats.npz, keyed by size, mtime and the weights), so a reference is processed once.
Stored statistics of the wrong size, statistics holding NaN (stored or computed) and an --output that cannot be
written are refused in one line, the first and last before any network runs.

    python evaluate.py VIRTUAL_imagenet256_labeled.npz samples/DiT-XL-2-...npz --output metrics.json
"""
import argparse
import contextlib
import hashlib
import json
import os
import sys
import warnings
import zipfile

import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
from distributed import pick_device
from errors import first_line
from files import atomic_path, check_input_file, check_output_file, load_torch, save_json

METRICS = ("fid", "sfid", "is", "precision", "recall")
RESULT_KEYS = {"fid": "fid", "sfid": "sfid", "is": "inception_score", "precision": "precision", "recall": "recall"}
IS_SPLIT_SIZE = 5000  # ADM (after improved-gan) averages the score over consecutive chunks of 5,000
PR_NEIGHBOURS = 3  # ADM's ManifoldEstimator nhood_sizes=(3,)
PR_BATCH_SIZE = 10000  # rows/columns of pairwise distances held at once, as ADM's row/col_batch_size
FID_EPS = 1e-6  # diagonal offset when the covariance product is singular, as ADM and pytorch-fid
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "inception_score", "pool")
# The Frechet metrics: the mean and covariance they compare, and the features those are fitted to.
GAUSSIANS = {"fid": ("mu", "sigma", "pool"), "sfid": ("mu_s", "sigma_s", "spatial")}


# ---------------------------------------------------------------------------------------------
# ADM-format batches: checked from the .npy header, then streamed so a 50k batch never sits in memory


def _images_error(what, problem):
    return cli.UserError(f"{what} {problem}; an ADM-format batch holds arr_0 = uint8 images N x H x W x 3 "
                         f"(values 0-255), saved with np.savez(path, images) as sample_ddp.py does")


def check_images(shape, dtype, what):
    """Reject anything but uint8 N x H x W x 3 (or x 1, grey) with at least two images."""
    if np.dtype(dtype) != np.uint8:
        raise _images_error(what, f"has arr_0 of dtype {np.dtype(dtype)}, not uint8 (for floats in [0, 1]: "
                                  f"np.clip(np.round(x * 255), 0, 255).astype(np.uint8))")
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise _images_error(what, f"has arr_0 of shape {tuple(shape)}, not N x H x W x 3 "
                                  f"(channels last; transpose N x 3 x H x W with x.transpose(0, 2, 3, 1))")
    if shape[0] < 2:
        raise _images_error(what, f"holds {shape[0]} image(s); the statistics need at least 2 "
                                  f"(thousands to be meaningful)")


def npz_keys(path, what):
    """Names of the arrays in an .npz file, with one-line errors for a missing, folder or non-npz path."""
    check_input_file(path, what)
    try:
        with zipfile.ZipFile(path) as z:
            return [name[:-4] for name in z.namelist() if name.endswith(".npy")]
    except zipfile.BadZipFile:
        raise _images_error(f"{what} {path!r}", "is not an .npz file") from None


def _read_header(f, what):
    try:
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise _images_error(what, f"stores arr_0 in .npy format version {version}, which is not read here")
        return readers[version](f)  # shape, fortran_order, dtype
    except ValueError as e:
        if "ADM-format" in str(e):
            raise
        raise _images_error(what, f"has an unreadable arr_0 ({first_line(e, 100)})") from None


def npz_image_shape(path, what):
    """Shape of arr_0 in an ADM-format .npz, validated without loading the images."""
    keys = npz_keys(path, what)
    if "arr_0" not in keys:
        raise _images_error(f"{what} {path!r}", f"has no arr_0 array (it holds: {', '.join(keys) or 'nothing'})")
    with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
        shape, _, dtype = _read_header(f, f"{what} {path!r}")
    check_images(shape, dtype, f"{what} {path!r}")
    return shape


def image_batches(source, batch_size):
    """uint8 N x H x W x C batches from an array or an ADM-format .npz (read piece by piece)."""
    if isinstance(source, np.ndarray):
        for start in range(0, len(source), batch_size):
            yield source[start:start + batch_size]
        return
    with zipfile.ZipFile(source) as z, z.open("arr_0.npy") as f:
        shape, fortran_order, _ = _read_header(f, source)
        if fortran_order:  # rare: written from a transposed view; the bytes are not image by image
            with np.load(source) as npz:
                yield from image_batches(np.ascontiguousarray(npz["arr_0"]), batch_size)
            return
        image_bytes = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            data = f.read(n * image_bytes)
            if len(data) != n * image_bytes:
                raise cli.UserError(f"{source!r} is truncated: arr_0 ends after {start + len(data) // image_bytes} "
                                    f"of {shape[0]} images; re-create the file")
            yield np.frombuffer(data, np.uint8).reshape(n, *shape[1:])


# ---------------------------------------------------------------------------------------------
# The feature network: pytorch-fid's port of the TF 2015-12-05 Inception graph, read through hooks


def build_fid_inception():
    """pytorch-fid's FID Inception-v3 (1008-way fc, TF-style pooling blocks) without weights.

    The same structure fid_inception_v3() builds; rebuilt here so the weights can be loaded with
    torch.load(weights_only=True) instead of the hub loader's full unpickling."""
    import torchvision
    from pytorch_fid import inception as pf

    net = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf.FIDInceptionE_1(1280)
    net.Mixed_7c = pf.FIDInceptionE_2(2048)
    return net


def inception_weights_path():
    """Where torch hub caches the FID Inception weights ($TORCH_HOME/hub/checkpoints/...)."""
    from pytorch_fid import inception as pf

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(pf.FID_WEIGHTS_URL))


def fetch_inception_weights():
    """The cached weights file, downloaded once; one line saying what to do when that fails."""
    from pytorch_fid import inception as pf

    path = inception_weights_path()
    if not os.path.isfile(path):
        print(f"downloading the FID Inception weights to {path}", file=sys.stderr)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(pf.FID_WEIGHTS_URL, path, progress=True)  # writes a .partial, then renames
        except Exception as e:  # urllib, socket and OS errors alike
            reason = first_line(e)
            raise cli.UserError(f"could not download the FID Inception weights from {pf.FID_WEIGHTS_URL} ({reason}); "
                                f"fetch that file on a machine with internet and put it at {path} "
                                f"(the folder follows $TORCH_HOME)") from None
    return path


class InceptionFeatures(torch.nn.Module):
    """uint8 N x H x W x 3 images -> pool (2048), spatial (2023) and logits (1008) features, as ADM reads them."""

    # known before the network is loaded, so stored statistics of another size are refused first
    feature_dims = {"pool": 2048, "spatial": 17 * 17 * SPATIAL_CHANNELS}  # mixed_6 is 17 x 17 at 299 px

    def __init__(self, net, cache_key):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.cache_key = cache_key
        self._taken = {}
        # mixed_6/conv in the TF graph is Mixed_6d's 1x1 branch after its ReLU: BasicConv2d's output
        net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: self._taken.__setitem__("mixed_6", out))
        net.avgpool.register_forward_hook(lambda m, i, out: self._taken.__setitem__("pool_3", out))

    def forward(self, images):
        # pytorch-fid's input path: [0, 1], bilinear to 299 x 299 (no antialias), then [-1, 1]
        x = images.permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        self.net(2 * x - 1)
        pool = self._taken.pop("pool_3").flatten(1)
        # channels last before flattening, so the 2023 dims are ordered as TF's NHWC tensor
        spatial = self._taken.pop("mixed_6")[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        # ADM (and improved-gan) take the softmax weights alone, without the bias
        logits = pool @ self.net.fc.weight.T
        return {"pool": pool, "spatial": spatial, "logits": logits}


def load_inception(device):
    """The FID Inception network on `device`, downloading the weights on first use."""
    path = fetch_inception_weights()
    state = load_torch(path, "FID Inception weights")
    net = build_fid_inception()
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = first_line(e)
        raise cli.UserError(f"{path} does not hold the FID Inception weights ({first}); delete it so it is "
                            f"downloaded again") from None
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    return InceptionFeatures(net, cache_key=f"fid-inception-{digest}-bilinear299").to(device)


@contextlib.contextmanager
def full_precision_matmuls():
    """TF32 off while measuring (cuDNN allows it by default), restored afterwards for the caller."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.inference_mode()
def extract_features(source, extractor, device, batch_size, what):
    """Run the extractor over all images: dict of float32 arrays pool, spatial, logits (N rows each)."""
    total = len(source) if isinstance(source, np.ndarray) else npz_image_shape(source, what)[0]
    parts = {"pool": [], "spatial": [], "logits": []}
    with tqdm(total=total, desc=f"Inception features of {what}", unit="img", file=sys.stderr) as bar:
        for batch in image_batches(source, batch_size):
            x = torch.tensor(batch, device=device)
            if x.shape[-1] == 1:  # grey images (pixel-space models on 1-channel data) as RGB
                x = x.expand(-1, -1, -1, 3)
            features = extractor(x)
            for name in parts:
                parts[name].append(features[name].float().cpu().numpy())
            bar.update(len(batch))
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


# ---------------------------------------------------------------------------------------------
# Per-file statistics, cached beside the file


def feature_statistics(features):
    """What the metrics need of one batch: Gaussian fits of pool and spatial features, IS, pool features."""
    return {
        "mu": features["pool"].mean(0, dtype=np.float64),
        "sigma": np.cov(features["pool"], rowvar=False),
        "mu_s": features["spatial"].mean(0, dtype=np.float64),
        "sigma_s": np.cov(features["spatial"], rowvar=False),
        "inception_score": np.float64(inception_score(features["logits"])),
        "pool": features["pool"],
    }


def cache_path_for(path, cache_dir=None):
    if cache_dir is None:
        return path + ".stats.npz"
    tag = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"{os.path.basename(path)}-{tag}.stats.npz")


def batch_statistics(source, extractor, device, batch_size, what, cache=True, cache_dir=None):
    """feature_statistics of an array or .npz; for files (and extractors with a cache_key) cached on disk."""
    key = getattr(extractor, "cache_key", None)
    cache_file = None
    if cache and key and not isinstance(source, np.ndarray):
        st = os.stat(source)
        fingerprint = json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "features": key, "version": 1})
        cache_file = cache_path_for(source, cache_dir)
        try:
            with np.load(cache_file, allow_pickle=False) as f:
                if str(f["fingerprint"]) == fingerprint:
                    print(f"using cached statistics {cache_file}", file=sys.stderr)
                    return {name: f[name] for name in STAT_KEYS}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            pass  # missing, stale or unreadable cache: recompute
    stats = feature_statistics(extract_features(source, extractor, device, batch_size, what))
    if cache_file and all(np.isfinite(value).all() for value in stats.values()):  # never keep a failure
        try:
            with atomic_path(cache_file) as tmp:
                np.savez(tmp, fingerprint=np.array(fingerprint), **stats)
        except OSError as e:
            print(f"warning: could not cache statistics at {cache_file} ({e}); they will be recomputed next time",
                  file=sys.stderr)
    return stats


# ---------------------------------------------------------------------------------------------
# The metrics


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=FID_EPS):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), with ADM's safeguards for the matrix root."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise cli.UserError(f"the two Gaussians differ in shape (mean {mu1.shape} vs {mu2.shape}, covariance "
                            f"{sigma1.shape} vs {sigma2.shape}); compare statistics of the same features")
    if not all(np.isfinite(x).all() for x in (mu1, sigma1, mu2, sigma2)):  # sqrtm of NaN can run for hours
        raise cli.UserError("the Frechet distance was given statistics holding NaN or infinite values; "
                            "recompute them from finite features")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # singular products are handled below
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            warnings.warn(f"FID: the covariance product is singular; adding {eps} to the diagonals")
            offset = np.eye(len(mu1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.isfinite(covmean).all():
        raise cli.UserError("FID: the matrix square root is not finite even after offsetting the covariances; "
                            "the statistics are degenerate (use more, and more varied, images)")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise cli.UserError(f"FID: the matrix square root has an imaginary part of "
                                f"{np.abs(covmean.imag).max():.3g}, far from rounding error; the covariances are "
                                f"too ill-conditioned (use more images than feature dimensions)")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, split_size=IS_SPLIT_SIZE):
    """exp of the mean KL(p(y|x) || p(y)), averaged over consecutive splits of `split_size` rows."""
    probs = scipy.special.softmax(np.asarray(logits, np.float64), axis=1)
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        kl = scipy.special.rel_entr(part, part.mean(0, keepdims=True)).sum(1).mean()  # 0 log 0 = 0
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _squared_distances(a, b):
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]).clamp_min_(0)


def manifold_radii(features, k=PR_NEIGHBOURS, batch_size=PR_BATCH_SIZE, device="cpu"):
    """Squared distance from each point to its k-th nearest neighbour, itself not counted (ADM's radii)."""
    x = torch.as_tensor(features, dtype=torch.float32, device=device)
    if len(x) <= k:
        raise cli.UserError(f"precision and recall need more than {k} images in each batch, got {len(x)}")
    radii = []
    for rows in x.split(batch_size):
        # the k+1 nearest of each column block, then of their union; the nearest of all is the point itself
        nearest = [torch.topk(_squared_distances(rows, cols), min(k + 1, len(cols)), dim=1, largest=False).values
                   for cols in x.split(batch_size)]
        radii.append(torch.cat(nearest, 1).kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def precision_recall(ref_features, sample_features, k=PR_NEIGHBOURS, batch_size=PR_BATCH_SIZE, device="cpu"):
    """(precision, recall) of Kynkaanniemi et al. with ADM's semantics: a point is inside a manifold when it
    lies within the k-NN radius of at least one of that manifold's points (distance <= radius)."""
    ref = torch.as_tensor(ref_features, dtype=torch.float32, device=device)
    sam = torch.as_tensor(sample_features, dtype=torch.float32, device=device)
    ref_radii = manifold_radii(ref, k, batch_size, device)
    sam_radii = manifold_radii(sam, k, batch_size, device)
    ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=device)
    sam_inside = torch.zeros(len(sam), dtype=torch.bool, device=device)
    for r0 in range(0, len(ref), batch_size):
        rows = slice(r0, r0 + batch_size)
        for c0 in range(0, len(sam), batch_size):
            cols = slice(c0, c0 + batch_size)
            d = _squared_distances(ref[rows], sam[cols])
            ref_inside[rows] |= (d <= sam_radii[cols][None, :]).any(1)
            sam_inside[cols] |= (d <= ref_radii[rows][:, None]).any(0)
    return sam_inside.double().mean().item(), ref_inside.double().mean().item()


# ---------------------------------------------------------------------------------------------
# Putting it together


def parse_metrics(metrics):
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        problem = f"unknown metric {bad[0]!r}" if bad else "no metric was asked for"
        raise cli.UserError(f"{problem}; choose from {', '.join(METRICS)}")
    return tuple(m for m in METRICS if m in names)


def stored_statistics(ref_path, keys, metrics):
    """The mu/sigma (and _s) the reference file carries for the asked Frechet metrics: ADM uses them as they are."""
    stored = {}
    with np.load(ref_path, allow_pickle=False) as f:
        for mu, sigma, _ in (GAUSSIANS[m] for m in metrics if m in GAUSSIANS):
            if mu in keys and sigma in keys:
                stored[mu], stored[sigma] = f[mu], f[sigma]
    return stored


def check_stored_statistics(stored, feature_dims, what):
    """Refuse, before any network runs, stored statistics that are not a Gaussian of the features the
    extractor gives (`feature_dims`: {"pool": d, ...}, None when unknown) or that are not finite."""
    for metric, (mu_key, sigma_key, feature) in GAUSSIANS.items():
        if mu_key not in stored:
            continue
        mu, sigma = np.asarray(stored[mu_key]), np.asarray(stored[sigma_key])
        dim = (feature_dims or {}).get(feature, mu.shape[-1] if mu.ndim else None)
        if mu.shape != (dim,) or sigma.shape != (dim, dim):
            raise cli.UserError(f"{what} stores {mu_key} of shape {mu.shape} and {sigma_key} of shape {sigma.shape}, "
                                f"but {metric} compares Gaussians of the {dim}-d {feature} features ({mu_key} "
                                f"({dim},), {sigma_key} ({dim}, {dim})); use statistics of this network, or drop "
                                f"{mu_key}/{sigma_key} from the file so they are computed from its images")
    check_finite(stored, stored, f"{what} stores", "re-create the file, or drop them so they are computed from its "
                                                   "images")


def needed_statistics(metrics):
    """The per-batch statistics (STAT_KEYS) the asked metrics read."""
    needed = [key for m in metrics if m in GAUSSIANS for key in GAUSSIANS[m][:2]]
    needed += ["inception_score"] if "is" in metrics else []
    return needed + (["pool"] if "precision" in metrics or "recall" in metrics else [])


def check_finite(stats, names, what, fix):
    """One line naming the statistics among `names` that hold NaN or infinite values."""
    bad = [name for name in names if name in stats and not np.isfinite(stats[name]).all()]
    if bad:
        raise cli.UserError(f"{what} statistics holding NaN or infinite values ({', '.join(bad)}), which would "
                            f"make the scores meaningless; {fix}")


def check_same_resolution(ref_shape, sample_shape, allow):
    """Refuse (or, when allowed, warn about) references and samples of different image sizes:
    Inception resizes both to 299 px, so the mismatch would pass unnoticed into the scores."""
    ref_hw, sample_hw = tuple(ref_shape[1:3]), tuple(sample_shape[1:3])
    if ref_hw == sample_hw:
        return
    problem = (f"the reference batch holds {ref_hw[0]}x{ref_hw[1]} images but the samples are "
               f"{sample_hw[0]}x{sample_hw[1]}, so the scores would compare resolutions, not models")
    if not allow:
        raise cli.UserError(f"{problem}; use the reference for the samples' resolution, or pass "
                            f"--allow-size-mismatch to score them anyway")
    warnings.warn(f"{problem} (--allow-size-mismatch)", stacklevel=2)


def _reference_shape(ref_path, keys, need_images):
    """arr_0's shape (read from its header) when the reference holds images, else None."""
    if not need_images and "arr_0" not in keys:
        return None
    try:
        return npz_image_shape(ref_path, "reference batch")
    except ValueError:
        if need_images:
            raise
        return None  # images that are not used: only the stored statistics count


def compute_metrics(ref_path, samples, device="cpu", batch_size=50, metrics=METRICS, feature_extractor=None,
                    cache=True, cache_dir=None, allow_size_mismatch=False):
    """Metrics of `samples` (uint8 N x H x W x 3 array, or an ADM-format .npz path) against a reference .npz.

    Returns {"fid", "sfid", "inception_score", "precision", "recall"} for the asked `metrics` (names from
    METRICS). `feature_extractor=None` loads the FID Inception network; a stand-in is any callable taking a
    uint8 N x H x W x 3 tensor on `device` and returning {"pool", "spatial", "logits"} 2-D tensors (statistics
    of files are cached on disk only for extractors with a `cache_key` attribute; stored reference statistics
    are checked against its `feature_dims`, {"pool": d, "spatial": d}, where it has one). References and
    samples of different image sizes are refused unless `allow_size_mismatch` (then a warning)."""
    metrics = parse_metrics(metrics)
    device = pick_device(str(device))
    if batch_size < 1:
        raise cli.UserError(f"--batch-size must be at least 1, got {batch_size}")
    ref_path = os.fspath(ref_path)
    samples = samples if isinstance(samples, np.ndarray) else os.fspath(samples)
    feature_dims = InceptionFeatures.feature_dims if feature_extractor is None else \
        getattr(feature_extractor, "feature_dims", None)
    stored, need_ref_images = check_inputs(ref_path, samples, metrics, feature_dims, allow_size_mismatch)

    with full_precision_matmuls():
        extractor = feature_extractor if feature_extractor is not None else load_inception(device)
        ref = stored
        if need_ref_images:
            computed = batch_statistics(ref_path, extractor, device, batch_size, "the reference batch", cache,
                                        cache_dir)
            ref = {**computed, **stored}
        sam = batch_statistics(samples, extractor, device, batch_size, "the samples", cache, cache_dir)
        fix = "their features are not finite: check the images (and the feature network)"
        needed = needed_statistics(metrics)
        check_finite(ref, [k for k in needed if k != "inception_score"], f"reference batch {ref_path!r} gives", fix)
        check_finite(sam, needed, "the samples give", fix)  # IS is the samples' alone
        return score(ref, sam, metrics, device)


def check_inputs(ref_path, samples, metrics, feature_dims, allow_size_mismatch):
    """Everything that can be refused before a network runs: the files, their images and the reference's
    stored statistics. Returns (stored statistics, whether the reference's images are needed)."""
    keys = npz_keys(ref_path, "reference batch")
    stored = stored_statistics(ref_path, keys, metrics)
    check_stored_statistics(stored, feature_dims, f"reference batch {ref_path!r}")
    pr = "precision" in metrics or "recall" in metrics
    need_ref_images = pr or any(GAUSSIANS[m][0] not in stored for m in metrics if m in GAUSSIANS)
    if need_ref_images and "arr_0" not in keys:
        what = "precision and recall need" if pr else "the reference carries no mu/sigma statistics, so FID needs"
        raise cli.UserError(f"reference batch {ref_path!r} has no arr_0 array (it holds: "
                            f"{', '.join(keys) or 'nothing'}), and {what} its images; use an ADM-format "
                            f"reference with images (arr_0 uint8 N x H x W x 3) or ask only for metrics its "
                            f"statistics cover")
    ref_shape = _reference_shape(ref_path, keys, need_ref_images)
    if isinstance(samples, np.ndarray):
        check_images(samples.shape, samples.dtype, "the samples")
        sample_shape = samples.shape
    else:
        sample_shape = npz_image_shape(samples, "sample batch")
    if ref_shape is not None:
        check_same_resolution(ref_shape, sample_shape, allow_size_mismatch)
    return stored, need_ref_images


def score(ref, sam, metrics, device):
    """The asked metrics from the two batches' statistics."""
    results = {}
    for metric, (mu, sigma, _) in GAUSSIANS.items():
        if metric in metrics:
            results[metric] = frechet_distance(ref[mu], ref[sigma], sam[mu], sam[sigma])
    if "is" in metrics:
        results["inception_score"] = float(sam["inception_score"])
    if "precision" in metrics or "recall" in metrics:
        precision, recall = precision_recall(ref["pool"], sam["pool"], device=device)
        results.update({m: v for m, v in (("precision", precision), ("recall", recall)) if m in metrics})
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref_batch", help="reference batch .npz (arr_0 uint8 N x H x W x 3; mu/sigma/mu_s/sigma_s "
                                          "used as they are when present)")
    parser.add_argument("sample_batch", help="sample batch .npz in the same format (as sample_ddp.py writes)")
    parser.add_argument("--output", default=None, help="JSON file for the results (default: SAMPLES_metrics.json "
                                                       "beside the sample batch)")
    parser.add_argument("--metrics", default=",".join(METRICS), help=f"comma-separated subset of {','.join(METRICS)}")
    parser.add_argument("--batch-size", type=int, default=50, help="images per Inception forward pass")
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto")
    parser.add_argument("--cache-dir", default=None, help="folder for per-file statistics (default: beside each file)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write cached statistics")
    parser.add_argument("--allow-size-mismatch", action="store_true",
                        help="score samples whose image size differs from the reference's (with a warning)")
    args = parser.parse_args(argv)
    output = args.output or os.path.splitext(args.sample_batch)[0] + "_metrics.json"
    check_output_file(output, "--output")  # before the work, not after it

    results = compute_metrics(args.ref_batch, args.sample_batch, device=args.device, batch_size=args.batch_size,
                              metrics=parse_metrics(args.metrics), cache=not args.no_cache, cache_dir=args.cache_dir,
                              allow_size_mismatch=args.allow_size_mismatch)
    labels = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID",
              "precision": "Precision", "recall": "Recall"}
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):  # ADM's order
        if key in results:
            print(f"{labels[key]}: {results[key]}")
    save_json({**results, "ref_batch": args.ref_batch, "sample_batch": args.sample_batch}, output)
    print(f"wrote {output}")


if __name__ == "__main__":
    cli.run(main)
