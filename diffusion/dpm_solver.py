"""DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver of the probability-flow
ODE, about ten times fewer model calls than ancestral sampling for the same quality.

The solver itself is diffusers' DPMSolverMultistepScheduler, set up on the betas of the
1000-step process DiT was trained with. Two things have to be wired by hand: DiT's
learned-sigma output is [noise, variance] and the solver must see only the noise half
(diffusers' own learned-variance switch keeps the first three channels, wrong for 4-channel
latents), and the model is called with the scheduler's original timestep indices. A v-prediction
model (train.py --objective v) runs through the same solver with prediction_type="v_prediction".
"""
import torch
from tqdm.auto import tqdm

from .diffusion_utils import timestep_batch


def make_scheduler(betas, num_steps, prediction_type="epsilon"):
    """The solver's timestep grid over the training process: num_steps points from T-1 towards 0."""
    from diffusers import DPMSolverMultistepScheduler  # heavy, and only this sampler needs it

    if not 1 <= num_steps <= len(betas):
        raise ValueError(f"the DPM-Solver needs between 1 and {len(betas)} steps, got {num_steps}")
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=len(betas),
        trained_betas=[float(b) for b in betas],
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type=prediction_type,  # "epsilon" (DiT's) or "v_prediction"
        final_sigmas_type="zero",  # the last step lands on the clean sample
    )
    scheduler.set_timesteps(num_steps)
    return scheduler


@torch.no_grad()
def dpm_solver_sample_loop(model, noise, betas, num_steps, model_kwargs=None, progress=False,
                           prediction_type="epsilon"):
    """Integrate from `noise` (x_T) to a clean sample; `model(x, t, **model_kwargs)` returns
    the noise prediction (or v for prediction_type="v_prediction") in its first x.shape[1]
    channels (any further channels are ignored)."""
    model_kwargs = model_kwargs or {}
    scheduler = make_scheduler(betas, num_steps, prediction_type)
    x = noise
    channels = noise.shape[1]
    steps = tqdm(scheduler.timesteps, desc="sampling", leave=False) if progress else scheduler.timesteps
    for t in steps:
        t_batch = timestep_batch(int(t), x.shape[0], x.device)
        prediction = model(x, t_batch, **model_kwargs)[:, :channels]
        x = scheduler.step(prediction.float(), t, x).prev_sample
    return x
