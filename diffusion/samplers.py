"""The samplers, one entry each in SAMPLERS: the objectives whose models it samples, its default
step count, the process it runs on, and the function that runs it. sampling.generate looks a
sampler up here and hands it a Job (the guided model function, the start noise, the per-step
noise source); cli's --sampler choices and help come from this table.

    ddpm        ancestral sampling on `steps` evenly respaced timesteps (the original sample.py's)
    ddim        deterministic DDIM on the "ddimN" respacing
    dpm-solver  DPM-Solver++(2M) over the full process (dpm_solver.py)
    heun, euler, dopri5, sde    the flow integrators (flow.py)

Adding a sampler: an entry in SAMPLERS (and its run function here).
"""
import dataclasses

import torch
from tqdm.auto import tqdm

from . import flow
from .diffusion_utils import timestep_batch
from .dpm_solver import dpm_solver_sample_loop
from .gaussian_diffusion import ModelMeanType
from .objectives import ProcessError, create_process


@dataclasses.dataclass
class Job:
    """One sampling run, as sampling.generate hands it to a sampler."""
    model: object  # model(x, t, **model_kwargs): the (guided) prediction in float32
    noise: torch.Tensor  # x at the noisy end: the batch (with guidance, the n samples twice)
    model_kwargs: dict  # the model's other inputs (y), one row per batch row
    samples: int  # n: batch rows i, i + n, ... belong to sample i
    steps: int
    options: dict  # the sampler's own settings (Sampler.options): atol, rtol (dopri5), sde_diffusion (sde)
    step_noise: object = None  # the next (n, C, H, W) per-step noise; None: the global RNG
    progress: bool = False

    def next_noise(self):
        """The next per-step noise for the whole batch: step_noise()'s n draws, repeated for the
        guided half (which follows its conditional twin), or the global RNG's."""
        if self.step_noise is None:
            return torch.randn_like(self.noise)
        return self.step_noise().to(self.noise.device).repeat(len(self.noise) // self.samples, 1, 1, 1)

    def velocity(self, process, model_kwargs=None):
        """The flow samplers' velocity(x, t) over this job's model."""
        return process.velocity_field(self.model, self.model_kwargs if model_kwargs is None else model_kwargs,
                                      self.noise.shape[1])


# ------------------------------------------------------------------ the run functions: (process, job) -> x at t = 0
def _ddpm(process, job):
    if job.step_noise is None:  # the original sample.py's loop and global RNG draws, exactly
        return process.p_sample_loop(job.model, job.noise.shape, job.noise, clip_denoised=False,
                                     model_kwargs=job.model_kwargs, progress=job.progress, device=job.noise.device)
    # Per-step noise from step_noise(): each sample's result depends on its own seed only, not on
    # which batch or process it ran in.
    x = job.noise
    steps = range(process.num_timesteps - 1, -1, -1)
    for i in tqdm(steps, desc="sampling", leave=False) if job.progress else steps:
        t = timestep_batch(i, len(x), x.device)
        out = process.p_mean_variance(job.model, x, t, clip_denoised=False, model_kwargs=job.model_kwargs)
        if i == 0:  # no noise on the last step
            return out["mean"]
        x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * job.next_noise()
    return x


def _ddim(process, job):
    return process.ddim_sample_loop(job.model, job.noise.shape, job.noise, clip_denoised=False,
                                    model_kwargs=job.model_kwargs, progress=job.progress, device=job.noise.device,
                                    eta=0.0)


# What the solver calls each Gaussian process's model output.
SOLVER_PREDICTIONS = {ModelMeanType.EPSILON: "epsilon", ModelMeanType.VELOCITY: "v_prediction",
                      ModelMeanType.START_X: "sample"}


def _dpm_solver(process, job):
    return dpm_solver_sample_loop(job.model, job.noise, process.betas, job.steps, job.model_kwargs, job.progress,
                                  prediction_type=SOLVER_PREDICTIONS[process.model_mean_type])


def _heun(process, job):
    return flow.heun_sample(job.velocity(process), job.noise, job.steps, job.progress)


def _euler(process, job):
    return flow.euler_sample(job.velocity(process), job.noise, job.steps, job.progress)


def _sde(process, job):
    return flow.sde_sample(job.velocity(process), job.noise, job.steps, job.options["sde_diffusion"],
                           job.next_noise, job.progress)


def _dopri5(process, job):
    atol, rtol = job.options["atol"], job.options["rtol"]
    if job.step_noise is None:
        return flow.dopri5_sample(job.velocity(process), job.noise, atol, rtol)
    # Seeded mode (sample_ddp.py, generate_from_checkpoint) promises samples that do not depend on
    # their batch; an adaptive step size shared by a batch would. So each sample (with its guided
    # twin) is solved on its own steps: batch-1 model calls, the price of that promise.
    n, out = job.samples, torch.empty_like(job.noise)
    for i in range(n):
        rows = {name: value[i::n] for name, value in job.model_kwargs.items()}
        out[i::n] = flow.dopri5_sample(job.velocity(process, rows), job.noise[i::n], atol, rtol)
    return out


# ------------------------------------------------------------------ the processes they run on
def _respaced(form):
    """The process on the respacing `form` (e.g. "{}" or "ddim{}") of the step count."""
    def process(diffusion_args, steps):
        return create_process(diffusion_args, form.format(steps))
    return process


def _whole_process(diffusion_args, steps):
    """The process as trained (the flow samplers' time grid is their own: `steps` is theirs)."""
    return create_process(diffusion_args)


def _solver_process(diffusion_args, steps):
    """The full process, whose timesteps the solver picks `steps` of."""
    process = create_process(diffusion_args)
    if steps > process.num_timesteps:
        raise ValueError(f"it exceeds the {process.num_timesteps} steps of the process; use at most "
                         f"{process.num_timesteps} (25 is typical)")
    return process


@dataclasses.dataclass(frozen=True)
class SamplerEntry:
    name: str
    objectives: tuple  # the objectives whose models it samples
    run: object  # run(process, job) -> x at t = 0
    help: str  # a few words for --sampler's help
    steps: int = None  # its default step count; None: the script's; 0: adaptive (it takes none)
    process: object = _whole_process  # (diffusion_args, steps) -> the process it runs on
    options: tuple = ()  # the names of its own settings, passed in Job.options
    no_caching: str = ""  # why it cannot reuse block outputs (BlockCache); "" where it can


GAUSSIAN, FLOW = ("eps", "v"), ("flow",)
# In the order --sampler's help lists them; an objective's first sampler is its default where the
# script's default does not fit it.
SAMPLERS = {entry.name: entry for entry in (
    # The release's 250 for ddpm; the counts the README recommends for the fast ones.
    SamplerEntry("ddpm", GAUSSIAN, _ddpm, "ancestral, as the original", steps=250, process=_respaced("{}")),
    SamplerEntry("ddim", GAUSSIAN, _ddim, "deterministic", steps=50, process=_respaced("ddim{}")),
    SamplerEntry("dpm-solver", GAUSSIAN, _dpm_solver, "DPM-Solver++(2M)", steps=25, process=_solver_process),
    SamplerEntry("heun", FLOW, _heun, "2nd order", steps=16),
    SamplerEntry("euler", FLOW, _euler, "1st order", steps=50),
    SamplerEntry("dopri5", FLOW, _dopri5, "adaptive, from --atol and --rtol", steps=0, options=("atol", "rtol"),
                 no_caching="its error control needs fresh evaluations"),
    SamplerEntry("sde", FLOW, _sde, "Euler-Maruyama, noise by --sde-diffusion", steps=100,
                 options=("sde_diffusion",)),
)}
# Every sampler option, each recorded (None where it does not apply) by sampling.Sampler.settings.
OPTIONS = tuple(dict.fromkeys(name for entry in SAMPLERS.values() for name in entry.options))


def fitting(objective):
    """The samplers that fit `objective`, in table order."""
    return [name for name, entry in SAMPLERS.items() if objective in entry.objectives]


def either(names):
    """'a, b or c'."""
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]


def entry_for(name):
    if name not in SAMPLERS:
        raise ProcessError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def check_fits(name, objective):
    """One line when the sampler cannot sample a model trained with `objective`."""
    entry = entry_for(name)
    if objective in entry.objectives:
        return
    needs = either(entry.objectives)  # "eps or v", "flow"
    raise ProcessError(f"--sampler {name} needs {'an' if needs[0] in 'aeiou' else 'a'} {needs} checkpoint; this "
                       f"one was trained with {objective}: use {either(fitting(objective))}")


def resolve(name, steps, objective, default):
    """(sampler, steps) with None resolved: the script's `default` (name, steps) where that sampler
    fits the objective, else the objective's first sampler; a sampler named without steps runs its
    own default count (the table's `steps`)."""
    scripts_own = name is None and objective in entry_for(default[0]).objectives  # the script's default pair
    if name is None:
        name = default[0] if scripts_own else fitting(objective)[0]
    entry = entry_for(name)
    check_fits(name, objective)
    if entry.steps == 0:
        if steps is not None:
            fixed = next(n for n in fitting(objective) if SAMPLERS[n].steps != 0)
            raise ProcessError(f"--num-sampling-steps {steps} does not apply to {name}, which picks its own steps "
                               f"({entry.help}); drop it, or use --sampler {fixed} for a fixed count")
        return name, 0
    if steps is None:
        steps = default[1] if scripts_own or entry.steps is None else entry.steps
    if steps < 1:
        raise ProcessError(f"--num-sampling-steps must be at least 1, got {steps}")
    return name, steps


def process_for(name, steps, diffusion_args):
    """The process sampler `name` runs on with `steps` steps (one line when they do not fit)."""
    try:
        return SAMPLERS[name].process(diffusion_args, steps)
    except ProcessError:
        raise
    except ValueError as e:
        raise ProcessError(f"--num-sampling-steps {steps} does not work with --sampler {name}: {e}") from None
