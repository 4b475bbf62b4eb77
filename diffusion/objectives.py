"""The training objectives, one entry each in OBJECTIVES, and every question whose answer depends
on the objective: its flags (--objective and the ones it takes), the diffusion_args a checkpoint
records, the process they build, whether the DiT learns sigma, whether guidance covers every
channel, and what a resumed run continues with. (Which samplers fit an objective: samplers.py.)

A checkpoint's diffusion_args name its objective: no "objective" key is eps (the release's, and
everything trained before objectives were recorded), else "objective": "v" or "flow".

Adding an objective: an entry in OBJECTIVES (its record and build functions, and its flags if it
has any), and its name in the `objectives` of the samplers that fit it (samplers.py).
"""
import dataclasses
import math

from . import gaussian_diffusion as gd
from .flow import T_SAMPLINGS, LinearFlow
from .respace import SpacedDiffusion, space_timesteps

# What the release trained with: create_diffusion's settings, recorded by eps runs as they are.
DEFAULT_DIFFUSION_ARGS = {"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True}


class ProcessError(ValueError):
    """A process setting that does not fit (a flag, a checkpoint's record, a sampler): the user's
    mistake, in one line. The scripts report it as cli.UserError."""


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


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    help: str  # for --objective's help
    record: object  # (**values of its flags given) -> the diffusion_args a fresh run records
    build: object  # (diffusion_args without "objective", timestep_respacing) -> the process
    guides_all_channels: bool  # False: guidance covers the first three channels (the release's eps quirk)
    flags: dict = dataclasses.field(default_factory=dict)  # its own flags: attribute name -> argparse spec


def _gaussian(**prediction):
    """build for a Gaussian process whose model predicts `prediction` (create_diffusion's predict_*; none: eps)."""
    def build(diffusion_args, timestep_respacing):
        return create_diffusion(timestep_respacing, **prediction, **diffusion_args)
    return build


def _flow_record(t_sampling="uniform", t_mean=None, t_scale=None):
    """Flow's record: the logit-normal's shape only where it applies, so uniform runs record what they always did."""
    if t_sampling == "uniform" and (t_mean is not None or t_scale is not None):
        raise ProcessError("--t-mean and --t-scale shape the logit-normal; add --t-sampling logit-normal or "
                           "drop them")
    t_mean = 0.0 if t_mean is None else t_mean
    t_scale = 1.0 if t_scale is None else t_scale
    if not math.isfinite(t_mean):
        raise ProcessError(f"--t-mean {t_mean} must be a finite number, e.g. 0.0")
    if not (math.isfinite(t_scale) and t_scale > 0):
        raise ProcessError(f"--t-scale {t_scale} must be positive, e.g. 1.0")
    shape = {"t_mean": t_mean, "t_scale": t_scale} if t_sampling == "logit-normal" else {}
    return {"objective": "flow", "t_sampling": t_sampling, **shape}


OBJECTIVES = {objective.name: objective for objective in (
    Objective("eps", "the release's noise prediction with learned sigma (hybrid loss)",
              lambda: dict(DEFAULT_DIFFUSION_ARGS), _gaussian(), guides_all_channels=False),
    Objective("v", "v-prediction on the same schedule, learned sigma too",
              lambda: {**DEFAULT_DIFFUSION_ARGS, "objective": "v"}, _gaussian(predict_v=True),
              guides_all_channels=True),
    Objective("flow", "linear flow matching, x_t = (1 - t) x_0 + t eps, velocity target, the model fed t * 1000",
              _flow_record, lambda diffusion_args, timestep_respacing: LinearFlow(**diffusion_args),
              guides_all_channels=True, flags={
                  "t_sampling": dict(choices=T_SAMPLINGS, help="how t is drawn (default uniform); logit-normal: "
                                     "t = sigmoid(--t-mean + --t-scale * n), n ~ N(0, 1), as Stable Diffusion 3"),
                  "t_mean": dict(type=float, help="logit-normal: location (default 0.0)"),
                  "t_scale": dict(type=float, help="logit-normal: scale (default 1.0)")}),
)}


def objective_of(diffusion_args):
    """eps, v or flow: what a checkpoint's diffusion_args say it was trained with."""
    objective = (diffusion_args or {}).get("objective", "eps")
    if objective not in OBJECTIVES:
        raise ProcessError(f"unknown training objective {objective!r}; this code knows {', '.join(OBJECTIVES)}; "
                           f"update the code")
    return objective


def create_process(diffusion_args=None, timestep_respacing=""):
    """The process diffusion_args describe: a (respaced) GaussianDiffusion for eps and v, a
    LinearFlow for flow (which has no timesteps to respace)."""
    args = dict(diffusion_args or {})
    objective = OBJECTIVES[objective_of(args)]
    args.pop("objective", None)
    return objective.build(args, timestep_respacing)


def guides_all_channels(diffusion_args):
    """Whether guidance covers every channel: the release guides the first three only, a quirk kept
    for eps to reproduce its FID; the other objectives have no such history."""
    return OBJECTIVES[objective_of(diffusion_args)].guides_all_channels


def process_model_args(diffusion_args):
    """The DiT constructor arguments the process decides: learn_sigma (a flow model predicts the
    velocity alone, no sigma channels)."""
    return {"learn_sigma": create_process(diffusion_args).learns_sigma}


# ------------------------------------------------------------------ the flags of the process
def _flag(name):
    return "--" + name.replace("_", "-")


def process_flag_names():
    """The attribute names of the process flags: objective, then each objective's own."""
    return ["objective", *dict.fromkeys(name for o in OBJECTIVES.values() for name in o.flags)]


def add_process_flags(parser):
    """--objective and the objectives' own flags (--t-sampling, --t-mean, --t-scale), all defaulting
    to None: "not given", so that a resume takes the checkpoint's values (run_diffusion_args)."""
    parser.add_argument("--objective", choices=list(OBJECTIVES), default=None,
                        help="; ".join(f"{o.name}: {o.help}" for o in OBJECTIVES.values())
                             + " (default eps; a resume: the checkpoint's)")
    for objective in OBJECTIVES.values():
        for name, spec in objective.flags.items():
            parser.add_argument(_flag(name), **{**spec, "default": None,
                                                "help": f"--objective {objective.name}: {spec['help']}"})


def run_diffusion_args(flags, recorded=None):
    """The diffusion_args of a training run, from the parsed process flags (None where not given).
    A fresh run (recorded None): the given objective's (default eps) record of its flags. A resume
    (recorded: the checkpoint's diffusion_args): the record as it is; a given flag must repeat its
    field, else ProcessError names the flag, the checkpoint's value and the given one. Every field
    of the record is compared so: a flag named after any of them (--learn-sigma, say) counts."""
    names = process_flag_names() + [name for name in recorded or {} if name not in process_flag_names()]
    given = {name: getattr(flags, name) for name in names if getattr(flags, name, None) is not None}
    if recorded is None:
        objective = OBJECTIVES[given.pop("objective", "eps")]
        others = [name for name in given if name not in objective.flags]
        if others:
            owner = " or ".join(o.name for o in OBJECTIVES.values() if others[0] in o.flags)
            raise ProcessError(f"{', '.join(map(_flag, others))} only apply to --objective {owner} (this run: "
                               f"{objective.name}); drop them or add --objective {owner}")
        result = objective.record(**given)
    else:
        _check_repeats(given, recorded)
        result = dict(recorded)
    try:
        create_process(result)  # a record this code cannot build is refused before any work
    except ValueError as e:  # the schedule's or LinearFlow's own checks
        raise ProcessError(f"the process {result} cannot be built: {e}") from None
    return result


def _check_repeats(given, recorded):
    """Every given flag against the record's field of the same name (the objective: eps when absent)."""
    theirs = {**recorded, "objective": objective_of(recorded)}
    for name, value in given.items():
        if theirs.get(name) == value:
            continue
        if name in theirs:
            trained = f"{_flag(name)} {theirs[name]}"
        else:
            shown = [f"{_flag(k)} {theirs[k]}" for k in process_flag_names() if k in theirs]
            trained = f"{' '.join(shown)} (no {_flag(name)})"
        raise ProcessError(f"{_flag(name)} {value} contradicts the checkpoint, trained with {trained}; drop "
                           f"{_flag(name)} (a resume continues the checkpoint's process)")
