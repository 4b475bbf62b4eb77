"""Gaussian diffusion (Ho et al. 2020) with the learned-range variance and hybrid loss of
Improved DDPM (Nichol & Dhariwal 2021), as used by DiT.

Schedule quantities are kept in float64 numpy arrays and gathered per timestep as float32,
so results match the reference implementation to float32 precision.
"""
import enum
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion_utils import discretized_gaussian_log_likelihood, mean_flat, normal_kl


class ModelMeanType(enum.Enum):
    PREVIOUS_X = enum.auto()  # the model predicts x_{t-1}
    START_X = enum.auto()  # the model predicts x_0
    EPSILON = enum.auto()  # the model predicts the noise


class ModelVarType(enum.Enum):
    LEARNED = enum.auto()  # the model outputs log-variance
    FIXED_SMALL = enum.auto()  # posterior variance
    FIXED_LARGE = enum.auto()  # beta_t
    LEARNED_RANGE = enum.auto()  # the model interpolates between the two in log space


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE, plus the variational bound when the variance is learned
    RESCALED_MSE = enum.auto()  # as MSE, with the bound term scaled by num_timesteps / 1000
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # the variational bound times num_timesteps

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


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
    betas = []
    for i in range(num_diffusion_timesteps):
        t1, t2 = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def _extract(arr, timesteps, broadcast_shape):
    """arr[timesteps] as float32 on the timesteps' device, broadcast to broadcast_shape."""
    values = torch.from_numpy(arr[timesteps.detach().cpu().numpy()]).float().to(timesteps.device)
    values = values.view(-1, *([1] * (len(broadcast_shape) - 1)))
    return values.expand(broadcast_shape)


class GaussianDiffusion:
    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log is clipped to the value at t = 1.
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(self.posterior_variance) > 1 else np.array([])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # ----------------------------------------------------------------- forward process
    def q_mean_variance(self, x_start, t):
        mean = _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (_extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = (_extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        variance = _extract(self.posterior_variance, t, x_t.shape)
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # ----------------------------------------------------------------- reverse process
    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """The model's p(x_{t-1} | x_t): dict of mean, variance, log_variance, pred_xstart, extra."""
        model_kwargs = model_kwargs or {}
        C = x.shape[1]
        model_output = model(x, t, **model_kwargs)
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"a learned-sigma model must output {2 * C} channels, got {model_output.shape[1]}")
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                min_log = _extract(self.posterior_log_variance_clipped, t, x.shape)
                max_log = _extract(np.log(self.betas), t, x.shape)
                frac = (model_var_values + 1) / 2  # the model outputs values in [-1, 1]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                # beta_t, with the better-behaved posterior variance at t = 0 for the log-likelihood.
                variance = np.append(self.posterior_variance[1], self.betas[1:])
                log_variance = np.log(variance)
            else:
                variance, log_variance = self.posterior_variance, self.posterior_log_variance_clipped
            model_variance = _extract(variance, t, x.shape)
            model_log_variance = _extract(log_variance, t, x.shape)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        elif self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, model_output))
        else:
            raise NotImplementedError(self.model_mean_type)
        model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": model_mean, "variance": model_variance, "log_variance": model_log_variance,
                "pred_xstart": pred_xstart, "extra": extra}

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    @staticmethod
    def _nonzero_mask(t, x):
        """1 where t > 0: no noise is added at the last step."""
        return (t != 0).float().view(-1, *([1] * (x.ndim - 1)))

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """One ancestral step x_t -> x_{t-1}."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = torch.randn_like(x)
        sample = out["mean"] + self._nonzero_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0):
        """One DDIM step (Song et al. 2021); eta = 1 is ancestral-like, eta = 0 deterministic."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract(self.alphas_cumprod_prev, t, x.shape)
        sigma = (eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * torch.sqrt(1 - alpha_bar / alpha_bar_prev))
        noise = torch.randn_like(x)  # drawn even for eta = 0, keeping the RNG stream aligned
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        sample = mean_pred + self._nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _loop(self, step, model, shape, noise, device, progress, **step_kwargs):
        if device is None:
            device = next(model.parameters()).device
        img = noise if noise is not None else torch.randn(*shape, device=device)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            indices = tqdm(indices, desc="sampling", leave=False)
        for i in indices:
            t = torch.tensor([i] * shape[0], device=device)
            with torch.no_grad():
                out = step(model, img, t, **step_kwargs)
            yield out
            img = out["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  model_kwargs=None, device=None, progress=False):
        """Yield each ancestral step's {"sample", "pred_xstart"}, from t = T-1 down to 0."""
        yield from self._loop(self.p_sample, model, shape, noise, device, progress, clip_denoised=clip_denoised,
                              denoised_fn=denoised_fn, model_kwargs=model_kwargs)

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                      model_kwargs=None, device=None, progress=False):
        """Ancestral (DDPM) sampling; returns the final sample."""
        final = None
        for final in self.p_sample_loop_progressive(model, shape, noise, clip_denoised, denoised_fn,
                                                    model_kwargs, device, progress):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     model_kwargs=None, device=None, progress=False, eta=0.0):
        yield from self._loop(self.ddim_sample, model, shape, noise, device, progress, clip_denoised=clip_denoised,
                              denoised_fn=denoised_fn, model_kwargs=model_kwargs, eta=eta)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0):
        """DDIM sampling; returns the final sample."""
        final = None
        for final in self.ddim_sample_loop_progressive(model, shape, noise, clip_denoised, denoised_fn,
                                                       model_kwargs, device, progress, eta):
            pass
        return final["sample"]

    # ----------------------------------------------------------------- losses
    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """The variational-bound term for step t in bits per dimension (decoder NLL at t = 0)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-example losses for timesteps t: dict with "loss" (and "mse", "vb" for the hybrid loss)."""
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False,
                                               model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = model(x_t, t, **model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            C = x_t.shape[1]
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"a learned-sigma model must output {2 * C} channels, got {model_output.shape[1]}")
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            # The bound trains only the variance: the mean is frozen so the MSE alone shapes it.
            frozen = torch.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *args, **kwargs: frozen, x_start, x_t, t,
                                             clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        if self.model_mean_type == ModelMeanType.EPSILON:
            target = noise
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None):
        """The whole variational bound in bits per dimension, with per-step terms."""
        device = x_start.device
        batch_size = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for step in reversed(range(self.num_timesteps)):
            t = torch.full((batch_size,), step, device=device, dtype=torch.long)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=clip_denoised,
                                         model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            mse.append(mean_flat((self._predict_eps_from_xstart(x_t, t, out["pred_xstart"]) - noise) ** 2))
        vb = torch.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {"total_bpd": vb.sum(dim=1) + prior_bpd, "prior_bpd": prior_bpd, "vb": vb,
                "xstart_mse": torch.stack(xstart_mse, dim=1), "mse": torch.stack(mse, dim=1)}
