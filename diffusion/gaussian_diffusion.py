"""Gaussian diffusion (Ho et al. 2020) with the learned-range variance and hybrid loss of
Improved DDPM (Nichol & Dhariwal 2021), as used by DiT: the parts create_diffusion can set up.
The model predicts the noise (DiT's choice), x_0, or v (v-prediction, Salimans & Ho 2022); the
samplers convert any of them to x_0 and eps.

Schedule quantities are computed once in float64 (as the reference does) and kept as float64
torch tables, copied to each device once. A lookup gathers on the timesteps' device and only
then casts to float32, as the reference does, so results match it to the bit and never wait
for the host.
"""
import enum
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion_utils import (DeviceCopies, discretized_gaussian_log_likelihood, host_timestep, mean_flat, normal_kl,
                              timestep_batch)


class ModelMeanType(enum.Enum):
    START_X = enum.auto()  # the model predicts x_0
    EPSILON = enum.auto()  # the model predicts the noise
    VELOCITY = enum.auto()  # the model predicts v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022)


class ModelVarType(enum.Enum):
    FIXED_SMALL = enum.auto()  # posterior variance
    FIXED_LARGE = enum.auto()  # beta_t
    LEARNED_RANGE = enum.auto()  # the model interpolates between the two in log space


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE, plus the variational bound when the variance is learned
    RESCALED_MSE = enum.auto()  # as MSE, with the bound term scaled by num_timesteps / 1000
    RESCALED_KL = enum.auto()  # the variational bound times num_timesteps


# The (variance, log-variance) tables of each fixed-variance model.
_FIXED_VARIANCE_TABLES = {
    ModelVarType.FIXED_SMALL: ("posterior_variance", "posterior_log_variance_clipped"),
    ModelVarType.FIXED_LARGE: ("fixed_large_variance", "fixed_large_log_variance"),
}


def get_named_beta_schedule(name, num_diffusion_timesteps):
    """Betas for "linear" (scaled so any step count spans the same range) or "squaredcos_cap_v2"."""
    if name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(
            num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise ValueError(f"unknown noise schedule {name!r}; choose 'linear' or 'squaredcos_cap_v2'")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Betas whose cumulative product of (1 - beta) follows alpha_bar(t) on t in [0, 1]."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1, t2 = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def schedule_tables(betas):
    """Every per-timestep quantity the process looks up, as float64 numpy arrays by name."""
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    # q(x_{t-1} | x_t, x_0). Its variance is 0 at t = 0, so the log is clipped to the value at
    # t = 1 (a one-step process has none: beta_0 stands in, its value only scales masked noise).
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    variance_at_0 = posterior_variance[1] if len(betas) > 1 else betas[0]
    posterior_variance_clipped = np.append(variance_at_0, posterior_variance[1:])
    # beta_t, with the better-behaved posterior variance at t = 0 for the log-likelihood.
    fixed_large_variance = np.append(variance_at_0, betas[1:])
    return {
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "log_betas": np.log(betas),
        # q(x_t | x_0) and its inversion
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(posterior_variance_clipped),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        "fixed_large_variance": fixed_large_variance,
        "fixed_large_log_variance": np.log(fixed_large_variance),
    }


def _split_learned_sigma(model_output, channels):
    """[mean part, variance values] of a learned-sigma model's 2 * channels output."""
    if model_output.shape[1] != 2 * channels:
        raise ValueError(f"a learned-sigma model must output {2 * channels} channels, got {model_output.shape[1]}")
    return torch.split(model_output, channels, dim=1)


class GaussianDiffusion:
    """A diffusion process over the given betas: forward noising, the model's reverse steps, losses."""

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        tables = schedule_tables(betas)
        # The numpy arrays stay readable as attributes (diffusion.alphas_cumprod, ...), as in the reference.
        for name, values in tables.items():
            setattr(self, name, values)
        self._tables = DeviceCopies(**{name: torch.from_numpy(values) for name, values in tables.items()})

    @property
    def learns_sigma(self):
        """Whether the model outputs the variance too (2 * C channels)."""
        return self.model_var_type == ModelVarType.LEARNED_RANGE

    def training_times(self, n, generator=None, device=None):
        """n training timesteps, uniform over the process's steps (one draw from `generator`)."""
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)

    def noise_level(self, model_t):
        """The noise level in [0, 1] of the model's timestep input (its first value, kept on the host)."""
        return host_timestep(model_t) / self.num_timesteps

    def _lookup(self, name, t, broadcast_shape):
        """Table `name` at timesteps t as float32 on t's device, broadcast to broadcast_shape."""
        values = self._tables.get(name, t.device)[t].float()  # gathered in float64, cast after
        return values.view(-1, *([1] * (len(broadcast_shape) - 1))).expand(broadcast_shape)

    # ----------------------------------------------------------------- forward process
    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (self._lookup("sqrt_alphas_cumprod", t, x_start.shape) * x_start
                + self._lookup("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._lookup("posterior_mean_coef1", t, x_t.shape) * x_start
                + self._lookup("posterior_mean_coef2", t, x_t.shape) * x_t)
        variance = self._lookup("posterior_variance", t, x_t.shape)
        log_variance = self._lookup("posterior_log_variance_clipped", t, x_t.shape)
        return mean, variance, log_variance

    # ----------------------------------------------------------------- reverse process
    def p_mean_variance(self, model, x, t, clip_denoised=True, *, model_kwargs=None):
        """The model's p(x_{t-1} | x_t): dict of mean, variance, log_variance, pred_xstart."""
        model_output = model(x, t, **(model_kwargs or {}))
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            model_output, model_var_values = _split_learned_sigma(model_output, x.shape[1])
            min_log = self._lookup("posterior_log_variance_clipped", t, x.shape)
            max_log = self._lookup("log_betas", t, x.shape)
            frac = (model_var_values + 1) / 2  # the model outputs values in [-1, 1]
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            variance_table, log_variance_table = _FIXED_VARIANCE_TABLES[self.model_var_type]
            model_variance = self._lookup(variance_table, t, x.shape)
            model_log_variance = self._lookup(log_variance_table, t, x.shape)

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = model_output
        elif self.model_mean_type == ModelMeanType.VELOCITY:
            pred_xstart = self._predict_xstart_from_v(x, t, model_output)
        else:
            pred_xstart = self._predict_xstart_from_eps(x, t, model_output)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": model_mean, "variance": model_variance, "log_variance": model_log_variance,
                "pred_xstart": pred_xstart}

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (self._lookup("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
                - self._lookup("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._lookup("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart)
                / self._lookup("sqrt_recipm1_alphas_cumprod", t, x_t.shape))

    # v-prediction: with a = sqrt(abar), s = sqrt(1 - abar) (a^2 + s^2 = 1), x_t = a x_0 + s eps and
    # v = a eps - s x_0, so x_0 = a x_t - s v and eps = s x_t + a v.
    def _predict_xstart_from_v(self, x_t, t, v):
        return (self._lookup("sqrt_alphas_cumprod", t, x_t.shape) * x_t
                - self._lookup("sqrt_one_minus_alphas_cumprod", t, x_t.shape) * v)

    def _predict_eps_from_v(self, x_t, t, v):
        return (self._lookup("sqrt_one_minus_alphas_cumprod", t, x_t.shape) * x_t
                + self._lookup("sqrt_alphas_cumprod", t, x_t.shape) * v)

    def velocity_target(self, x_start, t, noise):
        """v for x_0 and eps at timesteps t: the v-prediction training target."""
        return (self._lookup("sqrt_alphas_cumprod", t, x_start.shape) * noise
                - self._lookup("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * x_start)

    @staticmethod
    def _nonzero_mask(t, x):
        """1 where t > 0: no noise is added at the last step."""
        return (t != 0).float().view(-1, *([1] * (x.ndim - 1)))

    def p_sample(self, model, x, t, clip_denoised=True, *, model_kwargs=None):
        """One ancestral step x_t -> x_{t-1}."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs=model_kwargs)
        noise = torch.randn_like(x)
        sample = out["mean"] + self._nonzero_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=True, *, model_kwargs=None, eta=0.0):
        """One DDIM step (Song et al. 2021); eta = 1 is ancestral-like, eta = 0 deterministic."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        # In float32 from the float32 lookups, as the reference computes it.
        alpha_bar = self._lookup("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._lookup("alphas_cumprod_prev", t, x.shape)
        sigma = (eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * torch.sqrt(1 - alpha_bar / alpha_bar_prev))
        noise = torch.randn_like(x)  # drawn even for eta = 0, keeping the RNG stream aligned
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        sample = mean_pred + self._nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _loop(self, step, model, shape, noise, device, progress, **step_kwargs):
        """Yield step(...) for t = T-1 down to 0, each step starting from the last one's sample."""
        if device is None:
            device = next(model.parameters()).device
        img = noise if noise is not None else torch.randn(*shape, device=device)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            indices = tqdm(indices, desc="sampling", leave=False)
        for i in indices:
            t = timestep_batch(i, shape[0], device)  # filled on the device, no copy
            with torch.no_grad():
                out = step(model, img, t, **step_kwargs)
            yield out
            img = out["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, *, model_kwargs=None,
                                  device=None, progress=False):
        """Yield each ancestral step's {"sample", "pred_xstart"}, from t = T-1 down to 0."""
        yield from self._loop(self.p_sample, model, shape, noise, device, progress, clip_denoised=clip_denoised,
                              model_kwargs=model_kwargs)

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, *, model_kwargs=None, device=None,
                      progress=False):
        """Ancestral (DDPM) sampling; returns the final sample."""
        for out in self.p_sample_loop_progressive(model, shape, noise, clip_denoised, model_kwargs=model_kwargs,
                                                  device=device, progress=progress):
            pass  # only the last step's sample is kept alive
        return out["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, *, model_kwargs=None,
                                     device=None, progress=False, eta=0.0):
        """Yield each DDIM step's {"sample", "pred_xstart"}, from t = T-1 down to 0."""
        yield from self._loop(self.ddim_sample, model, shape, noise, device, progress, clip_denoised=clip_denoised,
                              model_kwargs=model_kwargs, eta=eta)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, *, model_kwargs=None, device=None,
                         progress=False, eta=0.0):
        """DDIM sampling; returns the final sample."""
        for out in self.ddim_sample_loop_progressive(model, shape, noise, clip_denoised, model_kwargs=model_kwargs,
                                                     device=device, progress=progress, eta=eta):
            pass  # only the last step's sample is kept alive
        return out["sample"]

    # ----------------------------------------------------------------- losses
    def _vb_terms_bpd(self, model, x_start, x_t, t, model_kwargs=None):
        """The variational-bound term for step t in bits per dimension (decoder NLL at t = 0)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def _mse_target(self, x_start, t, noise):
        """What the model's mean output is trained to predict."""
        if self.model_mean_type == ModelMeanType.START_X:
            return x_start
        if self.model_mean_type == ModelMeanType.VELOCITY:
            return self.velocity_target(x_start, t, noise)
        return noise

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-example losses for timesteps t: dict with "loss" (and "mse", "vb" for the hybrid loss)."""
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        if self.loss_type == LossType.RESCALED_KL:
            return {"loss": self._vb_terms_bpd(model, x_start, x_t, t, model_kwargs) * self.num_timesteps}

        terms = {}
        model_output = model(x_t, t, **model_kwargs)
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            model_output, model_var_values = _split_learned_sigma(model_output, x_t.shape[1])
            # The bound trains only the variance: the mean is frozen so the MSE alone shapes it.
            frozen = torch.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *args, **kwargs: frozen, x_start, x_t, t)
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        terms["mse"] = mean_flat((self._mse_target(x_start, t, noise) - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms
