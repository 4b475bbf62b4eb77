"""Gaussian diffusion for DiT: schedules, training losses, DDPM/DDIM samplers, respacing; and the
linear flow-matching process (flow.py). A checkpoint's diffusion_args name its training
objective: eps (no "objective" key, the release's), v, or flow; create_process builds it."""
from . import gaussian_diffusion as gd
from .flow import LinearFlow
from .respace import SpacedDiffusion, space_timesteps

OBJECTIVES = ("eps", "v", "flow")
# The samplers that fit each objective; the first is the default when none is asked for (a
# script may prefer another Gaussian one, e.g. digits.py's ddim).
SAMPLERS_FOR = {
    "eps": ("ddpm", "ddim", "dpm-solver"),
    "v": ("ddpm", "ddim", "dpm-solver"),
    "flow": ("heun", "euler", "dopri5", "sde"),
}


def create_diffusion(
    timestep_respacing,
    noise_schedule="linear",
    use_kl=False,
    sigma_small=False,
    predict_xstart=False,
    learn_sigma=True,
    rescale_learned_sigmas=False,
    diffusion_steps=1000,
    predict_v=False,
):
    """The diffusion process DiT trains and samples with.

    timestep_respacing: "" (all steps), "250" (evenly spaced), "ddim50" (integer stride),
    or section counts such as "10,20,30". predict_v: the model predicts v instead of the noise.
    """
    if predict_v and predict_xstart:
        raise ValueError("predict_v and predict_xstart exclude each other; pick one prediction target")
    betas = gd.get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    mean_type = gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.VELOCITY if predict_v else mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
    )


def objective_of(diffusion_args):
    """eps, v or flow: what a checkpoint's diffusion_args say it was trained with."""
    objective = (diffusion_args or {}).get("objective", "eps")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown training objective {objective!r}; this code knows {', '.join(OBJECTIVES)}")
    return objective


def create_process(diffusion_args=None, timestep_respacing=""):
    """The process diffusion_args describe: a (respaced) GaussianDiffusion for eps and v, a
    LinearFlow for flow (which has no timesteps to respace)."""
    args = dict(diffusion_args or {})
    objective = objective_of(args)
    args.pop("objective", None)
    if objective == "flow":
        return LinearFlow(**args)
    return create_diffusion(timestep_respacing, predict_v=objective == "v", **args)
