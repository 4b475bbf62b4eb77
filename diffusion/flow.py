"""Flow matching on the linear interpolant (rectified flow, Liu et al. 2023; Lipman et al. 2023),
as SiT (Ma et al. 2024) and Stable Diffusion 3 (Esser et al. 2024) train it:

    x_t = (1 - t) x_0 + t eps,   t in [0, 1]   (t = 0: data, t = 1: noise)

The model predicts the velocity dx_t/dt = eps - x_0 and is trained with the plain MSE to it. Its
timestep input is t * TIMESTEP_SCALE (t * 1000), so DiT's sinusoidal timestep embedding spans
the same range as for the 1000-step Gaussian process. Training draws t uniformly or from SD3's
logit-normal, t = sigmoid(mean + scale * n) with n ~ N(0, 1).

Samplers integrate dx/dt = v(x, t) from t = 1 (noise) to t = 0 on N equal steps. They take a
function velocity(x, t) (t a float, or a 0-d tensor for dopri5) and need nothing else of the model:

    euler   N evaluations
    heun    Heun's 2nd-order method; its last step (onto t = 0) is plain Euler as in EDM
            (Karras et al. 2022): 2N - 1 evaluations
    dopri5  adaptive Dormand-Prince 5(4) (torchdiffeq's odeint), tolerances atol / rtol
    sde     Euler-Maruyama on the reverse SDE with the ODE's marginals (SiT's), diffusion
            w(t) = diffusion * t (SiT's "sigma" form); the last step is noise-free Euler, which
            lands on the model's denoised estimate x - t v
"""
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion_utils import host_timestep, mean_flat, timestep_batch

TIMESTEP_SCALE = 1000.0  # the model sees t * 1000, as the Gaussian process's timestep indices
T_SAMPLINGS = ("uniform", "logit-normal")


class LinearFlow:
    """The process and its training loss; create_process builds it from a checkpoint's diffusion_args."""

    def __init__(self, t_sampling="uniform", t_mean=0.0, t_scale=1.0):
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"unknown t sampling {t_sampling!r}; choose {' or '.join(T_SAMPLINGS)}")
        if not (math.isfinite(t_mean) and math.isfinite(t_scale) and t_scale > 0):
            raise ValueError(f"the logit-normal needs a finite mean and a positive scale, got {t_mean}, {t_scale}")
        self.t_sampling, self.t_mean, self.t_scale = t_sampling, t_mean, t_scale

    learns_sigma = False  # the model predicts the velocity alone

    def training_times(self, n, generator=None, device=None):
        """n training times in [0, 1] (one draw of n values from `generator`)."""
        if self.t_sampling == "uniform":
            return torch.rand(n, generator=generator, device=device)
        return torch.sigmoid(self.t_mean + self.t_scale * torch.randn(n, generator=generator, device=device))

    @staticmethod
    def noise_level(model_t):
        """The noise level in [0, 1] of the model's timestep input, t (its first value, kept on the host)."""
        return host_timestep(model_t) / TIMESTEP_SCALE

    @staticmethod
    def velocity_field(model, model_kwargs, channels):
        """velocity(x, t) for the samplers below, from model(x, t * 1000, **model_kwargs)'s first
        `channels` channels; t a float, or a 0-d tensor (dopri5)."""
        def velocity(x, t):
            if torch.is_tensor(t):  # dopri5's time, computed on the device: scaled there
                timesteps = torch.as_tensor(t, dtype=torch.float32, device=x.device).mul(TIMESTEP_SCALE).expand(len(x))
            else:  # a time of the fixed grid, known on the host: filled on the device (no copy per call),
                # scaled in float32 as the device would, so the model sees the values it always did
                scaled = float(np.float32(t) * np.float32(TIMESTEP_SCALE))
                timesteps = timestep_batch(scaled, len(x), x.device, dtype=torch.float32)
            return model(x, timesteps, **model_kwargs)[:, :channels]
        return velocity

    @staticmethod
    def q_sample(x_start, t, noise):
        """x_t = (1 - t) x_0 + t eps."""
        t = t.view(-1, *([1] * (x_start.ndim - 1)))
        return (1 - t) * x_start + t * noise

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-example MSE to the velocity eps - x_0 at times t: dict with "loss" and "mse"."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        # Only the first C channels: a model built with learn_sigma has extra ones nothing trains.
        velocity = model(x_t, t * TIMESTEP_SCALE, **(model_kwargs or {}))[:, :x_start.shape[1]]
        mse = mean_flat((noise - x_start - velocity) ** 2)
        return {"loss": mse, "mse": mse}


def time_grid(steps):
    """t from 1 to 0 in `steps` equal steps (the last point exactly 0)."""
    return [1.0 - i / steps for i in range(steps)] + [0.0]


def _steps(steps, progress):
    grid = time_grid(steps)
    pairs = list(zip(grid[:-1], grid[1:]))
    return tqdm(pairs, desc="sampling", leave=False) if progress else pairs


def euler_sample(velocity, x, steps, progress=False):
    """x at t = 0 from x at t = 1: x <- x + (t_next - t) v(x, t)."""
    for t, t_next in _steps(steps, progress):
        x = x + (t_next - t) * velocity(x, t)
    return x


def heun_sample(velocity, x, steps, progress=False):
    """Heun's method (explicit trapezoid): an Euler step, then the mean of the slopes at both ends."""
    for t, t_next in _steps(steps, progress):
        slope = velocity(x, t)
        x_euler = x + (t_next - t) * slope
        if t_next == 0:  # EDM's choice: the last step stays Euler, saving an evaluation at t = 0
            x = x_euler
        else:
            x = x + (t_next - t) * 0.5 * (slope + velocity(x_euler, t_next))
    return x


def dopri5_sample(velocity, x, atol, rtol):
    """Adaptive Dormand-Prince from t = 1 to 0; the step count follows the tolerances."""
    from torchdiffeq import odeint

    times = torch.tensor([1.0, 0.0], device=x.device, dtype=x.dtype)
    return odeint(lambda t, y: velocity(y, t), x, times, method="dopri5", atol=atol, rtol=rtol)[-1]


def sde_sample(velocity, x, steps, diffusion, noise, progress=False):
    """Euler-Maruyama on dx = [v - w s] dt + sqrt(2 w) dW, t from 1 to 0, w(t) = diffusion * t.

    For the linear interpolant the score is s = -(x + (1 - t) v) / t, so w s = -diffusion (x + (1 - t) v):
    no division by t. noise() returns the next standard normal draw shaped like x. With
    diffusion = 0 this is euler_sample exactly.
    """
    for t, t_next in _steps(steps, progress):
        v = velocity(x, t)
        if t_next == 0:  # the last step adds no noise: it lands on the denoised estimate x - t v
            x = x + (t_next - t) * v
            break
        drift = v + diffusion * (x + (1 - t) * v)
        x = x + (t_next - t) * drift + math.sqrt(2 * diffusion * t * (t - t_next)) * noise()
    return x
