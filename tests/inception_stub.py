"""Offline stand-ins for evaluate.py's feature network, for tests.

write_fake_inception_weights(torch_home): a random-weight file with exactly the parameter names and shapes of
pytorch-fid's pt_inception-2015-12-05-6726825d.pth, placed where torch hub looks for it, so the real loading
and hook code runs end to end without the download. TinyFeatures: a cheap extractor with the same outputs
(pool, spatial, logits), for tests that need many images or many calls.
"""
import os

import torch
import torch.nn.functional as F

import evaluate


def write_fake_inception_weights(torch_home, seed=0):
    """Write random FID-Inception weights into TORCH_HOME/hub/checkpoints/; returns the file's path."""
    torch.manual_seed(seed)
    net = evaluate.build_fid_inception()
    # Default init shrinks activations ~1e-8 by the pool layer; one train-mode pass with cumulative
    # BatchNorm statistics rescales every layer so features stay O(1) and the metrics are not degenerate.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    with torch.no_grad():
        net.train()(torch.rand(2, 3, 128, 128) * 2 - 1)
    path = os.path.join(torch_home, "hub", "checkpoints", "pt_inception-2015-12-05-6726825d.pth")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


class TinyFeatures:
    """A fixed random projection of 4x4-pooled pixels; counts the images it sees.

    pool: `dim` dims, spatial: 12 dims, logits: 5 classes. Pass cache_key=None to opt out of disk caching."""

    def __init__(self, dim=16, seed=0, cache_key="tiny-features-v1"):
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(48, dim, generator=g)
        self.cache_key = cache_key
        self.images_seen = 0

    def __call__(self, images):
        self.images_seen += len(images)
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
        x = F.adaptive_avg_pool2d(x, 4).flatten(1)  # 48 values
        pool = x @ self.proj.to(x.device)
        return {"pool": pool, "spatial": x[:, :12], "logits": 4 * pool[:, :5]}
