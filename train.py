"""Train a class-conditional DiT with PyTorch DDP (NCCL on GPUs, gloo on CPUs).

One machine, N GPUs (the original command):
    torchrun --nnodes=1 --nproc_per_node=N train.py --model DiT-XL/2 --data-path /path/to/imagenet/train
Several machines: run on each, pointing at one rendezvous host:
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=dit \\
        train.py --model DiT-XL/2 --data-path /path/to/imagenet/train
Pre-extracted latents (see extract_features.py; the VAE is then not loaded):
    torchrun --nnodes=1 --nproc_per_node=N train.py --model DiT-XL/2 --feature-path features/imagenet256
Pixel space (small data sets, CPUs), here greyscale 8x8 images on two CPU processes:
    torchrun --nproc_per_node=2 train.py --vae none --in-channels 1 --image-size 8 --model DiT-S/2 \\
        --data-path digits --global-batch-size 128 --max-steps 2000
A plain `python train.py ...` runs as one process (a GPU when there is one, else the CPU).

The paper's recipe: AdamW at a constant 1e-4 without weight decay, EMA of the weights (decay
0.9999, every step), label dropout 0.1 for guidance, a 1000-step linear schedule with learned
sigma. Each experiment folder gets log.txt, metrics.jsonl (loss averaged over all processes,
steps/s, images/s, peak memory; FID with --eval-every) and, with --sample-every, PNG grids of
EMA samples for fixed classes and noise.

Checkpoints (results/NNN-MODEL/checkpoints/STEP.pt, format in checkpoint.py) record the model's
constructor arguments, so `sample.py --ckpt STEP.pt` needs no other flag. `--resume auto`
continues the latest readable checkpoint of the latest experiment folder of this --model (a
fresh start if there is none), `--resume PATH` a given one; both continue with the same step
count, data order and random draws, so the weights match an uninterrupted run exactly, and with
the checkpoint's process (its --objective and t sampling: such flags may only repeat it). A
resume from a checkpoint that is not its folder's latest continues in a new experiment folder,
so the later checkpoints and logs of the first run are kept. The results folder must be
shared by all machines.

Reproducibility: all randomness of a step (flips, latent draws, timesteps, noise, label
dropout) is drawn for the whole global batch from a generator seeded by (--global-seed, step),
and each process takes its own samples' share. Resuming therefore needs no saved RNG state,
and a run on N processes matches a run on one process with the same --global-batch-size up to
float rounding (so may a run resumed on another number of processes). The initial weights
come from --global-seed alone; each process's global torch RNG is seeded with
global_seed * world_size + rank as in the original.

Unreadable image files are skipped with a warning naming them (see data.py). Training stops
with a message when the loss becomes NaN or infinite. Before a checkpoint is written, its
weights are checked (finite, and a finite loss on the last batch), so the checkpoint that
message names resumes cleanly.
"""
import argparse
import contextlib
import dataclasses
import logging
import math
import os
import resource
import sys
import time
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import checkpoint
import cli
import data
import distributed
import evaluate
import files
import finetune
import metrics
import runs
import sampling
import sharding
import vae as vae_lib
from checkpoint import load_weights
from diffusion import (ProcessError, add_process_flags, create_process, objective_of, process_model_args,
                       run_diffusion_args)
from diffusion.samplers import check_fits
from errors import first_line
from fast import compile_model
from models import DiTConfig, config_name, differences, model_args_for, variant_fields
from precision import autocast, set_tf32


# ------------------------------------------------------------------ flags
LR_SCHEDULES = ("constant", "cosine", "linear")  # --lr-schedule; lr_at computes them


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", type=str, default=None, help="image folder, one sub-folder per class")
    parser.add_argument("--feature-path", type=str, default=None, help="features from extract_features.py instead")
    parser.add_argument("--results-dir", type=str, default="results")
    cli.add_model_flags(parser, training=True)
    add_process_flags(parser)  # --objective, --t-sampling, ...: None when not given (a resume: the checkpoint's)
    parser.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True,
                        help="random horizontal flips (--no-hflip for data where a mirror image is another "
                             "thing, such as digits)")
    data.add_bucket_flag(parser)  # --aspect-buckets
    parser.add_argument("--epochs", type=cli.positive_int, default=1400)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total (1 or more)")
    parser.add_argument("--global-batch-size", type=cli.positive_int, default=256)
    parser.add_argument("--global-seed", type=int, default=0, help=f"0 to {MAX_SEED - 1}")
    add_optimizer_flags(parser)  # --lr and its schedule, accumulation, --init-from, --fsdp, ...
    parser.add_argument("--num-workers", type=cli.non_negative_int, default=None,
                        help="data-loading processes per rank (default 0 for data held in memory, else 4)")
    parser.add_argument("--log-every", type=cli.positive_int, default=100)
    parser.add_argument("--ckpt-every", type=cli.positive_int, default=50_000)
    parser.add_argument("--keep-last", type=int, default=0, help="keep only the last K checkpoints (0: all)")
    parser.add_argument("--resume", type=str, default=None, help="checkpoint path, or auto")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="let a resume continue on other data than the checkpoint was trained on (another "
                             "path, image count or class list; refused without this flag)")
    add_watch_flags(parser)  # sample grids and FID during training
    metrics.add_logger_flag(parser)
    cli.add_device_flags(parser, precision="tf32", compile=True)
    parser.add_argument("--cpu-threads", type=cli.non_negative_int, default=0,
                        help="CPU training: threads per process (default: the cores over the processes per machine)")
    vae_lib.add_encode_precision_flag(parser)  # --vae-precision, for --data-path (--feature-path: no encoding)
    parser.add_argument("--dist-timeout-min", type=cli.positive_int, default=30,
                        help="minutes a rank waits for the others (at a barrier while rank 0 writes a "
                             "checkpoint or computes FID) before the job fails")
    args = parser.parse_args(argv)
    if args.aspect_buckets and args.image_size is None and not args.feature_path:
        args.image_size = args.aspect_buckets[0]  # the model's recorded size: sample.py's default
    return args


def add_optimizer_flags(parser):
    """How the weights are optimised: AdamW and its LR schedule, accumulation, the starting weights,
    the EMA, clipping, and how the model is held (checkpointed activations, FSDP)."""
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, constant")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                        help="constant --lr (the paper's), or cosine / linear decay from --lr to --lr-min over the "
                             "run (--max-steps, else --epochs)")
    parser.add_argument("--lr-warmup-steps", type=cli.non_negative_int, default=0,
                        help="ramp the LR linearly from 0 over the first N optimizer steps (default 0: none)")
    parser.add_argument("--lr-min", type=float, default=None, help="cosine / linear: the final LR (default 0)")
    parser.add_argument("--grad-accum-steps", type=cli.positive_int, default=1,
                        help="sum the gradients of N micro-batches per optimizer step: the same training with "
                             "1/N of the activation memory (default 1)")
    parser.add_argument("--init-from", default=None, metavar="CKPT",
                        help="fine-tune: start a new run (step 0, fresh optimizer) from these weights (anything "
                             "sample.py --ckpt takes; its EMA where it has one); --num-classes and --image-size "
                             "may differ from its own")
    parser.add_argument("--class-map", default=None, metavar="FILE",
                        help="--init-from with another --num-classes: a JSON {new class: old class} of the class "
                             "embeddings to copy (default: the first classes keep theirs; the others start at "
                             "the mean of the old classes)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--ema-decay", type=float, default=0.9999, help="in [0, 1): the EMA's weight on its past")
    parser.add_argument("--max-grad-norm", type=float, default=None, help="clip gradients to this norm (off)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations: less memory")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard parameters, gradients, AdamW state and the EMA across the processes (PyTorch "
                             "FSDP2, per block) instead of DDP's full copy on each: models past one device's "
                             "memory; checkpoints are written whole, as without it")


def add_watch_flags(parser):
    """What the run shows of its EMA while it trains: sample grids and FID."""
    parser.add_argument("--sample-every", type=int, default=0,
                        help="save a grid of EMA samples (fixed classes and noise) every N steps (0: never)")
    cli.add_sampler_flags(parser, cfg_scale=4.0)  # for the sample grids and --eval-every
    parser.add_argument("--eval-every", type=int, default=0, help="log FID of EMA samples every N steps (0: never)")
    parser.add_argument("--eval-ref", type=str, default=None, help="reference batch .npz for --eval-every")
    parser.add_argument("--eval-num-samples", type=cli.positive_int, default=1000)
    parser.add_argument("--eval-cfg-scale", type=cli.finite_float, default=1.5)


def check_args(args):
    """The checks that need neither the data nor a checkpoint: one line each, before any work."""
    if bool(args.data_path) == bool(args.feature_path):
        raise cli.UserError("pass exactly one of --data-path (an image folder) or --feature-path (from "
                            "extract_features.py)")
    check_numbers(args)
    check_training_options(args)
    check_sharding(args)
    metrics.check_loggers(args.logger)
    return args


def check_training_options(args):
    """The LR schedule, gradient accumulation and --init-from flags: one line each, before any work."""
    if args.lr_min is not None and args.lr_schedule == "constant":
        raise cli.UserError("--lr-min is where a decaying --lr-schedule ends; add --lr-schedule cosine (or linear) "
                            "or drop --lr-min")
    if args.lr_min is not None and not 0 <= args.lr_min <= args.lr:
        raise cli.UserError(f"--lr-min {args.lr_min} is out of range: it must be in [0, --lr {args.lr}]")
    if args.global_batch_size % args.grad_accum_steps:
        raise cli.UserError(f"--global-batch-size {args.global_batch_size} does not split into --grad-accum-steps "
                            f"{args.grad_accum_steps} micro-batches; use a multiple of {args.grad_accum_steps}")
    if args.init_from and args.resume:
        raise cli.UserError("--init-from starts a new run from a checkpoint's weights, --resume continues one; "
                            "pass only one of them")
    if args.class_map and not args.init_from:
        raise cli.UserError("--class-map maps the classes of an --init-from checkpoint; add --init-from or drop it")


def check_sharding(args):
    """--fsdp: refused in one line with what it does not combine with, before any work."""
    # GradScaler finds inf/NaN in this rank's gradient shards alone: the ranks could skip different steps
    if args.fsdp and args.precision == "fp16":
        raise cli.UserError("--fsdp does not combine with --precision fp16: fp16's loss scaler is not shard-aware; "
                            "use --precision bf16")


def lr_at(args, step, horizon):
    """The LR of the update that takes the run from `step` to step + 1. A pure function of the step,
    so a resume continues the schedule exactly with no scheduler state saved. Warm-up: the k-th
    update (k <= --lr-warmup-steps N) uses k/N of --lr; then --lr constant, or a cosine or linear
    decay to --lr-min reached at `horizon` (--max-steps, else --epochs x steps per epoch)."""
    warmup = args.lr_warmup_steps
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if args.lr_schedule == "constant":
        return args.lr
    low = args.lr_min or 0.0
    progress = min(1.0, (step - warmup) / max(1, horizon - warmup))
    if args.lr_schedule == "cosine":
        return low + (args.lr - low) * 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr + (low - args.lr) * progress


def take_model_settings(args, ckpt, remedy="a resume continues the checkpoint's model"):
    """The model flags a run builds from: the given ones, else the checkpoint's when resuming (or
    fine-tuning: finetune.init_settings), else cli.model_flag_defaults(). A given flag that contradicts the
    checkpoint's model_args is refused in one line (another value would train its weights as another
    network)."""
    variants = [field.name for field in variant_fields()]
    if ckpt is None:
        for name, value in cli.model_flag_defaults().items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        return
    recorded, saved = ckpt["model_args"], ckpt.get("args") or {}
    given = {name: getattr(args, name) for name in ("model", "num_classes", *variants) if getattr(args, name) is not None}
    checkpoint.refuse_contradictions(recorded, given, remedy)
    args.model = args.model or saved.get("model") or config_name(recorded)
    for name in ("num_classes", *variants):
        if getattr(args, name) is None:
            setattr(args, name, recorded[name])
    # What makes the input (the model's input_size and in_channels): compared once built, in restore().
    for name in ("image_size", "vae", "vae_path"):
        if getattr(args, name) is None:
            setattr(args, name, saved.get(name))
    if args.in_channels is None:
        args.in_channels = recorded["in_channels"] if args.vae == "none" else 3


def take_bucket_settings(args, recorded):
    """A resume trains at the shapes its checkpoint did: --aspect-buckets defaults to the recorded ones
    (None: one --image-size) and may only repeat them (other buckets would change what the run learns
    from, as other data would)."""
    if args.aspect_buckets is None:
        args.aspect_buckets = recorded
    elif args.aspect_buckets != recorded:
        shown = ",".join(cli.size_text(size) for size in recorded) if recorded else "none (one --image-size)"
        raise cli.UserError(f"--aspect-buckets does not match the checkpoint, trained with --aspect-buckets {shown}; "
                            f"drop --aspect-buckets (a resume continues the checkpoint's shapes)")


def resolve_sizes(args):
    """--image-size, --vae and the model's input size, filled in from the features' metadata and the
    defaults, and checked against the VAE and the patch."""
    if args.feature_path:
        take_feature_settings(args)
    args.vae = args.vae or "ema"
    args.image_size = args.image_size or 256
    patch = model_args_for(args.model)["patch_size"]
    height, width = cli.height_width(args.image_size)
    if args.vae == "none":
        if args.vae_path:
            raise cli.UserError("--vae-path was given with --vae none (pixel space); drop one of them")
        args.input_size = args.image_size
    else:
        if height % vae_lib.DOWNSAMPLE or width % vae_lib.DOWNSAMPLE:
            raise cli.UserError(f"--image-size {cli.size_text(args.image_size)} is not divisible by "
                                f"{vae_lib.DOWNSAMPLE} (the VAE's downsampling factor); use 256 or 512, or "
                                f"multiples of 8 such as 256x384")
        args.input_size = cli.size_value(height // vae_lib.DOWNSAMPLE, width // vae_lib.DOWNSAMPLE)
        args.in_channels = 4
    if any(side % patch for side in cli.height_width(args.input_size)):
        step = patch * (1 if args.vae == "none" else vae_lib.DOWNSAMPLE)
        raise cli.UserError(f"--image-size {cli.size_text(args.image_size)} gives a {input_text(args)} input, "
                            f"not divisible by the patch size {patch} of {args.model}; use sides that are "
                            f"multiples of {step}")
    if args.eval_every:
        check_eval_ref(args)
    return args


def input_text(args):
    """The model input's height x width, as 32x32 or 32x48."""
    return "x".join(map(str, cli.height_width(args.input_size)))


def take_feature_settings(args):
    """--image-size, --vae and --vae-path come from the features' metadata (or must agree with it)."""
    meta = data.FeatureShards.read_meta(args.feature_path)
    if args.vae == "none":
        raise cli.UserError("--feature-path holds VAE latents; drop --vae none or train from --data-path")
    for flag in ("image_size", "vae", "vae_path"):
        given = getattr(args, flag)
        if given is not None and given != meta[flag]:
            raise cli.UserError(f"--{flag.replace('_', '-')} {given} differs from the {meta[flag]} the features in "
                                f"{args.feature_path} were extracted with; drop the flag or re-extract")
        setattr(args, flag, meta[flag])


# Seeds feed torch.manual_seed (at most 2**64 - 1) times the world size: kept well inside it.
MAX_SEED = 2**32


def check_numbers(args):
    """Values outside a flag's range would train nonsense or fail late: one line each, now."""
    rules = [("lr", args.lr > 0, "a positive number, e.g. 1e-4"),
             ("weight-decay", args.weight_decay >= 0, "0 or more"),
             ("ema-decay", 0 <= args.ema_decay < 1, "in [0, 1), e.g. 0.9999"),
             ("max-grad-norm", args.max_grad_norm is None or args.max_grad_norm > 0, "a positive number"),
             ("max-steps", args.max_steps is None or args.max_steps >= 1, "1 or more (0 would train nothing)"),
             ("global-seed", 0 <= args.global_seed < MAX_SEED, f"a whole number from 0 to {MAX_SEED - 1}"),
             ("keep-last", args.keep_last >= 0, "0 (keep all) or more"),
             ("sample-every", args.sample_every >= 0, "0 (never) or more"),
             ("eval-every", args.eval_every >= 0, "0 (never) or more")]
    for flag, ok, wanted in rules:
        value = getattr(args, flag.replace("-", "_"))
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            raise cli.UserError(f"--{flag} {value} is out of range: it must be {wanted}")
    if os.path.exists(args.results_dir) and not os.path.isdir(args.results_dir):
        raise cli.UserError(f"--results-dir {args.results_dir!r} is a file, not a folder; pass another path")


def check_eval_ref(args):
    """--eval-ref exists and, when it holds images, at the resolution this run samples."""
    if not args.eval_ref or not os.path.isfile(args.eval_ref):
        raise cli.UserError(f"--eval-every needs --eval-ref pointing at a reference .npz (got {args.eval_ref!r})")
    if "arr_0" in evaluate.npz_keys(args.eval_ref, "--eval-ref"):
        shape = evaluate.npz_image_shape(args.eval_ref, "--eval-ref")
        if tuple(shape[1:3]) != cli.height_width(args.image_size):
            height, width = cli.height_width(args.image_size)
            raise cli.UserError(f"--eval-ref {args.eval_ref} holds {shape[1]}x{shape[2]} images but this run samples "
                                f"{height}x{width}; use a reference batch at --image-size")


def local_batch_size(global_batch_size, world_size):
    if global_batch_size % world_size:
        raise cli.UserError(f"--global-batch-size {global_batch_size} does not divide over {world_size} "
                            f"processes; use a multiple of {world_size}")
    return global_batch_size // world_size


def step_seed(global_seed, step):
    """Distinct for every (seed, step) pair with step < 2**32."""
    return (global_seed % 2**31) * 2**32 + step


# ------------------------------------------------------------------ setting up
@dataclasses.dataclass
class Run:
    """Where this process stands: its place in the job, its folder and logs."""
    args: argparse.Namespace
    rank: int
    world_size: int
    device: torch.device
    local_batch: int
    experiment_dir: str = None
    logger: logging.Logger = None
    metrics_log: metrics.MetricsLog = None


@dataclasses.dataclass
class State:
    """What a checkpoint saves and training changes."""
    model: torch.nn.Module  # the bare model (the one trained is `trained`, maybe DDP- or compile-wrapped)
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    trained: torch.nn.Module = None
    train_steps: int = 0
    epoch: int = 0
    batches_done: int = 0  # in the current epoch
    last_ckpt: str = None


def build_data(run):
    """(dataset, sampler, loader, steps_per_epoch); images or pre-extracted features, in aspect-ratio
    buckets when --aspect-buckets is given or the features were extracted with it."""
    args = run.args
    if use_buckets(args):
        dataset, in_memory = bucketed_data(run)
        sampler = data.BucketSampler(dataset.bucket_of, args.global_batch_size, run.world_size, run.rank,
                                     seed=args.global_seed)
    else:
        dataset, in_memory = single_size_data(run)
        sampler = data.ResumableSampler(dataset, run.world_size, run.rank, seed=args.global_seed)
    steps_per_epoch = sampler.num_samples // run.local_batch
    if steps_per_epoch == 0:
        raise cli.UserError(f"the data set has {len(dataset)} images, fewer than one global batch of "
                            f"{args.global_batch_size}; lower --global-batch-size")
    num_workers = args.num_workers if args.num_workers is not None else (0 if in_memory else 4)
    loader = DataLoader(dataset, batch_size=run.local_batch, sampler=sampler, num_workers=num_workers,
                        pin_memory=run.device.type == "cuda", drop_last=True, collate_fn=data.batch_collate,
                        persistent_workers=num_workers > 0)
    return dataset, sampler, loader, steps_per_epoch


def single_size_data(run):
    """(dataset, held in memory): one --image-size."""
    args = run.args
    if args.feature_path:
        dataset = data.FeatureShards(args.feature_path, args.num_classes or None)  # 0 (unconditional): any
        return dataset, len(dataset.shards) == 1
    channels = args.in_channels if args.vae == "none" else 3
    dataset = data.ImageFolder(args.data_path, args.image_size, channels, args.num_classes or None,
                               quiet=run.rank != 0)
    return dataset, dataset.images is not None


def use_buckets(args):
    """Whether this run trains in aspect-ratio buckets: --aspect-buckets, or features extracted with it
    (whose buckets then become args.aspect_buckets, or must equal the given ones)."""
    if args.feature_path:
        recorded = data.FeatureShards.read_meta(args.feature_path).get("buckets")
        recorded = recorded and [bucket["image_size"] for bucket in recorded]
        if args.aspect_buckets and recorded != args.aspect_buckets:
            listed = ",".join(map(cli.size_text, recorded)) if recorded else "none"
            raise cli.UserError(f"--aspect-buckets differs from the buckets the features in {args.feature_path} "
                                f"were extracted with ({listed}); drop the flag or re-extract")
        args.aspect_buckets = recorded or None
    return bool(args.aspect_buckets)


def bucketed_data(run):
    """(dataset, held in memory) for --aspect-buckets; each bucket's size is checked first, as
    resolve_sizes checks --image-size."""
    args = run.args
    patch = model_args_for(args.model)["patch_size"]
    step = patch * (1 if args.vae == "none" else vae_lib.DOWNSAMPLE)
    for size in args.aspect_buckets:
        if any(side % step for side in cli.height_width(size)):
            raise cli.UserError(f"--aspect-buckets size {cli.size_text(size)} does not divide into {args.model}'s "
                                f"patches{'' if args.vae == 'none' else ' of VAE latents'}; use sides that are "
                                f"multiples of {step}")
    if args.feature_path:
        dataset = data.BucketedFeatures(args.feature_path, args.num_classes or None)
        warn_small_buckets(run, dataset)
        return dataset, all(part is None or len(part.shards) == 1 for part in dataset.parts)
    channels = args.in_channels if args.vae == "none" else 3
    dataset = data.BucketedImages(args.data_path, args.aspect_buckets, channels, args.num_classes or None,
                                  quiet=run.rank != 0)
    warn_small_buckets(run, dataset)
    return dataset, dataset.images is not None


def warn_small_buckets(run, dataset):
    """A bucket holding images but less than one global batch never trains: say which, once."""
    counts = torch.bincount(dataset.bucket_of, minlength=len(dataset.buckets)).tolist()
    small = [f"{cli.size_text(size)} ({n})" for size, n in zip(dataset.buckets, counts)
             if 0 < n < run.args.global_batch_size]
    if small and run.rank == 0:
        print(f"warning: bucket(s) {', '.join(small)} hold fewer images than one global batch of "
              f"{run.args.global_batch_size}, so their images are never trained on", file=sys.stderr)


def build_state(run, init=None):
    """Model, EMA, optimiser: identical initial weights on every rank, whatever the world size;
    fine-tuning: --init-from's weights (`init`) in both model and EMA."""
    args = run.args
    torch.manual_seed(args.global_seed)
    model_args = model_args_for(args.model, input_size=args.input_size, in_channels=args.in_channels,
                                num_classes=args.num_classes, **cli.model_variant_args(args),
                                **process_model_args(args.diffusion_args))
    model = checkpoint.build_model(model_args)
    if init is not None:
        finetune.start_from(model, init, args)
    model = model.to(run.device)
    torch.manual_seed(args.global_seed * run.world_size + run.rank)
    model.gradient_checkpointing = args.grad_checkpointing
    ema = deepcopy(model).requires_grad_(False).eval()
    if args.fsdp:  # before the optimiser, which must hold the sharded parameters
        model, ema = sharding.shard(model), sharding.shard(ema)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            **adamw_kernel(run.device, args.compile))
    scaler = torch.amp.GradScaler(run.device.type, enabled=args.precision == "fp16")
    return State(model, ema, opt, scaler)


def adamw_kernel(device, fast=False):
    """AdamW's implementation: fused (one pass over each tensor) on CUDA and in the fast mode
    (--compile) on CPU, too; otherwise multi-tensor (foreach) on CPU, where PyTorch's default is a
    loop over the tensors: foreach gives the loop's results bit for bit, fused within float32
    rounding, 3-5x faster on CPU (tests/test_speed.py). Both keys are set, so that a resumed
    optimiser switches cleanly."""
    fused = device.type == "cuda" or fast
    return {"fused": True, "foreach": None} if fused else {"foreach": True, "fused": None}


def restore(state, ckpt, path, args, steps_per_epoch):
    """Continue from a train.py checkpoint; this run's --lr and --weight-decay win over the saved ones."""
    if ckpt["model_args"] != state.model.model_args:
        theirs = DiTConfig(**ckpt["model_args"]).describe()
        differing = differences(ckpt["model_args"], state.model.model_args)
        raise cli.UserError(f"--resume {path} holds {theirs}, but this run builds {state.model.config.describe()} "
                            f"({differing}); drop --image-size / --vae / --in-channels (a resume takes the "
                            f"checkpoint's)")
    if sharding.is_sharded(state.model):  # --fsdp: the checkpoint is whole (any world size, --fsdp or not); keep
        # this rank's shard
        sharding.load_full_state_dicts(state.model, state.ema, state.opt, ckpt)
    else:
        load_weights(state.model, ckpt["model"], f"--resume {path}")
        load_weights(state.ema, ckpt["ema"], f"--resume {path} (ema)")
        state.opt.load_state_dict(ckpt["opt"])
    for group in state.opt.param_groups:
        group["lr"], group["weight_decay"] = args.lr, args.weight_decay
        group.update(adamw_kernel(next(state.model.parameters()).device, args.compile))  # not the saving run's
    place_optimizer_state(state.opt)
    if ckpt.get("scaler") and state.scaler.is_enabled():
        state.scaler.load_state_dict(ckpt["scaler"])
    state.train_steps, state.epoch = ckpt["train_steps"], ckpt.get("epoch", 0)
    state.batches_done = ckpt.get("batches_in_epoch", 0)
    if state.batches_done >= steps_per_epoch:
        state.epoch, state.batches_done = state.epoch + 1, 0
    state.last_ckpt = path


def place_optimizer_state(opt):
    """Put each optimiser state tensor where this run's kernel reads it. load_state_dict places
    `step` by the saving run's groups (torch.optim.Optimizer: on the parameter's device, float32,
    only where those were fused or capturable), and restore may switch the kernel (a CPU checkpoint
    resumed on CUDA becomes fused): fused and capturable kernels want `step` as float32 on the
    parameter's device, foreach and the loop on the CPU (torch/optim/adam.py). The moments go on
    the parameter's device in its dtype."""
    for group in opt.param_groups:
        step_on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            state = opt.state.get(param, {})
            for key, value in state.items():
                if not torch.is_tensor(value):
                    continue
                if key == "step":
                    where = dict(device=param.device, dtype=torch.float32) if step_on_device else dict(device="cpu")
                else:
                    where = dict(device=param.device, dtype=param.dtype if value.is_floating_point() else None)
                state[key] = value.to(**{k: v for k, v in where.items() if v is not None})


def open_experiment(run, resume, state):
    """Decide the experiment folder on rank 0 (created only now, so bad input leaves no empty
    folder behind), lock it against a second run, clear temp files a killed save left, open the
    logs. A resumed run that is already complete exits here (0), writing nothing."""
    args = run.args
    if resume.path and (state.epoch >= args.epochs or (args.max_steps is not None
                                                        and state.train_steps >= args.max_steps)):
        if run.rank == 0:
            limit = f"--max-steps {args.max_steps}" if args.max_steps is not None else f"--epochs {args.epochs}"
            print(f"{resume.path} is already complete at step {state.train_steps} ({limit}): nothing to train, "
                  f"nothing written; raise {limit.split()[0]} to train on", file=sys.stderr)
        raise SystemExit(0)  # on every rank alike: each restored the same checkpoint
    if run.rank == 0:
        folder = resume.experiment_dir or runs.new_experiment_dir(args)
        runs.lock_experiment(folder)
        os.makedirs(os.path.join(folder, "checkpoints"), exist_ok=True)
        # Where this run and the one it continues save: a kill during a save leaves a temp file there.
        resumed_from = os.path.dirname(os.path.abspath(resume.path)) if resume.path else None
        ours = {os.path.abspath(os.path.join(folder, "checkpoints")), resumed_from}
        for checkpoints in (d for d in ours if d and os.path.basename(d) == "checkpoints"):
            for path in files.remove_stale_temp_files(checkpoints):
                print(f"removed {path}, left by a checkpoint save that was cut off", file=sys.stderr)
    run.experiment_dir = distributed.broadcast(folder if run.rank == 0 else None)
    run.logger = runs.make_logger(run.experiment_dir, run.rank)
    if run.rank == 0:
        run.metrics_log = metrics.MetricsLog(run.experiment_dir, args.logger, run_name=os.path.basename(
            run.experiment_dir), config=vars(args), wandb_project=args.wandb_project)
        if resume.experiment_dir:  # the same run continues: drop what it logged past its checkpoint
            run.metrics_log.truncate_after(state.train_steps)


def log_start(run, state, dataset, steps_per_epoch, resume):
    args, logger = run.args, run.logger
    args.data_identity = runs.data_identity(args, dataset)  # saved with every checkpoint (rank 0 writes them)
    logger.info(f"Experiment directory: {run.experiment_dir}")
    logger.info(f"{args.model}: {sum(p.numel() for p in state.model.parameters()):,} parameters; input "
                f"{input_text(args)}x{args.in_channels}; "
                + (f"VAE {vae_lib.vae_source(args.vae, args.vae_path)}" if args.vae != "none" else "pixel space"))
    logger.info(f"Data: {len(dataset):,} images from {args.feature_path or args.data_path} "
                f"({'pre-extracted latents' if args.feature_path else 'images'}); {steps_per_epoch} steps per "
                f"epoch; global batch {args.global_batch_size} on {run.world_size} process(es) ({run.device.type})")
    if resume.path:
        where = "" if resume.experiment_dir else f", continuing in a new folder because {resume.note}"
        logger.info(f"Resumed from {resume.path} at step {state.train_steps} (epoch {state.epoch}, batch "
                    f"{state.batches_done}){where}")


# ------------------------------------------------------------------ one step
def step_randomness(run, step, dropout, x_shape, process):
    """Every random draw of a step, made for the whole global batch from the step's seed, then
    sliced to this process's share: see the docstring. The training times are the process's
    (timestep indices for eps and v, the release's draw; t in [0, 1] for flow)."""
    args, device = run.args, run.device
    B, mine = args.global_batch_size, slice(run.rank, None, run.world_size)
    gen = torch.Generator(device=device).manual_seed(step_seed(args.global_seed, step))
    flip = (torch.rand(B, generator=gen, device=device) < (0.5 if args.hflip else 0.0))[mine]
    drop = (torch.rand(B, generator=gen, device=device) < dropout)[mine].long()
    t = process.training_times(B, gen, device)[mine]
    if args.aspect_buckets:  # the noise takes the step's bucket's shape: drawn on by bucket_noise
        return flip, drop, t, None, gen
    latent_noise = torch.randn((B, 4, *cli.height_width(args.input_size)), generator=gen, device=device)[mine]
    noise = torch.randn((B, *x_shape), generator=gen, device=device)[mine]
    return flip, drop, t, latent_noise, noise


@torch.no_grad()
def model_input(run, batch, flip, latent_noise, vae):
    """(x, y): the batch as the model's input (latents or pixels in [-1, 1]) and its labels."""
    device = run.device
    if run.args.feature_path:
        mean, std, y = (v.to(device, non_blocking=True) for v in batch)
        pick = torch.arange(len(y), device=device), flip.long()
        return vae_lib.sample_latents(mean[pick].float(), std[pick].float(), noise=latent_noise), y
    images, y = (v.to(device, non_blocking=True) for v in batch)
    x = images.float() / 127.5 - 1
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if vae is not None:
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        mean, std = vae_lib.encode_distribution(vae, x, run.args.vae_precision)
        x = vae_lib.sample_latents(mean, std, noise=latent_noise)
    return x, y


def micro_batches(run, batch, randomness, dropout, vae):
    """The model inputs (x, t, kwargs, noise) of this rank's --grad-accum-steps micro-batches,
    made one at a time (the VAE encodes a micro-batch, not the whole batch, at once). Each takes
    consecutive samples of the rank's share and their slice of the step's random draws, so
    every sample keeps its draws whatever the split. An unconditional model (--num-classes 0)
    sees every label as its null class, 0."""
    flip, drop, t, latent_noise, noise = randomness
    if latent_noise is None:
        latent_noise, noise = bucket_noise(run, batch, noise)
    size = micro_batch_size(run)
    for start in range(0, run.local_batch, size):
        part = slice(start, start + size)
        x, y = model_input(run, tuple(v[part] for v in batch), flip[part], latent_noise[part], vae)
        if run.args.num_classes == 0:
            y = torch.zeros_like(y)
        yield x, t[part], dict(y=y, force_drop_ids=drop[part]) if dropout > 0 else dict(y=y), noise[part]


def bucket_noise(run, batch, gen):
    """--aspect-buckets: the step's latent draws and noise, at the shape of its bucket (the batch's),
    drawn for the whole global batch from the step's generator after step_randomness's draws (as
    the single-size run draws them) and sliced to this process's share."""
    args, device = run.args, run.device
    B, mine = args.global_batch_size, slice(run.rank, None, run.world_size)
    height, width = batch[0].shape[-2:]  # images (pixels) or features (latents)
    if args.vae != "none" and not args.feature_path:
        height, width = height // vae_lib.DOWNSAMPLE, width // vae_lib.DOWNSAMPLE
    latent_noise = torch.randn((B, 4, height, width), generator=gen, device=device)[mine]
    noise = torch.randn((B, args.in_channels, height, width), generator=gen, device=device)[mine]
    return latent_noise, noise


def micro_batch_size(run):
    """Images per micro-batch; refused in one line unless each rank's batch splits evenly."""
    if run.local_batch % run.args.grad_accum_steps:
        raise cli.UserError(f"--global-batch-size {run.args.global_batch_size} gives {run.local_batch} images per "
                            f"process, which do not split into --grad-accum-steps {run.args.grad_accum_steps} "
                            f"micro-batches; use a multiple of {run.world_size * run.args.grad_accum_steps}")
    return run.local_batch // run.args.grad_accum_steps


def train_step(run, state, diffusion, micro_inputs):
    """Forward and backward over the micro-batches (gradients summed; DDP all-reduces only after
    the last), then the optimiser and EMA update. Returns (the loss, mean over this rank's batch;
    1 where fp16's GradScaler skipped the update, else None; the last micro-batch's inputs), as
    tensors: no host sync."""
    args, n = run.args, run.args.grad_accum_steps
    total = None
    for i, inputs in enumerate(micro_inputs):
        x, t, kwargs, noise = inputs
        # DDP's no_sync: no all-reduce in the backward of the first n - 1 micro-batches
        skip_sync = i < n - 1 and hasattr(state.trained, "no_sync")
        with state.trained.no_sync() if skip_sync else contextlib.nullcontext():
            with autocast(args.precision, run.device):
                loss = diffusion.training_losses(state.trained, x, t, kwargs, noise=noise)["loss"].mean()
            state.scaler.scale(loss if n == 1 else loss / n).backward()
        total = loss.detach() if n == 1 else (loss.detach() / n if total is None else total + loss.detach() / n)
    if args.max_grad_norm:
        state.scaler.unscale_(state.opt)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), args.max_grad_norm)
    skipped = scaled_step(state.scaler, state.opt)
    # Under DDP the gradients are views of its buckets: zeroing keeps them (None would reallocate
    # them and copy them into the buckets at every step); one process frees them, as the release.
    state.opt.zero_grad(set_to_none=run.world_size == 1)
    with torch.no_grad():
        torch._foreach_lerp_(list(state.ema.parameters()), list(state.model.parameters()), 1 - args.ema_decay)
    return total, skipped, inputs


def scaled_step(scaler, opt):
    """scaler.step and update; returns a bool tensor on the device, True where GradScaler skipped the
    step (inf/NaN gradients: it then lowers its scale, the one thing that lowers it), None when the
    scaler is off (not fp16). Read at log time, not here: no host sync."""
    if not scaler.is_enabled():
        scaler.step(opt)
        scaler.update()
        return None
    before = scaler._scale.clone()  # GradScaler keeps its scale on the device; get_scale() would sync
    scaler.step(opt)
    scaler.update()
    return scaler._scale < before


# ------------------------------------------------------------------ logging and checkpoints
@dataclasses.dataclass
class Window:
    """The losses since the last log line, and the steps fp16's GradScaler skipped, kept on the device."""
    loss_sum: torch.Tensor
    bad_steps: torch.Tensor  # non-finite losses
    skipped_steps: torch.Tensor  # updates GradScaler skipped (inf/NaN gradients, whatever the loss)
    steps: int = 0
    start: float = dataclasses.field(default_factory=time.time)

    @classmethod
    def new(cls, device):
        return cls(torch.zeros((), device=device, dtype=torch.float64),
                   torch.zeros((), device=device, dtype=torch.long), torch.zeros((), device=device, dtype=torch.long))

    def add(self, loss, skipped=None):
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss.double(), 0.0)
        self.bad_steps += (~finite).long()
        if skipped is not None:
            self.skipped_steps += skipped.long()
        self.steps += 1


def check_window(run, state, window):
    """The window's loss averaged over ranks; stops on NaN/inf. fp16 skips steps with inf/NaN
    gradients and lowers its loss scale: it stops only when every step of the window had a
    non-finite loss, or was skipped with the scale already below 1 (then no scale is to blame)."""
    loss = distributed.mean_over_ranks(window.loss_sum.item() / max(1, window.steps - window.bad_steps.item()),
                                       run.device)
    bad = distributed.mean_over_ranks(window.bad_steps.item(), run.device)
    if (bad > 0 and run.args.precision != "fp16") or (window.steps and bad >= window.steps) or not math.isfinite(loss):
        raise_diverged(run, state)
    if window.steps and window.skipped_steps.item() >= window.steps and state.scaler.get_scale() < 1:
        raise_diverged(run, state)
    return loss


def raise_diverged(run, state):
    raise cli.UserError(f"the loss became NaN or infinite by step {state.train_steps}; stopping. The last good "
                        f"checkpoint is {state.last_ckpt or 'none (none was written yet)'}; resume from it with a "
                        f"lower --lr, --max-grad-norm 1.0, or --precision bf16 instead of fp16")


def log_window(run, state, window):
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    elapsed = time.time() - window.start
    record = {"step": state.train_steps, "epoch": state.epoch, "loss": check_window(run, state, window),
              "steps_per_sec": window.steps / elapsed, "images_per_sec": window.steps * run.args.global_batch_size
              / elapsed, "peak_mem_gib": peak_memory_gib(run.device), "lr": state.opt.param_groups[0]["lr"]}
    if run.args.precision == "fp16":
        record["skipped_steps"] = round(distributed.mean_over_ranks(window.skipped_steps.item(), run.device))
    if run.rank == 0:
        run.logger.info(f"(step={state.train_steps:07d}) Train Loss: {record['loss']:.4f}, Train Steps/Sec: "
                        f"{record['steps_per_sec']:.2f}, Images/Sec: {record['images_per_sec']:.1f}, "
                        f"Peak Mem: {record['peak_mem_gib']:.2f} GiB")
        run.metrics_log.log(record)


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@torch.no_grad()
def weights_usable(run, state, diffusion, inputs):
    """Whether the weights about to be saved are finite and give a finite loss on the last batch
    on every rank: the loss already checked was computed before the last update."""
    x, t, kwargs, noise = inputs
    ok = all(torch.isfinite(p).all() for p in (*state.model.parameters(), *state.ema.parameters()))
    if ok:
        with autocast(run.args.precision, run.device):
            loss = diffusion.training_losses(state.model, x, t, kwargs, noise=noise)["loss"].mean()
        ok = bool(torch.isfinite(loss))
    return distributed.mean_over_ranks(float(ok), run.device) == 1.0


def save_checkpoint(run, state, steps_per_epoch):
    path = os.path.join(run.experiment_dir, "checkpoints", f"{state.train_steps:07d}.pt")
    whole = None
    if sharding.is_sharded(state.model):  # --fsdp: every rank takes part in gathering the whole state dicts to rank 0
        whole = sharding.full_state_dicts(state.model, state.ema, state.opt)
    if run.rank == 0:
        progress = {"train_steps": state.train_steps, "epoch": state.epoch, "batches_in_epoch": state.batches_done,
                    "world_size": run.world_size}
        checkpoint.save(checkpoint.train_state(state.model, state.ema, state.opt, state.scaler, run.args,
                                               run.args.diffusion_args, progress, whole), path)
        run.logger.info(f"Saved checkpoint to {path}")
        if run.args.keep_last > 0:  # only this run's folder: a resume from an earlier step gets a new one
            for old in runs.checkpoints_in(run.experiment_dir)[:-run.args.keep_last]:
                os.remove(old)
    state.last_ckpt = path
    distributed.barrier()


# ------------------------------------------------------------------ watching samples
def generate(run, ema, sampler, noise, labels, cfg_scale, vae, seed):
    """uint8 (N, H, W, C) images from the EMA model (sampling.py's samplers), global RNG untouched."""
    with torch.random.fork_rng(devices=[noise.device] if noise.device.type == "cuda" else []):
        torch.manual_seed(seed)
        out, _ = sampling.generate(ema, sampler, labels, cfg_scale, noise, precision=run.args.precision,
                                   guide_all_channels=run.args.cfg_all_channels)
    return cli.to_uint8(vae_lib.decode(vae, out) if vae is not None else out)


def save_grid(images, path, image_size):
    """A PNG grid of uint8 (N, H, W, C) images, returned as an array; tiny images are enlarged."""
    import torchvision.utils
    from PIL import Image

    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    zoom = max(1, 64 // max(cli.height_width(image_size)))
    x = x.repeat_interleave(zoom, dim=2).repeat_interleave(zoom, dim=3)
    grid = torchvision.utils.make_grid(x, nrow=min(8, len(x)), padding=2, pad_value=255).permute(1, 2, 0).numpy()
    files.save_image(Image.fromarray(grid), path)
    return grid


def ema_to_sample(run, state, every_rank):
    """The EMA model that draws the samples: state.ema itself, or under --fsdp a whole copy of it
    gathered for them (on every rank, or on rank 0 only: the others get None; a collective). The
    copy holds the weights alone, a fraction of the sharded training state's memory, and lives
    only while the samples are drawn."""
    if not sharding.is_sharded(state.ema):
        return state.ema
    weights = sharding.whole_state_dict(state.ema, every_rank)
    if not weights:
        return None
    with torch.random.fork_rng(devices=[]):  # building draws initial weights; training's draws stay as they were
        copy = checkpoint.build_model(state.ema.model_args, weights, "the gathered EMA")
    return copy.to(run.device).eval().requires_grad_(False)


def sample_grid(run, state, sampler, vae):
    """Eight EMA samples of spread-out classes from fixed noise, as a PNG (rank 0; under --fsdp every
    rank takes part in gathering the EMA)."""
    ema = ema_to_sample(run, state, every_rank=False)
    if run.rank != 0:
        return
    args, n = run.args, 8
    labels = torch.tensor([i * args.num_classes // n for i in range(n)], device=run.device)
    x_shape = (args.in_channels, *cli.height_width(args.input_size))
    noise = torch.randn((n, *x_shape), generator=torch.Generator().manual_seed(args.global_seed)).to(run.device)
    images = generate(run, ema, sampler, noise, labels, args.cfg_scale, vae, seed=args.global_seed)
    path = os.path.join(run.experiment_dir, "samples", f"{state.train_steps:07d}.png")
    run.metrics_log.image(state.train_steps, "samples", save_grid(images, path, args.image_size))
    run.logger.info(f"Saved EMA samples to {path}")


def evaluate_fid(run, state, sampler, vae):
    """FID of --eval-num-samples EMA samples, split over the ranks, logged by rank 0."""
    args, ema = run.args, ema_to_sample(run, state, every_rank=True)
    per_rank = math.ceil(args.eval_num_samples / run.world_size)
    g = torch.Generator().manual_seed(step_seed(args.global_seed + 1, run.rank))
    chunks = []
    for start in range(0, per_rank, run.local_batch):
        n = min(run.local_batch, per_rank - start)
        noise = torch.randn((n, args.in_channels, *cli.height_width(args.input_size)), generator=g).to(run.device)
        labels = torch.randint(0, max(1, args.num_classes), (n,), generator=g).to(run.device)  # unconditional: 0
        chunks.append(generate(run, ema, sampler, noise, labels, args.eval_cfg_scale, vae,
                               seed=step_seed(args.global_seed + 2, run.rank * 100_003 + start)))
    gathered = [chunks]
    if run.world_size > 1:
        gathered = [None] * run.world_size
        dist.all_gather_object(gathered, chunks)
    if run.rank == 0:
        samples = np.concatenate([c for rank_chunks in gathered for c in rank_chunks])[: args.eval_num_samples]
        try:
            result = evaluate.compute_metrics(args.eval_ref, samples, device=run.device, batch_size=run.local_batch,
                                              metrics=("fid",))
        except (ValueError, RuntimeError, OSError) as e:  # a failed measurement must not end the training
            run.logger.info(f"(step={state.train_steps:07d}) FID evaluation failed: {first_line(e, limit=None)}")
        else:
            run.logger.info(f"(step={state.train_steps:07d}) FID of {len(samples)} EMA samples: {result['fid']:.4f}")
            run.metrics_log.log({"step": state.train_steps, "fid": float(result["fid"]),
                                 "eval_num_samples": len(samples), "cfg_scale": args.eval_cfg_scale})
    distributed.barrier()


# ------------------------------------------------------------------ the run
def main(argv=None):
    args = check_args(parse_args(argv))
    rank, world_size, device = distributed.setup(args.device, timeout_min=args.dist_timeout_min)
    try:
        run = Run(args, rank, world_size, device, local_batch_size(args.global_batch_size, world_size))
        micro_batch_size(run)  # refused now, before any checkpoint, data or experiment folder
        resume = start_resume(run)
        init = finetune.load_init(run)  # --init-from: the weights a new run starts from (None without it)
        apply_checkpoint_settings(args, resume.ckpt, init)
        train(run, resume, init)
    finally:
        distributed.cleanup()


def apply_checkpoint_settings(args, ckpt, init=None):
    """What the checkpoint a run resumes decides, set on args before anything is built (ckpt None:
    a fresh run, from the flags and their defaults, or fine-tuning from `init`, --init-from's
    checkpoint): the model (take_model_settings), the process (args.diffusion_args, the checkpoint's,
    which the process flags --objective, --t-sampling, ... may only repeat), then the sizes they
    give. The one place for every setting a checkpoint decides."""
    if ckpt is None and init is not None:
        ckpt = finetune.init_settings(args, init)
        take_model_settings(args, ckpt, "fine-tuning keeps its model; only --num-classes and --image-size may differ")
    else:
        take_model_settings(args, ckpt)
        if ckpt is not None:
            take_bucket_settings(args, (ckpt.get("args") or {}).get("aspect_buckets"))
    try:
        args.diffusion_args = run_diffusion_args(args, ckpt["diffusion_args"] if ckpt is not None else None)
        if args.sampler is not None:  # the sampler of the grids and --eval-every
            check_fits(args.sampler, objective_of(args.diffusion_args))
    except ProcessError as e:
        raise cli.UserError(str(e)) from None
    return resolve_sizes(args)


# DDP's bucket size over gloo (CPU), against its 25 MB default: smaller buckets start the all-reduce
# sooner in the backward and leave less of it after (DiT-S/2, 2 processes: 1.04-1.10x the steps/s).
GLOO_BUCKET_MB = 5


def wrap_ddp(run, model):
    """The model under DDP when there are several ranks. Gradients are views of DDP's buckets, so the
    backward writes them in place, with no copy into the buckets, as long as they are zeroed rather
    than set to None between steps (train_step does; None would reallocate them and copy them into
    the buckets at every step, as PyTorch's DDP docstring warns). Over gloo the buckets hold GLOO_BUCKET_MB.
    --fsdp: the model as build_state sharded it (FSDP does the gradients' reduce-scatter itself)."""
    if run.world_size == 1 or sharding.is_sharded(model):
        return model
    if run.device.type == "cuda":
        return DDP(model, device_ids=[run.device.index], gradient_as_bucket_view=True)
    return DDP(model, gradient_as_bucket_view=True, bucket_cap_mb=GLOO_BUCKET_MB)


def train(run, resume, init=None):
    """Train from the start (from --init-from's weights `init`, when given), or on from `resume`
    (start_resume's, whose settings are already on run.args)."""
    args = run.args
    distributed.share_cpu_threads(run.device, args.cpu_threads)
    set_tf32(args.precision, run.device)
    dataset, sampler, loader, steps_per_epoch = build_data(run)
    need_vae = args.vae != "none" and (not args.feature_path or (run.rank == 0 and args.sample_every)
                                       or args.eval_every)
    with distributed.local_rank0_first():  # one download of a hub VAE per machine
        vae = vae_lib.load_vae(args.vae, args.vae_path, run.device) if need_vae else None
    if vae is not None and run.device.type == "cuda":  # cuDNN's faster layout for the encoder's convolutions
        vae = vae.to(memory_format=torch.channels_last)
    state = build_state(run, init)
    if resume.path:
        restore(state, resume.ckpt, resume.path, args, steps_per_epoch)
        resume.ckpt = None  # free the loaded copy
    open_experiment(run, resume, state)
    if args.compile:  # before DDP wraps it: DDP's gradient hooks stay outside the compiled graphs
        compile_model(state.model, blocks_only=True)  # as fast as the whole model here, compiled in a fraction
    state.trained = wrap_ddp(run, state.model)
    state.trained.train()
    if run.rank == 0:
        log_start(run, state, dataset, steps_per_epoch, resume)
    try:
        train_loop(run, state, loader, sampler, steps_per_epoch, vae)
    finally:
        if run.metrics_log is not None:
            run.metrics_log.close()
    run.logger.info("Done!")


def start_resume(run):
    """Rank 0 picks the checkpoint and folder; the others load the same checkpoint."""
    resume = runs.find_resume(run.args) if run.rank == 0 else runs.Resume()
    path, folder, note = distributed.broadcast((resume.path, resume.experiment_dir, resume.note))
    if run.rank != 0 and path:
        resume = runs.Resume(path, checkpoint.load_train(path), folder, note)
    return resume


def train_loop(run, state, loader, sampler, steps_per_epoch, vae):
    args = run.args
    diffusion = create_process(args.diffusion_args)
    if args.num_classes == 0:  # an unconditional model has no class to guide towards
        args.cfg_scale = args.eval_cfg_scale = 1.0
    watcher = sampling.make_sampler(args.sampler, args.num_sampling_steps, args.diffusion_args,
                                    **sampling.sampler_options(args)) if args.sample_every or args.eval_every else None
    dropout = state.model.y_embedder.dropout_prob
    x_shape = (args.in_channels, *cli.height_width(args.input_size))
    max_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    run.logger.info(f"Training for {max_steps} steps ({args.epochs} epochs at most)...")
    window, inputs = Window.new(run.device), None
    while state.epoch < args.epochs and state.train_steps < max_steps:
        sampler.set_epoch(state.epoch, skip=state.batches_done * run.local_batch)
        for batch in loader:
            randomness = step_randomness(run, state.train_steps, dropout, x_shape, diffusion)
            for group in state.opt.param_groups:
                group["lr"] = lr_at(args, state.train_steps, max_steps)
            loss, skipped, inputs = train_step(run, state, diffusion, micro_batches(run, batch, randomness, dropout,
                                                                                     vae))
            window.add(loss, skipped)
            state.train_steps += 1
            state.batches_done += 1
            if state.train_steps % args.log_every == 0:
                log_window(run, state, window)
                window = Window.new(run.device)
            if state.train_steps % args.ckpt_every == 0 or state.train_steps >= max_steps:
                checked_save(run, state, diffusion, inputs, window, steps_per_epoch)
            if args.sample_every and state.train_steps % args.sample_every == 0:
                sample_grid(run, state, watcher, vae)
            if args.eval_every and state.train_steps % args.eval_every == 0:
                evaluate_fid(run, state, watcher, vae)
            if state.train_steps >= max_steps:
                return
        state.epoch, state.batches_done = state.epoch + 1, 0
    if inputs is not None and not (state.last_ckpt or "").endswith(f"{state.train_steps:07d}.pt"):
        checked_save(run, state, diffusion, inputs, window, steps_per_epoch)


def checked_save(run, state, diffusion, inputs, window, steps_per_epoch):
    """Save only weights that are good: the window's losses finite, the new weights usable."""
    if window.steps:
        check_window(run, state, window)
    if not weights_usable(run, state, diffusion, inputs):
        raise_diverged(run, state)
    save_checkpoint(run, state, steps_per_epoch)


if __name__ == "__main__":
    cli.run(main)
