"""What sample.py and sample_ddp.py share: the command-line flags for the model and sampler,
building the DiT from --model/--ckpt (or a train.py checkpoint's stored args) and loading its
weights, running a sampler with classifier-free guidance and block caching, and decoding latents
to images. The samplers themselves, and which fit the checkpoint's training objective (its
diffusion_args), are diffusion/samplers.py's; make_sampler refuses one that does not fit, in one
line.

For use from Python (e.g. a quality check):

    images = sampling.generate_from_checkpoint("last.pt", labels, cfg_scale=4.0,
                                               sampler="dpm-solver", num_sampling_steps=25)

or step by step:

    model, cfg = sampling.load_model(args, device)        # args: the flags below
    sampler = sampling.make_sampler("dpm-solver", 25, cfg.diffusion_args)   # None, None: the objective's default
    noise = torch.randn(len(labels), *cfg.latent_shape())
    latents, stats = sampling.generate(model, sampler, labels, 4.0, noise)   # stats.nfe: evaluations per sample
    images = cli.to_uint8(sampling.load_decoder(cfg, device)(latents))   # N x H x W x C uint8
"""
import argparse
import dataclasses
import sys
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

import checkpoint
import cli
import vae as vae_lib
from diffusion import ProcessError, guides_all_channels, objective_of, samplers
from download import RELEASED_MODELS
from fast import check_quantize, compile_model, quantize_model
from models import config_name, model_args_for
from precision import autocast


def add_model_args(parser, cfg_scale, num_sampling_steps=250):
    """The flags sample.py and sample_ddp.py share: the model (default: what the checkpoint
    records), --ckpt, and the sampler."""
    cli.add_model_flags(parser, training=False)
    parser.add_argument("--ckpt", default=None,
                        help="a train.py checkpoint (its EMA weights), a state_dict, a .safetensors file, or a "
                             "diffusers DiT folder or hub id; default: the released DiT-XL/2 weights for "
                             "--image-size (downloaded once)")
    parser.add_argument("--vae-tiling", action="store_true",
                        help="decode in overlapping tiles (diffusers' tiled VAE): fixed memory for 1024 px and "
                             "larger images, seams blended")
    cli.add_sampler_flags(parser, cfg_scale, num_sampling_steps)


@dataclasses.dataclass
class ModelSettings:
    model: str
    image_size: object  # pixels: an int (square) or [height, width], as cli.image_size gives
    num_classes: int
    vae: str  # ema, mse or none
    vae_path: str
    in_channels: int
    latent_size: object  # the model's input, int or [height, width] like image_size
    ckpt: str
    model_args: dict = None
    diffusion_args: dict = None

    def latent_shape(self):
        """(channels, height, width) of one sample's start noise."""
        return (self.in_channels, *cli.height_width(self.latent_size))


def released_weights(args):
    """The released checkpoint's name for the flags, when no --ckpt is given."""
    model_name, (height, width) = args.model or "DiT-XL/2", cli.height_width(args.image_size or 256)
    name = f"DiT-XL-2-{height}x{width}.pt"
    if model_name != "DiT-XL/2" or name not in RELEASED_MODELS or (args.num_classes or 1000) != 1000:
        raise cli.UserError(f"released weights exist only for DiT-XL/2 at --image-size 256 or 512 with "
                            f"1000 classes (asked: {model_name} at {cli.size_text(args.image_size or 256)}, "
                            f"{args.num_classes or 1000} classes); pass --ckpt PATH for other models")
    if args.vae == "none":
        raise cli.UserError("the released DiT-XL/2 weights are latent-space models; use --vae ema or mse")
    return name


def load_model(args, device):
    """(model in eval mode on device, ModelSettings) for --ckpt (any format checkpoint.load reads)
    or the released weights. Flags that are given override what the checkpoint records."""
    quantize = getattr(args, "quantize", "none")
    check_quantize(quantize, device, getattr(args, "precision", None))
    ckpt = args.ckpt or released_weights(args)
    loaded = checkpoint.load(ckpt)
    vae = args.vae or loaded.settings.get("vae")
    model_args = dict(loaded.model_args or _model_args_from_flags(args, loaded, vae))
    if loaded.model_args:
        given = {"model": args.model, "num_classes": args.num_classes, **cli.model_variant_args(args)}
        checkpoint.refuse_contradictions(loaded.model_args, {k: v for k, v in given.items() if v is not None},
                                         "sampling reads it from the checkpoint")
    if args.model is not None:
        model_args.update(model_args_for(args.model))
    model_args.update(cli.model_variant_args(args))
    if vae is None:  # a bare state_dict: 4 channels are SD-VAE latents
        vae = "ema" if model_args["in_channels"] == 4 else "none"
    check_vae_fits(args.vae, loaded, model_args)
    if vae == "none" and args.vae_path:
        raise cli.UserError("--vae-path was given with --vae none; drop one of them")
    downsample = 1 if vae == "none" else vae_lib.DOWNSAMPLE
    trained = model_args["input_size"]  # the input size the weights were trained at (None: unknown)
    image_size = args.image_size or loaded.settings.get("image_size") or scaled_size(trained or 32, downsample)
    height, width = cli.height_width(image_size)
    step = downsample * model_args["patch_size"]
    if height % step or width % step:
        raise cli.UserError(f"--image-size {cli.size_text(image_size)} must have sides that are multiples of {step} "
                            f"for this model (patch {model_args['patch_size']}"
                            + (")" if downsample == 1 else f", in latents {downsample} times smaller)"))
    image_size = cli.size_value(height, width)  # 256x256 is recorded as 256
    latent_size = cli.size_value(height // downsample, width // downsample)
    model_args["input_size"] = trained or latent_size  # DiT runs at any size; built at the trained one
    model_args["num_classes"] = args.num_classes or model_args["num_classes"]
    check_guidance(getattr(args, "cfg_scale", 1), model_args["num_classes"])
    # A checkpoint trained through a local VAE folder decodes with it too, unless told otherwise.
    vae_path = args.vae_path or (loaded.settings.get("vae_path") if args.vae is None else None)

    model = checkpoint.build_model(model_args, loaded.state_dict, f"checkpoint {loaded.source}").to(device)
    # the image sizes it trained at: its --aspect-buckets, else its one size
    trained_sizes = loaded.settings.get("aspect_buckets") or [scaled_size(model_args["input_size"], downsample)]
    warn_other_size(loaded.source, model_args, image_size, trained_sizes)
    name = args.model or loaded.settings.get("model") or config_name(model_args)
    # The labels it samples: an unconditional model (0 classes) takes one, 0, which is its null class.
    settings = ModelSettings(name, image_size, max(1, model_args["num_classes"]), vae, vae_path,
                             model_args["in_channels"], latent_size, ckpt, model_args, loaded.diffusion_args)
    if quantize == "int8":
        quantize_model(model)
    if getattr(args, "compile", False):  # the fast mode, --compile; caching needs the blocks compiled apart
        compile_model(model, inference=True, blocks_only=getattr(args, "cache_interval", 1) > 1)
    return model.eval(), settings


def check_vae_fits(vae_flag, loaded, model_args):
    """A --vae given against a checkpoint of the other space (pixels against SD-VAE latents, which
    have 4 channels), named as such rather than left to fail on the image size."""
    recorded = loaded.settings.get("vae")
    channels = model_args["in_channels"]
    if vae_flag not in (None, "none") and (recorded == "none" or channels != 4):
        raise cli.UserError(f"--vae {vae_flag} does not fit {loaded.source}: it is a pixel-space model ({channels} "
                            f"channel(s), trained with --vae none), not one of the VAE's 4-channel latents; drop "
                            f"--vae")
    if vae_flag == "none" and recorded not in (None, "none"):
        raise cli.UserError(f"--vae none does not fit {loaded.source}: it is a latent-space model (trained with "
                            f"--vae {recorded}), whose samples the VAE turns into images; drop --vae none")


def scaled_size(size, factor):
    """An input size (int or [height, width]) times `factor`, in the same form."""
    height, width = cli.height_width(size)
    return cli.size_value(height * factor, width * factor)


def warn_other_size(source, model_args, image_size, trained_sizes):
    """Sampling at a size other than the training sizes: models without a position table
    (--pos rope, none) take any grid as they are; DiT's fixed sine-cosine table is recomputed for
    the new grid (models.py), positions the model never trained on: one line says so."""
    shape = cli.height_width(image_size)
    if model_args.get("pos", "sincos") != "sincos" or shape in map(cli.height_width, trained_sizes):
        return
    trained = ", ".join(map(cli.size_text, trained_sizes))
    print(f"warning: {source} was trained at {trained} px with fixed sine-cosine positions; at "
          f"{cli.size_text(image_size)} px they are recomputed for the new grid, positions it never trained on "
          f"(expect weaker images; --pos rope models are made for this)", file=sys.stderr)


def _model_args_from_flags(args, loaded, vae):
    """For a bare state_dict: the named --model (at the size its position table shows), else the
    config its shapes show."""
    if args.model is None:
        found = checkpoint.model_args_from_state_dict(loaded.state_dict)
        if found is None:
            raise cli.UserError(f"{loaded.source} is a state_dict of unknown configuration; pass --model, "
                                f"--image-size and --num-classes")
        return found
    shown = checkpoint.config_of_state_dict(loaded.state_dict) or {}
    in_channels = shown.get("in_channels", 3) if vae == "none" else 4
    return model_args_for(args.model, input_size=shown.get("input_size"), in_channels=in_channels, num_classes=1000)


def load_decoder(settings, device, chunk_size=8, tiling=False):
    """latents -> images in [-1, 1]: the VAE decoder (tiled: in overlapping tiles, for large
    images), or the identity for pixel-space models."""
    if settings.vae == "none":
        if tiling:
            raise cli.UserError("--vae-tiling applies to the VAE, but this is a pixel-space model (--vae none); "
                                "drop --vae-tiling")
        return lambda latents: latents.float()
    vae = vae_lib.load_vae(settings.vae, settings.vae_path, device, tiling=tiling)
    return lambda latents: vae_lib.decode(vae, latents, chunk_size)


@dataclasses.dataclass
class Sampler:
    name: str  # an entry of diffusion.samplers.SAMPLERS
    steps: int  # 0: adaptive (dopri5)
    diffusion: object  # the process it runs on: respaced (ddpm, ddim), the full one (the solver), a LinearFlow
    objective: str = "eps"  # what the model was trained with: eps, v or flow
    guide_all_channels: bool = False  # the objective guides every channel (the release's eps: the first three)
    cfg_interval: tuple = None  # (low, high): guidance only at noise levels inside it; None: everywhere
    options: dict = dataclasses.field(default_factory=dict)  # its own settings: atol, rtol (dopri5), sde_diffusion
    cache_interval: int = 1  # BlockCache: every N-th model call runs all blocks; 1 = no caching
    cache_start: int = 0  # BlockCache: the blocks before this one run at every call
    cache_above: float = 0.0  # BlockCache: reuse only at noise levels of this one and above

    def settings(self):
        """What changes the images, for sample_ddp.py's record (None where it does not apply)."""
        cached = self.cache_interval > 1
        return {"sampler": self.name, "num_sampling_steps": self.steps,
                **{name: self.options.get(name) for name in samplers.OPTIONS},
                "cfg_interval": list(self.cfg_interval) if self.cfg_interval else None,
                "cache_interval": self.cache_interval, "cache_start": self.cache_start if cached else None,
                "cache_above": self.cache_above if cached else None}


@dataclasses.dataclass
class Stats:
    """What one generate() call spent, per sample."""
    nfe: int  # model evaluations (a guided pair counts once)
    block_evals: int = 0  # DiT blocks run (0: not counted, no caching)


class BlockCache:
    """Training-free faster sampling by reusing deep-block outputs between adjacent model calls
    (the idea of FORA, Selvaraju et al. 2024, and Delta-DiT, Chen et al. 2024): the model's
    features change little from one sampling step to the next, the deep blocks' the least.

    `cache(model, x, t, y)` computes model(x, t, y) through the model's public steps (embed,
    run_blocks, head). Every `interval`-th call of a generate() run (the first included) runs all
    blocks and keeps, per sample, the residual the blocks from `start` on added to the tokens
    (their output minus their input). The calls in between run the embeddings, blocks 0 .. start - 1
    and the output layer (with this step's timestep modulation) and add the kept residual in place of
    the rest. Calls at noise levels below `above` (t for flow, timestep / 1000 for eps and v) run all
    blocks: the last, least noisy steps, where fine detail forms, as Dynamic DiT spends its full depth
    there too. A call whose batch differs from the kept one (--cfg-interval switching between the
    guided and the conditional batch) runs all blocks. The state lives in one generate() run only, and
    each sample's residual is its own row, so samples stay independent of their batch."""

    def __init__(self, interval, start, above=0.0):
        self.interval, self.start, self.above = interval, start, above
        self.calls = self.block_evals = 0
        self.residual = None
        self.level = 1.0

    def next_call(self, level=1.0):
        """A new model call, at noise level `level`."""
        self.calls += 1
        self.level = level

    def __call__(self, model, x, t, y, context=None):
        embedded = model.embed(x, t, y, context=context)
        tokens, cond = model.run_blocks(embedded.tokens, embedded.cond, embedded.rope, stop=self.start)
        self.block_evals += min(self.start, len(model.blocks))
        reuse = (self.calls - 1) % self.interval != 0 and self.level >= self.above
        if reuse and self.residual is not None and self.residual.shape == tokens.shape:
            tokens = tokens + self.residual
        else:
            entry = tokens
            tokens, _ = model.run_blocks(tokens, cond, embedded.rope, start=self.start)
            self.residual = tokens - entry
            self.block_evals += len(model.blocks) - self.start
        return model.head(tokens, embedded)


def sampler_options(args):
    """make_sampler's options from the flags of cli.add_sampler_flags (the script's defaults included)."""
    return dict(default=(getattr(args, "default_sampler", "ddpm"), getattr(args, "default_sampling_steps", 250)),
                cfg_interval=getattr(args, "cfg_interval", None), atol=getattr(args, "atol", 1e-6),
                rtol=getattr(args, "rtol", 1e-3), sde_diffusion=getattr(args, "sde_diffusion", 1.0),
                cache_interval=getattr(args, "cache_interval", 1), cache_start=getattr(args, "cache_start", 0),
                cache_above=getattr(args, "cache_above", 0.0))


def make_sampler(name, steps, diffusion_args=None, *, default=("ddpm", 250), cfg_interval=None, atol=1e-6,
                 rtol=1e-3, sde_diffusion=1.0, cache_interval=1, cache_start=0, cache_above=0.0):
    """The sampler `name` with `steps` steps for a model trained with diffusion_args (the process a
    checkpoint records; None: the release's). name / steps None: the objective's default, the
    script's `default` (name, steps) where it fits (diffusion.samplers.resolve). Each sampler's
    process and steps: diffusion/samplers.py. cache_interval > 1: reuse the blocks from
    cache_start on between model calls at noise levels from cache_above up (BlockCache)."""
    _check_options(cfg_interval, atol, rtol, sde_diffusion)
    try:
        objective = objective_of(diffusion_args)
        name, steps = samplers.resolve(name, steps, objective, default)
        _check_cache(name, objective, cache_interval, cache_start, cache_above)
        diffusion = samplers.process_for(name, steps, diffusion_args)
    except ProcessError as e:
        raise cli.UserError(str(e)) from None
    given = {"atol": atol, "rtol": rtol, "sde_diffusion": sde_diffusion}
    return Sampler(name, steps, diffusion, objective, guides_all_channels(diffusion_args),
                   tuple(cfg_interval) if cfg_interval else None,
                   {option: given[option] for option in samplers.SAMPLERS[name].options},
                   int(cache_interval), int(cache_start), float(cache_above))


def _check_cache(name, objective, cache_interval, cache_start, cache_above):
    if not (isinstance(cache_interval, int) and cache_interval >= 1):
        raise cli.UserError(f"--cache-interval {cache_interval} must be a whole number of at least 1 "
                            f"(1 = no caching; 2 or 3 reuse the deep blocks every other or two in three calls)")
    if not (isinstance(cache_start, int) and cache_start >= 0):
        raise cli.UserError(f"--cache-start {cache_start} must be a block index, 0 or more (0: reuse all blocks)")
    if not 0 <= cache_above < 1:
        raise cli.UserError(f"--cache-above {cache_above} must be a noise level in [0, 1) (t for flow, "
                            f"timestep/1000 for eps and v), e.g. 0.2; 0 reuses at every level")
    refused = samplers.SAMPLERS[name].no_caching
    if cache_interval > 1 and refused:
        others = [n for n in samplers.fitting(objective) if not samplers.SAMPLERS[n].no_caching]
        raise cli.UserError(f"--cache-interval does not work with {name}: {refused}; use --sampler "
                            f"{samplers.either(others)} with a fixed --num-sampling-steps")


def check_cache_fits(model, sampler):
    """One line when --cache-start leaves no block to reuse in this model."""
    depth = len(model.blocks)
    if sampler.cache_interval > 1 and sampler.cache_start >= depth:
        raise cli.UserError(f"--cache-start {sampler.cache_start} leaves nothing to reuse: this model has {depth} "
                            f"blocks; use 0 to {depth - 1}")


def _check_options(cfg_interval, atol, rtol, sde_diffusion):
    if cfg_interval is not None:
        low, high = cfg_interval
        if not 0 <= low <= high <= 1:
            raise cli.UserError(f"--cfg-interval {low} {high} must be two noise levels with 0 <= LOW <= HIGH <= 1 "
                                f"(t for flow, timestep/1000 for eps and v), e.g. 0.2 0.8")
    if not (atol > 0 and rtol > 0):
        raise cli.UserError(f"--atol {atol} and --rtol {rtol} must be positive, e.g. 1e-6 and 1e-3")
    if not sde_diffusion >= 0:
        raise cli.UserError(f"--sde-diffusion {sde_diffusion} must be 0 (no noise: euler) or more, e.g. 1.0")


def check_cfg_scale(cfg_scale):
    """Refuse nan/inf (every image would come out blank); warn below 1."""
    if not np.isfinite(cfg_scale):
        raise cli.UserError(f"--cfg-scale must be a finite number, got {cfg_scale}; use 1 for no guidance, "
                            f"1.5 (the paper's FID setting) or 4 (its visuals)")
    if cfg_scale < 1:
        warnings.warn(f"--cfg-scale {cfg_scale} is below 1: guidance then pushes samples away from their class "
                      f"(1 = no guidance, the paper uses 1.5 for FID and 4 for visuals)", stacklevel=2)


def check_finite_samples(latents, cfg_scale, precision=None):
    """Stop in one line when sampled latents hold NaN or inf (every image would come out blank):
    the checkpoint's weights were checked at load, so the guidance scale or the precision did it."""
    bad = (~torch.isfinite(latents)).flatten(1).any(1)
    if bad.any():
        cause = (f"--cfg-scale {cfg_scale:g} multiplies the difference of the model's two predictions by that much; "
                 f"use 1 to 10 (1.5 for FID, 4 for visuals)" if cfg_scale > 10 else
                 "try --precision fp32" if precision in ("fp16", "bf16") else "the model diverges on these inputs")
        raise cli.UserError(f"sampling gave NaN or infinite values in {int(bad.sum())} of {len(latents)} samples, "
                            f"which would be blank images; stopped before saving ({cause})")


def check_guidance(cfg_scale, num_classes):
    """An unconditional model (trained with --num-classes 0) has no class to guide towards."""
    if num_classes == 0 and cfg_scale != 1:
        raise cli.UserError(f"--cfg-scale {cfg_scale} asks for guidance, but this model is unconditional (trained "
                            f"with --num-classes 0): there is no class to guide towards; use --cfg-scale 1")


def _guided(model, cfg_scale, guide_all_channels, precision, device, noise_level, cfg_interval=None,
            block_cache=None):
    """The model function the samplers call, with guidance and autocast, returning float32.
    With cfg_interval, steps whose noise level (noise_level(t): the process's) is outside it run
    the conditional half alone (its prediction serves both halves of the doubled batch).
    block_cache: a BlockCache that runs the model (each call one step of it)."""
    def run(x, t, y):
        return model(x, t, y) if block_cache is None else block_cache(model, x, t, y)

    def forward(x, t, y):
        # One value read to the host, and only where a decision needs it.
        level = noise_level(t) if block_cache is not None or cfg_interval is not None else None
        if block_cache is not None:
            block_cache.next_call(level)
        with autocast(precision, device):
            if cfg_scale == 1:
                return run(x, t, y).float()
            if cfg_interval is not None and not cfg_interval[0] <= level <= cfg_interval[1]:
                half = len(x) // 2
                conditional = run(x[:half], t[:half], y[:half]).float()
                return torch.cat([conditional, conditional])
            # forward_with_cfg's steps, with run in place of its model call (the same ops without a cache)
            half = x[: len(x) // 2]
            return model.apply_guidance(run(torch.cat([half, half]), t, y), cfg_scale, guide_all_channels).float()
    return forward


class _Counted:
    """forward, counting the batch rows it evaluates: nfe(rows of a whole batch) is then the model
    evaluations per sample, also where a sampler calls the model on a part of the batch (dopri5)."""

    def __init__(self, forward):
        self.forward, self.rows = forward, 0

    def __call__(self, x, *args, **kwargs):
        self.rows += len(x)
        return self.forward(x, *args, **kwargs)

    def nfe(self, batch_rows):
        return round(self.rows / batch_rows)


@torch.no_grad()
def generate(model, sampler, labels, cfg_scale, noise, *, guide_all_channels=False, precision="fp32",
             step_noise=None, progress=False):
    """(latents (n, C, H, W) for `labels` starting from `noise` (n, C, H, W), Stats).

    With guidance the batch is doubled as in the original ([noise, noise], [labels, null]);
    cfg_scale == 1 runs the plain conditional model on n samples. The ddpm and sde samplers draw
    their per-step noise from the global RNG (ddpm exactly as the original sample.py) unless
    `step_noise` is given: a function returning the next (n, C, H, W) noise (per-sample seeded
    streams; dopri5 then also solves each sample on its own steps). Stats: the model evaluations
    per sample (nfe) and the DiT blocks run (block_evals, with caching)."""
    check_guidance(cfg_scale, model.num_classes)
    device = noise.device
    n = len(labels)
    y = torch.as_tensor(labels, device=device, dtype=torch.long)
    if noise.shape[0] != n:
        raise ValueError(f"{noise.shape[0]} noise tensors for {n} labels")
    z = noise
    if cfg_scale != 1:
        z = torch.cat([noise, noise], 0)
        y = torch.cat([y, torch.full_like(y, model.num_classes)], 0)
    block_cache = None
    if sampler.cache_interval > 1:
        check_cache_fits(model, sampler)
        block_cache = BlockCache(sampler.cache_interval, sampler.cache_start, sampler.cache_above)
    forward = _Counted(_guided(model, cfg_scale, guide_all_channels or sampler.guide_all_channels, precision, device,
                               sampler.diffusion.noise_level, sampler.cfg_interval, block_cache))
    job = samplers.Job(forward, z, dict(y=y), n, sampler.steps, sampler.options, step_noise, progress)
    out = samplers.SAMPLERS[sampler.name].run(sampler.diffusion, job)
    return out[:n], Stats(forward.nfe(len(z)), block_cache.block_evals if block_cache is not None else 0)


def generate_from_checkpoint(ckpt, labels, cfg_scale=4.0, sampler=None, num_sampling_steps=None, seed=0,
                             batch_size=256, device="cpu", guide_all_channels=False, precision="fp32",
                             vae=None, vae_path=None, vae_tiling=False, progress=False, return_sampler=False,
                             compile=False, quantize="none", **sampler_options):
    """N x H x W x C uint8 images for `labels` from a checkpoint (model settings from its stored args).

    sampler / num_sampling_steps None: the checkpoint objective's default (dpm-solver 25 for eps
    and v unless sampler_options' `default` says otherwise); sampler_options: make_sampler's.
    compile, quantize: sample.py's --compile and --quantize.
    With return_sampler, (images, the Sampler used (its name and steps), Stats averaged over the samples).

    Sample i draws its noise from a generator seeded with (seed, i), as sample_ddp.py does, so
    the images depend on the seed and the labels only (up to rounding for another batch size)."""
    device = torch.device(device)
    args = argparse.Namespace(model=None, image_size=None, num_classes=None, vae=vae, vae_path=vae_path, ckpt=ckpt,
                              precision=precision, compile=compile, quantize=quantize,
                              cache_interval=sampler_options.get("cache_interval", 1))
    model, settings = load_model(args, device)
    labels = cli.parse_class_labels(" ".join(str(int(y)) for y in labels), settings.num_classes)
    chosen = make_sampler(sampler, num_sampling_steps, settings.diffusion_args,
                          **{"default": ("dpm-solver", 25), **sampler_options})
    decode = load_decoder(settings, device, tiling=vae_tiling)
    shape = settings.latent_shape()
    out, stats = [], []
    starts = range(0, len(labels), batch_size)
    for start in tqdm(starts, desc="batches", leave=False) if progress else starts:
        generators = seeded_generators(seed, range(start, min(start + batch_size, len(labels))), device)
        noise = draw(generators, shape).to(device)
        latents, batch_stats = generate(model, chosen, labels[start:start + batch_size], cfg_scale, noise,
                                        guide_all_channels=guide_all_channels, precision=precision,
                                        step_noise=lambda: draw(generators, shape))
        out.append(cli.to_uint8(decode(latents)))
        stats.append((batch_stats, len(generators)))
    images = np.concatenate(out)
    return (images, chosen, _mean_stats(stats)) if return_sampler else images


def _mean_stats(weighted):
    """Stats averaged over (Stats, sample count) pairs."""
    total = sum(count for _, count in weighted)
    return Stats(*(round(sum(getattr(stats, field.name) * count for stats, count in weighted) / total)
                   for field in dataclasses.fields(Stats)))


def noise_device(device):
    """Where the noise for sampling on `device` is drawn: on a CUDA device there (no CPU draw and
    copy per step; other numbers than the CPU's, as the device's generator is another algorithm),
    on any other device on the CPU, whose draws are the release's. The one place this is decided:
    seeded_generators, sample_ddp.py's generators and its record's noise_device all follow it."""
    device = torch.device(device)
    return device if device.type == "cuda" else torch.device("cpu")


def seeded_generators(global_seed, indices, device="cpu"):
    """One generator per sample index, seeded from (global_seed, index) alone, on
    noise_device(device)."""
    where = noise_device(device)
    return [torch.Generator(device=where).manual_seed(int(np.random.SeedSequence([global_seed, int(i)])
                                                          .generate_state(1, np.uint64)[0]))
            for i in indices]


def draw(generators, shape):
    """One draw of `shape` from each generator, on its device, stacked: (len(generators), *shape)."""
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators])
