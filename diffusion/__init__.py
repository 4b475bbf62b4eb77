"""Gaussian diffusion for DiT: schedules, training losses, DDPM/DDIM samplers, respacing; the
linear flow-matching process (flow.py); and the one owner of everything that depends on the
training objective (eps, v or flow): objectives.py (flags, the recorded diffusion_args, the
process they build, resuming) and samplers.py (which sampler fits which objective, and how each
runs). Scripts call `process.training_losses` and the samplers' run functions; they never branch
on the prediction type.

    process = create_process(diffusion_args)          # a checkpoint's record; None: the release's
    t = process.training_times(n, generator, device)  # a batch's training times
    loss = process.training_losses(model, x, t, dict(y=y))["loss"]
"""
from .objectives import (DEFAULT_DIFFUSION_ARGS, OBJECTIVES, ProcessError, add_process_flags, create_diffusion,
                         create_process, guides_all_channels, objective_of, process_model_args, run_diffusion_args)

__all__ = ["DEFAULT_DIFFUSION_ARGS", "OBJECTIVES", "ProcessError", "add_process_flags", "create_diffusion",
           "create_process", "guides_all_channels", "objective_of", "process_model_args", "run_diffusion_args"]
