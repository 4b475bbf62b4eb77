"""Helpers for the diffusion process: per-device copies of its tables, timestep batches that
remember their value on the host, and the Gaussian likelihoods used by the variational-bound terms."""
import math

import torch

_CPU = torch.device("cpu")


class DeviceCopies:
    """Named CPU tensors, copied to each device once, on first use there.

    Lookups then index tensors already on the indices' device: no host round trip, which on a
    GPU would stall the host at every training or sampling step.
    """

    def __init__(self, **tensors):
        self._by_device = {_CPU: tensors}

    def get(self, name, device):
        """The tensor `name` on `device`."""
        copies = self._by_device.get(device)
        if copies is None:
            copies = {key: value.to(device) for key, value in self._by_device[_CPU].items()}
            self._by_device[device] = copies
        return copies[name]


def timestep_batch(value, n, device, dtype=torch.long):
    """n copies of the timestep `value`, filled on the device (no copy from the host), with `value`
    kept on the host as well (host_timestep reads it there): a sampler's decision by noise level
    (--cfg-interval, --cache-interval) then costs no device-to-host sync per model call."""
    t = torch.full((n,), value, device=device, dtype=dtype)
    return with_host_timestep(t, value)


def with_host_timestep(t, value):
    """t, remembering that its values are all `value` (a Python number)."""
    t.host_timestep = value
    return t


def host_timestep(t):
    """The first value of a batch of timesteps: the host copy kept by timestep_batch, else read
    from the device (one sync: the adaptive dopri5 solver's times, computed on the device)."""
    value = getattr(t, "host_timestep", None)
    return float(t[0]) if value is None else float(value)


def mean_flat(x):
    """Mean over every dimension but the batch."""
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-likelihood of data in [-1, 1] quantised to 256 bins under a Gaussian."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
