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

import checkpoint
import cli
import vae as vae_lib
from diffusion import create_diffusion
from diffusion.dpm_solver import dpm_solver_sample_loop
from download import RELEASED_MODELS
from models import MODEL_SIZES, model_args_for

SAMPLERS = cli.SAMPLERS


def add_model_args(parser, cfg_scale, num_sampling_steps=250):
    """The flags sample.py and sample_ddp.py share: the model (default: what the checkpoint
    records), --ckpt, and the sampler."""
    cli.add_model_flags(parser, training=False)
    parser.add_argument("--ckpt", default=None,
                        help="a train.py checkpoint (its EMA weights), a state_dict, a .safetensors file, or a "
                             "diffusers DiT folder or hub id; default: the released DiT-XL/2 weights for "
                             "--image-size (downloaded once)")
    cli.add_sampler_flags(parser, cfg_scale, num_sampling_steps)


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
    model_args: dict = None
    diffusion_args: dict = None


def released_weights(args):
    """The released checkpoint's name for the flags, when no --ckpt is given."""
    model_name, image_size = args.model or "DiT-XL/2", args.image_size or 256
    name = f"DiT-XL-2-{image_size}x{image_size}.pt"
    if model_name != "DiT-XL/2" or name not in RELEASED_MODELS or (args.num_classes or 1000) != 1000:
        raise cli.UserError(f"released weights exist only for DiT-XL/2 at --image-size 256 or 512 with "
                            f"1000 classes (asked: {model_name} at {image_size}, {args.num_classes or 1000} "
                            f"classes); pass --ckpt PATH for other models")
    if args.vae == "none":
        raise cli.UserError("the released DiT-XL/2 weights are latent-space models; use --vae ema or mse")
    return name


def load_model(args, device):
    """(model in eval mode on device, ModelSettings) for --ckpt (any format checkpoint.load reads)
    or the released weights. Flags that are given override what the checkpoint records."""
    ckpt = args.ckpt or released_weights(args)
    loaded = checkpoint.load(ckpt)
    vae = args.vae or loaded.settings.get("vae")
    model_args = dict(loaded.model_args or _model_args_from_flags(args, loaded, vae))
    if args.model is not None:
        model_args.update(model_args_for(args.model))
    model_args.update(cli.model_variant_args(args))
    if vae is None:  # a bare state_dict: 4 channels are SD-VAE latents
        vae = "ema" if model_args["in_channels"] == 4 else "none"
    if vae == "none" and args.vae_path:
        raise cli.UserError("--vae-path was given with --vae none; drop one of them")
    downsample = 1 if vae == "none" else vae_lib.DOWNSAMPLE
    image_size = args.image_size or loaded.settings.get("image_size") or model_args["input_size"] * downsample
    if image_size % downsample:
        raise cli.UserError(f"--image-size {image_size} must be a multiple of {downsample} for a latent-space model")
    model_args["input_size"] = image_size // downsample
    model_args["num_classes"] = args.num_classes or model_args["num_classes"]
    # A checkpoint trained through a local VAE folder decodes with it too, unless told otherwise.
    vae_path = args.vae_path or (loaded.settings.get("vae_path") if args.vae is None else None)

    model = checkpoint.build_model(model_args, loaded.state_dict, f"checkpoint {loaded.source}").to(device)
    name = args.model or loaded.settings.get("model") or config_name(model_args)
    settings = ModelSettings(name, image_size, model_args["num_classes"], vae, vae_path, model_args["in_channels"],
                             model_args["input_size"], ckpt, model_args, loaded.diffusion_args)
    return model.eval(), settings


def _model_args_from_flags(args, loaded, vae):
    """For a bare state_dict: the named --model, else the config its shapes show."""
    if args.model is None:
        found = checkpoint.model_args_from_state_dict(loaded.state_dict)
        if found is None:
            raise cli.UserError(f"{loaded.source} is a state_dict of unknown configuration; pass --model, "
                                f"--image-size and --num-classes")
        return found
    pixel = vae == "none"
    in_channels = loaded.state_dict.get("x_embedder.proj.weight", torch.empty(0, 3)).shape[1] if pixel else 4
    return model_args_for(args.model, input_size=32, in_channels=in_channels, num_classes=1000)


def config_name(model_args):
    """'DiT-XL/2' for the arguments of a named config, else a description."""
    for size, (depth, hidden, heads) in MODEL_SIZES.items():
        if (depth, hidden, heads) == (model_args["depth"], model_args["hidden_size"], model_args["num_heads"]):
            return f"DiT-{size}/{model_args['patch_size']}"
    return f"DiT-depth{model_args['depth']}-hidden{model_args['hidden_size']}/{model_args['patch_size']}"


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


def make_sampler(name, steps, diffusion_args=None):
    """ddpm: str(steps) respacing; ddim: ddim{steps}; dpm-solver: its own grid over the training
    steps. diffusion_args: the process the model was trained with (a checkpoint records them)."""
    if name not in SAMPLERS:
        raise cli.UserError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise cli.UserError(f"--num-sampling-steps must be at least 1, got {steps}")
    respacing = {"ddpm": str(steps), "ddim": f"ddim{steps}", "dpm-solver": ""}[name]
    try:
        diffusion = create_diffusion(respacing, **(diffusion_args or {}))
    except ValueError as e:
        raise cli.UserError(f"--num-sampling-steps {steps} does not work with --sampler {name}: {e}") from None
    if name == "dpm-solver" and steps > diffusion.num_timesteps:
        raise cli.UserError(f"--num-sampling-steps {steps} exceeds the {diffusion.num_timesteps} steps of the "
                            f"process; use at most {diffusion.num_timesteps} (25 is typical)")
    return Sampler(name, steps, diffusion)


def check_cfg_scale(cfg_scale):
    """Refuse nan/inf (every image would come out blank); warn below 1."""
    if not np.isfinite(cfg_scale):
        raise cli.UserError(f"--cfg-scale must be a finite number, got {cfg_scale}; use 1 for no guidance, "
                            f"1.5 (the paper's FID setting) or 4 (its visuals)")
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
