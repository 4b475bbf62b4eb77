"""Respacing: run a diffusion process on a subset of its timesteps (fewer sampling steps)."""
import numpy as np
import torch

from .diffusion_utils import DeviceCopies, host_timestep, with_host_timestep
from .gaussian_diffusion import GaussianDiffusion

RESPACING_FORMS = ('"" (all steps), "N" (N evenly spaced steps, e.g. "250"), "ddimN" (N steps with an '
                   'integer stride, e.g. "ddim50"), or comma-separated section counts (e.g. "10,20,30")')


def space_timesteps(num_timesteps, section_counts):
    """The set of original timesteps to keep.

    section_counts is a list of per-section step counts (the process is cut into equal
    sections, each evenly strided), a string of them ("10,20,30"), or "ddimN" for the
    integer stride that yields exactly N steps as in the DDIM paper.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired = int(section_counts[len("ddim"):])
            except ValueError:
                raise ValueError(f"cannot parse respacing {section_counts!r}; use {RESPACING_FORMS}") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps out of {num_timesteps} with an integer "
                             f"stride ({section_counts!r}); use another count or {RESPACING_FORMS}")
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"cannot parse respacing {section_counts!r}; use {RESPACING_FORMS}") from None
    if not section_counts or any(c < 0 for c in section_counts) or sum(section_counts) == 0:
        raise ValueError(f"respacing {section_counts!r} keeps no steps; use {RESPACING_FORMS}")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, all_steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count} (respacing "
                             f"{section_counts!r} of {num_timesteps} steps); use {RESPACING_FORMS}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        all_steps += [start + round(stride * j) for j in range(count)]
        start += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the kept timesteps of a base process.

    The betas are recomputed so each kept step jumps between the kept alpha-bars; the model
    still sees the original timestep indices.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        base = GaussianDiffusion(**kwargs)
        self.original_num_steps = base.num_timesteps
        self.timestep_map = []
        new_betas, last_alpha_cumprod = [], 1.0
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)
        self._original_timesteps = DeviceCopies(timestep_map=torch.tensor(self.timestep_map, dtype=torch.long))

    def noise_level(self, model_t):
        """The noise level in [0, 1] of the model's timestep input: an original timestep / their count."""
        return host_timestep(model_t) / self.original_num_steps

    def _wrap(self, model):
        if isinstance(model, _OriginalTimesteps):
            return model
        return _OriginalTimesteps(model, self._original_timesteps)

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap(model), *args, **kwargs)


class _OriginalTimesteps:
    """Calls the model with original timestep indices instead of respaced ones."""

    def __init__(self, model, original_timesteps):
        self.model = model
        self.original_timesteps = original_timesteps  # DeviceCopies holding "timestep_map"

    def __call__(self, x, ts, **kwargs):
        # Gathered on ts's device from a copy made once per device: no host round trip per call.
        original = self.original_timesteps.get("timestep_map", ts.device)[ts].to(ts.dtype)
        if getattr(ts, "host_timestep", None) is not None:  # and the host's copy, mapped on the host
            host_map = self.original_timesteps.get("timestep_map", torch.device("cpu"))
            with_host_timestep(original, int(host_map[ts.host_timestep]))
        return self.model(x, original, **kwargs)

    def parameters(self):
        return self.model.parameters()
