"""What sample.py and sample_ddp.py share: the command-line flags for the model and sampler,
building the DiT from --model/--ckpt (or a train.py checkpoint's stored args) and loading its
weights, the three samplers with classifier-free guidance, and decoding latents to images.

For use from Python (e.g. a quality check):

    images = sampling.generate_from_checkpoint("last.pt", labels, cfg_scale=4.0,
                                               sampler="dpm-solver", num_sampling_steps=25)

or step by step:

    model, cfg = sampling.load_model(args, device)        # args: the flags below
    sampler = sampling.make_sampler("dpm-solver", 25)
    noise = torch.randn(len(labels), cfg.in_channels, cfg.latent_size, cfg.latent_size)
    latents = sampling.generate(model, sampler, labels, 4.0, noise)
    images = cli.to_uint8(sampling.load_decoder(cfg, device)(latents))   # N x H x W x C uint8
"""
import argparse
import dataclasses
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

import cli
import vae as vae_lib
from diffusion import create_diffusion
from diffusion.dpm_solver import dpm_solver_sample_loop
from download import RELEASED_MODELS, load_checkpoint
from models import DiT_models, create_model, load_weights

SAMPLERS = ("ddpm", "ddim", "dpm-solver")
VAE_CHOICES = ("ema", "mse", "none")


def add_model_args(parser, cfg_scale, num_sampling_steps=250):
    """The flags sample.py and sample_ddp.py share. Model settings default to None: they come
    from a train.py checkpoint's stored args, else from the original's defaults."""
    parser.add_argument("--model", default=None, help="DiT config, e.g. DiT-XL/2 (default: the checkpoint's, "
                                                      "else DiT-XL/2)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's, else 256")
    parser.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's, else 1000")
    parser.add_argument("--vae", choices=VAE_CHOICES, default=None,
                        help="Stable Diffusion VAE decoder, or none for pixel-space models "
                             "(default: the checkpoint's, else ema)")
    parser.add_argument("--vae-path", default=None, help="a local diffusers AutoencoderKL folder (overrides --vae)")
    parser.add_argument("--ckpt", default=None,
                        help="a train.py checkpoint (its EMA weights) or a state_dict; default: the released "
                             "DiT-XL/2 weights for --image-size (downloaded once)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                        help="ddpm: ancestral, as the original; ddim: deterministic DDIM; "
                             "dpm-solver: DPM-Solver++(2M), ~25 steps suffice")
    parser.add_argument("--num-sampling-steps", type=int, default=num_sampling_steps)
    parser.add_argument("--cfg-scale", type=float, default=cfg_scale, help="classifier-free guidance; 1 = off")
    parser.add_argument("--cfg-all-channels", action="store_true",
                        help="guide all noise channels (the original guides the first three only)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")


@dataclasses.dataclass
class ModelSettings:
    model: str
    image_size: int
    num_classes: int
    vae: str  # ema, mse or none
    vae_path: str
    in_channels: int
    latent_size: int
    ckpt: str


def load_model(args, device):
    """(model in eval mode on device, ModelSettings): the DiT for args.model / image_size /
    num_classes, filled in from the checkpoint's stored args where not given, with its weights."""
    if args.model is not None and args.model not in DiT_models:
        raise cli.UserError(f"unknown model {args.model!r}; choose one of: {', '.join(DiT_models)}")
    if args.ckpt is None:
        model_name, image_size = args.model or "DiT-XL/2", args.image_size or 256
        num_classes = args.num_classes or 1000
        ckpt = f"DiT-XL-2-{image_size}x{image_size}.pt"
        if model_name != "DiT-XL/2" or ckpt not in RELEASED_MODELS or num_classes != 1000:
            raise cli.UserError(f"released weights exist only for DiT-XL/2 at --image-size 256 or 512 with "
                                f"1000 classes (asked: {model_name} at {image_size}, {num_classes} classes); "
                                f"pass --ckpt PATH for other models")
        if args.vae == "none":
            raise cli.UserError("the released DiT-XL/2 weights are latent-space models; use --vae ema or mse")
    else:
        ckpt = args.ckpt
    state_dict, stored = load_checkpoint(ckpt)

    model_name = args.model or stored.get("model") or "DiT-XL/2"
    image_size = args.image_size or stored.get("image_size") or 256
    num_classes = args.num_classes or stored.get("num_classes") or 1000
    vae = args.vae or stored.get("vae") or "ema"
    # A checkpoint trained through a local VAE folder decodes with it too, unless told otherwise.
    vae_path = args.vae_path or (stored.get("vae_path") if args.vae is None else None)
    if vae == "none" and args.vae_path:
        raise cli.UserError("--vae-path was given with --vae none; drop one of them")
    if vae == "none":
        in_channels, latent_size = int(stored.get("in_channels") or 3), image_size
    else:
        if image_size % vae_lib.DOWNSAMPLE:
            raise cli.UserError(f"--image-size {image_size} must be a multiple of {vae_lib.DOWNSAMPLE} "
                                f"for a latent-space model")
        in_channels, latent_size = 4, image_size // vae_lib.DOWNSAMPLE
    if num_classes < 1:
        raise cli.UserError(f"--num-classes must be positive, got {num_classes}")

    # Built with the original's call, so its random initialisation draws the same numbers.
    kwargs = dict(input_size=latent_size, num_classes=num_classes)
    if vae == "none":
        kwargs["in_channels"] = in_channels
    model = create_model(model_name, **kwargs).to(device)
    load_weights(model, state_dict, f"checkpoint {ckpt}")
    settings = ModelSettings(model_name, image_size, num_classes, vae, vae_path, in_channels, latent_size, ckpt)
    return model.eval(), settings


def load_decoder(settings, device, chunk_size=8):
    """latents -> images in [-1, 1]: the VAE decoder, or the identity for pixel-space models."""
    if settings.vae == "none":
        return lambda latents: latents.float()
    vae = vae_lib.load_vae(settings.vae, settings.vae_path, device)
    return lambda latents: vae_lib.decode(vae, latents, chunk_size)


@dataclasses.dataclass
class Sampler:
    name: str  # one of SAMPLERS
    steps: int
    diffusion: object  # the respaced process (the full 1000-step one for the solver)


def make_sampler(name, steps):
    """ddpm: str(steps) respacing; ddim: ddim{steps}; dpm-solver: its own grid over 1000 steps."""
    if name not in SAMPLERS:
        raise cli.UserError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise cli.UserError(f"--num-sampling-steps must be at least 1, got {steps}")
    respacing = {"ddpm": str(steps), "ddim": f"ddim{steps}", "dpm-solver": ""}[name]
    try:
        diffusion = create_diffusion(respacing)
    except ValueError as e:
        raise cli.UserError(f"--num-sampling-steps {steps} does not work with --sampler {name}: {e}") from None
    if name == "dpm-solver" and steps > diffusion.num_timesteps:
        raise cli.UserError(f"--num-sampling-steps {steps} exceeds the {diffusion.num_timesteps} steps of the "
                            f"process; use at most {diffusion.num_timesteps} (25 is typical)")
    return Sampler(name, steps, diffusion)


def check_cfg_scale(cfg_scale):
    if cfg_scale < 1:
        warnings.warn(f"--cfg-scale {cfg_scale} is below 1: guidance then pushes samples away from their class "
                      f"(1 = no guidance, the paper uses 1.5 for FID and 4 for visuals)", stacklevel=2)


def _guided(model, cfg_scale, guide_all_channels, precision, device):
    """The model function the samplers call, with guidance and autocast, returning float32."""
    def forward(x, t, y):
        with cli.autocast(precision, device):
            if cfg_scale == 1:
                return model(x, t, y).float()
            return model.forward_with_cfg(x, t, y, cfg_scale, guide_all_channels).float()
    return forward


@torch.no_grad()
def generate(model, sampler, labels, cfg_scale, noise, *, guide_all_channels=False, precision="fp32",
             step_noise=None, progress=False):
    """Latents (n, C, H, W) for `labels` starting from `noise` (n, C, H, W).

    With guidance the batch is doubled as in the original ([noise, noise], [labels, null]);
    cfg_scale == 1 runs the plain conditional model on n samples. The ddpm sampler draws its
    per-step noise from the global RNG, exactly as the original sample.py, unless `step_noise`
    is given: a function returning the next (n, C, H, W) noise (per-sample seeded streams)."""
    device = noise.device
    n = len(labels)
    y = torch.as_tensor(labels, device=device, dtype=torch.long)
    if noise.shape[0] != n:
        raise ValueError(f"{noise.shape[0]} noise tensors for {n} labels")
    z = noise
    if cfg_scale != 1:
        z = torch.cat([noise, noise], 0)
        y = torch.cat([y, torch.full_like(y, model.num_classes)], 0)
    forward = _guided(model, cfg_scale, guide_all_channels, precision, device)
    kwargs = dict(y=y)

    if sampler.name == "ddpm" and step_noise is None:
        out = sampler.diffusion.p_sample_loop(forward, z.shape, z, clip_denoised=False, model_kwargs=kwargs,
                                              progress=progress, device=device)
    elif sampler.name == "ddpm":
        out = _ddpm_seeded(sampler.diffusion, forward, z, kwargs, step_noise, n, progress)
    elif sampler.name == "ddim":
        out = sampler.diffusion.ddim_sample_loop(forward, z.shape, z, clip_denoised=False, model_kwargs=kwargs,
                                                 progress=progress, device=device, eta=0.0)
    else:
        out = dpm_solver_sample_loop(forward, z, sampler.diffusion.betas, sampler.steps, kwargs, progress)
    return out[:n]


def _ddpm_seeded(diffusion, forward, x, kwargs, step_noise, n, progress):
    """Ancestral sampling whose per-step noise comes from step_noise(), so each sample's result
    depends on its own seed only, not on which batch or process it ran in."""
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    for i in tqdm(steps, desc="sampling", leave=False) if progress else steps:
        t = torch.full((len(x),), i, device=x.device, dtype=torch.long)
        out = diffusion.p_mean_variance(forward, x, t, clip_denoised=False, model_kwargs=kwargs)
        if i == 0:  # no noise on the last step
            x = out["mean"]
            break
        noise = step_noise().to(x.device)
        noise = noise.repeat(len(x) // n, 1, 1, 1)  # the guided half follows the conditional one
        x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise
    return x


def generate_from_checkpoint(ckpt, labels, cfg_scale=4.0, sampler="dpm-solver", num_sampling_steps=25, seed=0,
                             batch_size=256, device="cpu", guide_all_channels=False, precision="fp32",
                             vae=None, vae_path=None, progress=False):
    """N x H x W x C uint8 images for `labels` from a checkpoint (model settings from its stored args).

    Sample i draws its noise from a generator seeded with (seed, i), as sample_ddp.py does, so
    the images depend on the seed and the labels only (up to rounding for another batch size)."""
    device = torch.device(device)
    args = argparse.Namespace(model=None, image_size=None, num_classes=None, vae=vae, vae_path=vae_path, ckpt=ckpt)
    model, settings = load_model(args, device)
    labels = cli.parse_class_labels(" ".join(str(int(y)) for y in labels), settings.num_classes)
    chosen = make_sampler(sampler, num_sampling_steps)
    decode = load_decoder(settings, device)
    shape = (settings.in_channels, settings.latent_size, settings.latent_size)
    out = []
    starts = range(0, len(labels), batch_size)
    for start in tqdm(starts, desc="batches", leave=False) if progress else starts:
        generators = seeded_generators(seed, range(start, min(start + batch_size, len(labels))))
        noise = draw(generators, shape).to(device)
        latents = generate(model, chosen, labels[start:start + batch_size], cfg_scale, noise,
                           guide_all_channels=guide_all_channels, precision=precision,
                           step_noise=lambda: draw(generators, shape))
        out.append(cli.to_uint8(decode(latents)))
    return np.concatenate(out)


def seeded_generators(global_seed, indices):
    """One CPU generator per sample index, seeded from (global_seed, index) alone."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([global_seed, int(i)])
                                              .generate_state(1, np.uint64)[0]))
            for i in indices]


def draw(generators, shape):
    """One draw of `shape` from each generator, stacked: (len(generators), *shape)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])
