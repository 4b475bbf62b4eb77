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

Checkpoints (results/NNN-MODEL/checkpoints/STEP.pt) hold {model, ema, opt, scaler, args,
train_steps, epoch, batches_in_epoch}. `--resume auto` continues the latest checkpoint of the
latest experiment folder of this --model (a fresh start if there is none), `--resume PATH` a
given one; both continue with the same step count, data order and random draws, so the weights
match an uninterrupted run exactly. The results folder must be shared by all machines.

Reproducibility: all randomness of a step (flips, latent draws, timesteps, noise, label
dropout) is drawn for the whole global batch from a generator seeded by (--global-seed, step),
and each process takes its own samples' share. Resuming therefore needs no saved RNG state,
and a run on N processes matches a run on one process with the same --global-batch-size up to
float rounding (so may a run resumed on another number of processes). The initial weights come from --global-seed alone; each process's global torch
RNG is seeded with global_seed * world_size + rank as in the original.

Unreadable image files are skipped with a warning naming them (see data.py). Training stops
with a message when the loss becomes NaN or infinite; checkpoints are only written after the
loss was checked, so the last one is good.
"""
import argparse
import glob
import json
import logging
import math
import os
import re
import resource
import sys
import time
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import cli
import data
import distributed
import files
import vae as vae_lib
from diffusion import create_diffusion
from models import DiT_models, create_model, load_weights


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", type=str, default=None, help="image folder, one sub-folder per class")
    parser.add_argument("--feature-path", type=str, default=None, help="features from extract_features.py instead")
    parser.add_argument("--results-dir", type=str, default="results")
    parser.add_argument("--model", type=str, choices=list(DiT_models), default="DiT-XL/2")
    parser.add_argument("--image-size", type=int, default=None,
                        help="256 or 512 with the VAE (any multiple of 8 works); in pixel space any multiple of the "
                             "patch size (default 256, or the size the features were extracted at)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--vae", type=str, default=None, choices=["ema", "mse", "none"],
                        help="Stable Diffusion VAE (default ema, or the one the features used); none = pixel space")
    parser.add_argument("--vae-path", type=str, default=None, help="local diffusers AutoencoderKL folder")
    parser.add_argument("--in-channels", type=int, choices=[1, 3], default=3,
                        help="pixel space only: 3 = RGB, 1 = greyscale")
    parser.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True,
                        help="random horizontal flips (--no-hflip for data where a mirror image is another "
                             "thing, such as digits)")
    parser.add_argument("--epochs", type=int, default=1400)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    parser.add_argument("--global-batch-size", type=int, default=256)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, constant")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--ema-decay", type=float, default=0.9999)
    parser.add_argument("--max-grad-norm", type=float, default=None, help="clip gradients to this norm (off)")
    parser.add_argument("--precision", choices=cli.PRECISIONS, default="tf32",
                        help="fp32 | tf32 (TF32 matmuls on CUDA, as the original) | bf16 | fp16 (autocast)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations: less memory")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="data-loading processes per rank (default 0 for data held in memory, else 4)")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--ckpt-every", type=int, default=50_000)
    parser.add_argument("--keep-last", type=int, default=0, help="keep only the last K checkpoints (0: all)")
    parser.add_argument("--resume", type=str, default=None, help="checkpoint path, or auto")
    parser.add_argument("--sample-every", type=int, default=0,
                        help="save a grid of EMA samples (fixed classes and noise) every N steps (0: never)")
    parser.add_argument("--num-sampling-steps", type=int, default=250, help="DDPM steps for grids and --eval-every")
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale of the sample grids")
    parser.add_argument("--eval-every", type=int, default=0, help="log FID of EMA samples every N steps (0: never)")
    parser.add_argument("--eval-ref", type=str, default=None, help="reference batch .npz for --eval-every")
    parser.add_argument("--eval-num-samples", type=int, default=1000)
    parser.add_argument("--eval-cfg-scale", type=float, default=1.5)
    parser.add_argument("--device", type=str, default="auto", help="auto | cuda | cpu")
    parser.add_argument("--cpu-threads", type=int, default=0,
                        help="CPU training: threads per process (default: the cores over the processes per machine)")
    return parser.parse_args(argv)


def resolve_args(args):
    """Fill in defaults that depend on the data and check the flags together, before any work."""
    if bool(args.data_path) == bool(args.feature_path):
        raise cli.UserError("pass exactly one of --data-path (an image folder) or --feature-path (from "
                            "extract_features.py)")
    if args.feature_path:
        meta = data.FeatureShards.read_meta(args.feature_path)
        if args.vae == "none":
            raise cli.UserError("--feature-path holds VAE latents; drop --vae none or train from --data-path")
        for flag, key in (("image_size", "image_size"), ("vae", "vae"), ("vae_path", "vae_path")):
            given = getattr(args, flag)
            if given is not None and given != meta[key]:
                raise cli.UserError(f"--{flag.replace('_', '-')} {given} differs from the {meta[key]} the features in "
                                    f"{args.feature_path} were extracted with; drop the flag or re-extract")
            setattr(args, flag, meta[key])
    args.vae = args.vae or "ema"
    args.image_size = args.image_size or 256
    patch = int(args.model.split("/")[-1])
    if args.vae == "none":
        if args.vae_path:
            raise cli.UserError("--vae-path was given with --vae none (pixel space); drop one of them")
        if args.image_size % patch:
            raise cli.UserError(f"--image-size {args.image_size} is not divisible by the patch size {patch} of "
                                f"{args.model}; use a multiple of {patch}")
        args.input_size = args.image_size
    else:
        if args.image_size % vae_lib.DOWNSAMPLE:
            raise cli.UserError(f"--image-size {args.image_size} is not divisible by {vae_lib.DOWNSAMPLE} (the VAE's "
                                f"downsampling factor); use 256 or 512")
        args.input_size = args.image_size // vae_lib.DOWNSAMPLE
        if args.input_size % patch:
            raise cli.UserError(f"--image-size {args.image_size} gives {args.input_size}x{args.input_size} latents, "
                                f"not divisible by the patch size {patch}; use 256 or 512")
        args.in_channels = 4
    positive = ["epochs", "global_batch_size", "log_every", "ckpt_every", "num_sampling_steps", "num_classes"]
    for flag in positive:
        if getattr(args, flag) < 1:
            raise cli.UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_steps is not None and args.max_steps < 0:
        raise cli.UserError("--max-steps must be 0 or more")
    if args.eval_every:
        if not args.eval_ref or not os.path.isfile(args.eval_ref):
            raise cli.UserError(f"--eval-every needs --eval-ref pointing at a reference .npz (got {args.eval_ref!r})")
    return args


def step_seed(global_seed, step):
    """Distinct for every (seed, step) pair with step < 2**32."""
    return (global_seed % 2**31) * 2**32 + step


def find_resume(args):
    """(experiment_dir or None, checkpoint or None) for --resume; run on rank 0 only."""
    if args.resume is None:
        return None, None
    if args.resume != "auto":
        if not os.path.isfile(args.resume):
            raise FileNotFoundError(f"--resume {args.resume!r} does not exist; pass a checkpoint file or auto")
        folder = os.path.dirname(os.path.abspath(args.resume))
        in_experiment = os.path.basename(folder) == "checkpoints"
        return (os.path.dirname(folder) if in_experiment else None), args.resume
    for experiment in sorted(experiment_dirs(args), reverse=True):
        ckpts = checkpoints_in(experiment)
        if ckpts:
            return experiment, ckpts[-1]
    return None, None


def model_string(args):
    return args.model.replace("/", "-")


def experiment_dirs(args):
    pattern = re.compile(r"^\d{3,}-" + re.escape(model_string(args)) + "$")
    if not os.path.isdir(args.results_dir):
        return []
    return [os.path.join(args.results_dir, d) for d in os.listdir(args.results_dir) if pattern.match(d)]


def checkpoints_in(experiment):
    return sorted(glob.glob(os.path.join(experiment, "checkpoints", "[0-9]" * 7 + ".pt")))


def new_experiment_dir(args):
    os.makedirs(args.results_dir, exist_ok=True)
    used = [int(d.split("-")[0]) for d in os.listdir(args.results_dir) if re.match(r"^\d+-", d)]
    path = os.path.join(args.results_dir, f"{max(used, default=-1) + 1:03d}-{model_string(args)}")
    os.makedirs(path)
    return path


def make_logger(experiment_dir, rank):
    logger = logging.getLogger("dit.train")
    logger.handlers.clear()
    logger.propagate = False
    if rank == 0:
        logger.setLevel(logging.INFO)
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(experiment_dir, "log.txt"))):
            handler.setFormatter(fmt)
            logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def append_metrics(experiment_dir, record):
    with open(os.path.join(experiment_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def drop_metrics_after(experiment_dir, step):
    """On resume: records a killed run logged past its last checkpoint would be repeated."""
    path = os.path.join(experiment_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    def kept(line):
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):  # e.g. a line cut short by the kill
            return False

    with open(path) as f:
        lines = f.readlines()
    keep = [line for line in lines if kept(line)]
    if len(keep) != len(lines):
        with files.atomic_path(path) as tmp, open(tmp, "w") as f:
            f.writelines(keep)


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def generate(ema, sampler, noise, labels, cfg_scale, vae, precision, seed):
    """uint8 (N, H, W, C) images from the EMA model (sampling.py's samplers), global RNG untouched."""
    import sampling  # lazily: only runs that watch samples need it

    with torch.random.fork_rng(devices=[noise.device] if noise.device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = sampling.generate(ema, sampler, labels, cfg_scale, noise, precision=precision)
    return cli.to_uint8(vae_lib.decode(vae, out) if vae is not None else out)


def save_grid(images, path, image_size):
    """A PNG grid of uint8 (N, H, W, C) images; tiny images are enlarged so they can be seen."""
    import torchvision.utils
    from PIL import Image

    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    zoom = max(1, 64 // image_size)
    x = x.repeat_interleave(zoom, dim=2).repeat_interleave(zoom, dim=3)
    grid = torchvision.utils.make_grid(x, nrow=min(8, len(x)), padding=2, pad_value=255)
    files.save_image(Image.fromarray(grid.permute(1, 2, 0).numpy()), path)


def main(argv=None):
    args = resolve_args(parse_args(argv))
    rank, world_size, device = distributed.setup(args.device)
    try:
        train(args, rank, world_size, device)
    finally:
        distributed.cleanup()


def broadcast(value, world_size):
    """Rank 0's value on every rank."""
    if world_size > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def local_batch_size(global_batch_size, world_size):
    if global_batch_size % world_size:
        raise cli.UserError(f"--global-batch-size {global_batch_size} does not divide over {world_size} "
                            f"processes; use a multiple of {world_size}")
    return global_batch_size // world_size


def train(args, rank, world_size, device):
    local_batch = local_batch_size(args.global_batch_size, world_size)
    distributed.share_cpu_threads(device, args.cpu_threads)
    cli.set_tf32(args.precision, device)

    # Data.
    if args.feature_path:
        dataset = data.FeatureShards(args.feature_path, args.num_classes)
        in_memory = len(dataset.shards) == 1
    else:
        channels = args.in_channels if args.vae == "none" else 3
        dataset = data.ImageFolder(args.data_path, args.image_size, channels, args.num_classes, quiet=rank != 0)
        in_memory = dataset.images is not None
    sampler = data.ResumableSampler(dataset, world_size, rank, seed=args.global_seed)
    steps_per_epoch = sampler.num_samples // local_batch
    if steps_per_epoch == 0:
        raise cli.UserError(f"the data set has {len(dataset)} images, fewer than one global batch of "
                            f"{args.global_batch_size}; lower --global-batch-size")
    num_workers = args.num_workers if args.num_workers is not None else (0 if in_memory else 4)
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=num_workers,
                        pin_memory=device.type == "cuda", drop_last=True, collate_fn=data.batch_collate,
                        persistent_workers=num_workers > 0)

    # The checkpoint to resume and its experiment folder: decided once, on rank 0, for everyone.
    experiment_dir, resume_path = broadcast(find_resume(args) if rank == 0 else None, world_size)
    need_vae = args.vae != "none" and (not args.feature_path or (rank == 0 and args.sample_every) or args.eval_every)
    vae = vae_lib.load_vae(args.vae, args.vae_path, device) if need_vae else None

    # Model, EMA, optimiser: identical initial weights on every rank, whatever the world size.
    torch.manual_seed(args.global_seed)
    model = create_model(args.model, input_size=args.input_size, in_channels=args.in_channels,
                         num_classes=args.num_classes).to(device)
    torch.manual_seed(args.global_seed * world_size + rank)
    model.gradient_checkpointing = args.grad_checkpointing
    ema = deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    train_steps, epoch, batches_done = 0, 0, 0
    if resume_path:
        ckpt = files.load_torch(resume_path, "--resume checkpoint")
        if not isinstance(ckpt, dict) or not {"model", "ema", "opt", "train_steps"} <= set(ckpt):
            raise cli.UserError(f"--resume {resume_path!r} is not a train.py checkpoint (it lacks model, ema, opt or "
                                f"train_steps); pass a checkpoint written by train.py")
        load_weights(model, ckpt["model"], f"--resume {resume_path}")
        load_weights(ema, ckpt["ema"], f"--resume {resume_path} (ema)")
        opt.load_state_dict(ckpt["opt"])
        for group in opt.param_groups:  # the flags of this run win over the saved ones
            group["lr"], group["weight_decay"] = args.lr, args.weight_decay
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        train_steps, epoch, batches_done = ckpt["train_steps"], ckpt.get("epoch", 0), ckpt.get("batches_in_epoch", 0)
        if batches_done >= steps_per_epoch:
            epoch, batches_done = epoch + 1, 0
        del ckpt
    if experiment_dir is None:  # created only now, so bad input leaves no empty folder behind
        experiment_dir = broadcast(new_experiment_dir(args) if rank == 0 else None, world_size)
    checkpoint_dir = os.path.join(experiment_dir, "checkpoints")
    samples_dir = os.path.join(experiment_dir, "samples")
    if rank == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
    logger = make_logger(experiment_dir, rank)

    raw_model = model
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    model.train()
    ema_params, model_params = list(ema.parameters()), list(raw_model.parameters())

    diffusion = create_diffusion(timestep_respacing="")  # 1000-step linear schedule, learned sigma
    if args.sample_every or args.eval_every:
        import sampling
        ddpm = sampling.make_sampler("ddpm", args.num_sampling_steps)
    dropout = raw_model.y_embedder.dropout_prob
    gen = torch.Generator(device=device)
    B, sl = args.global_batch_size, slice(rank, None, world_size)
    latent_shape = (4, args.input_size, args.input_size)
    x_shape = (args.in_channels, args.input_size, args.input_size)

    if rank == 0:
        if resume_path:
            drop_metrics_after(experiment_dir, train_steps)
        logger.info(f"Experiment directory: {experiment_dir}")
        logger.info(f"{args.model}: {sum(p.numel() for p in raw_model.parameters()):,} parameters; input "
                    f"{args.input_size}x{args.input_size}x{args.in_channels}; "
                    + (f"VAE {vae_lib.vae_source(args.vae, args.vae_path)}" if args.vae != "none" else "pixel space"))
        logger.info(f"Data: {len(dataset):,} images from {args.feature_path or args.data_path} "
                    f"({'pre-extracted latents' if args.feature_path else 'images'}); {steps_per_epoch} steps per "
                    f"epoch; global batch {B} on {world_size} process(es) ({device.type})")
        if resume_path:
            logger.info(f"Resumed from {resume_path} at step {train_steps} (epoch {epoch}, batch {batches_done})")
    last_ckpt = resume_path

    def window_check(running_loss, bad_steps, log_steps):
        """All-reduce the window's loss; stop on NaN/inf (fp16: only when every step overflowed)."""
        loss = distributed.mean_over_ranks(running_loss / max(1, log_steps - bad_steps.item()), device)
        bad = distributed.mean_over_ranks(bad_steps.item(), device)
        if (bad > 0 and args.precision != "fp16") or (log_steps and bad >= log_steps) or not math.isfinite(loss):
            raise RuntimeError(f"the loss became NaN or infinite by step {train_steps}; stopping. The last good "
                               f"checkpoint is {last_ckpt or 'none (none was written yet)'}; resume from it with a "
                               f"lower --lr, --max-grad-norm 1.0, or --precision bf16 instead of fp16")
        return loss

    def save_checkpoint():
        nonlocal last_ckpt
        path = os.path.join(checkpoint_dir, f"{train_steps:07d}.pt")
        if rank == 0:
            files.save_torch({"model": raw_model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                              "scaler": scaler.state_dict() if scaler.is_enabled() else None, "args": vars(args),
                              "train_steps": train_steps, "epoch": epoch, "batches_in_epoch": batches_done,
                              "world_size": world_size}, path)
            logger.info(f"Saved checkpoint to {path}")
            if args.keep_last > 0:
                for old in checkpoints_in(experiment_dir)[:-args.keep_last]:
                    os.remove(old)
        last_ckpt = path
        distributed.barrier()

    def monitor():
        if args.sample_every and train_steps % args.sample_every == 0 and rank == 0:
            n = 8
            labels = torch.tensor([i * args.num_classes // n for i in range(n)], device=device)
            noise = torch.randn((n, *x_shape), generator=torch.Generator().manual_seed(args.global_seed)).to(device)
            images = generate(ema, ddpm, noise, labels, args.cfg_scale, vae, args.precision, seed=args.global_seed)
            path = os.path.join(samples_dir, f"{train_steps:07d}.png")
            save_grid(images, path, args.image_size)
            logger.info(f"Saved EMA samples to {path}")
        if args.eval_every and train_steps % args.eval_every == 0:
            evaluate_fid()

    def evaluate_fid():
        import evaluate  # lazily: only runs that ask for FID need its dependencies

        per_rank = math.ceil(args.eval_num_samples / world_size)
        g = torch.Generator().manual_seed(step_seed(args.global_seed + 1, rank))
        chunks = []
        for start in range(0, per_rank, local_batch):
            n = min(local_batch, per_rank - start)
            noise = torch.randn((n, *x_shape), generator=g).to(device)
            labels = torch.randint(0, args.num_classes, (n,), generator=g).to(device)
            chunks.append(generate(ema, ddpm, noise, labels, args.eval_cfg_scale, vae, args.precision,
                                   seed=step_seed(args.global_seed + 2, rank * 100_003 + start)))
        gathered = [None] * world_size
        if world_size > 1:
            dist.all_gather_object(gathered, chunks)
        else:
            gathered = [chunks]
        if rank == 0:
            samples = np.concatenate([c for chunks_ in gathered for c in chunks_])[: args.eval_num_samples]
            try:
                result = evaluate.compute_metrics(args.eval_ref, samples, device=device, batch_size=local_batch,
                                                  metrics=("fid",))
            except (ValueError, RuntimeError, OSError) as e:  # a failed measurement must not end the training
                logger.info(f"(step={train_steps:07d}) FID evaluation failed: {str(e).splitlines()[0]}")
            else:
                logger.info(f"(step={train_steps:07d}) FID of {len(samples)} EMA samples: {result['fid']:.4f}")
                append_metrics(experiment_dir, {"step": train_steps, "fid": float(result["fid"]),
                                                "eval_num_samples": len(samples), "cfg_scale": args.eval_cfg_scale})
        distributed.barrier()

    max_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    logger.info(f"Training for {max_steps} steps ({args.epochs} epochs at most)...")
    running_loss = torch.zeros((), device=device, dtype=torch.float64)
    bad_steps = torch.zeros((), device=device, dtype=torch.long)
    log_steps, start_time = 0, time.time()
    while epoch < args.epochs and train_steps < max_steps:
        sampler.set_epoch(epoch, skip=batches_done * local_batch)
        for batch in loader:
            # Every random draw is made for the whole global batch, then sliced: see the docstring.
            gen.manual_seed(step_seed(args.global_seed, train_steps))
            flip = (torch.rand(B, generator=gen, device=device) < (0.5 if args.hflip else 0.0))[sl]
            drop = (torch.rand(B, generator=gen, device=device) < dropout)[sl].long()
            t = torch.randint(0, diffusion.num_timesteps, (B,), generator=gen, device=device)[sl]
            latent_noise = torch.randn((B, *latent_shape), generator=gen, device=device)[sl]
            noise = torch.randn((B, *x_shape), generator=gen, device=device)[sl]
            with torch.no_grad():
                if args.feature_path:
                    mean, std, y = (v.to(device, non_blocking=True) for v in batch)
                    pick = torch.arange(len(y), device=device), flip.long()
                    x = vae_lib.sample_latents(mean[pick].float(), std[pick].float(), noise=latent_noise)
                else:
                    images, y = (v.to(device, non_blocking=True) for v in batch)
                    x = images.float() / 127.5 - 1
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                    if vae is not None:
                        mean, std = vae_lib.encode_distribution(vae, x)
                        x = vae_lib.sample_latents(mean, std, noise=latent_noise)
            kwargs = dict(y=y, force_drop_ids=drop) if dropout > 0 else dict(y=y)
            with cli.autocast(args.precision, device):
                loss = diffusion.training_losses(model, x, t, kwargs, noise=noise)["loss"].mean()
            scaler.scale(loss).backward()
            if args.max_grad_norm:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, model_params, 1 - args.ema_decay)

            finite = torch.isfinite(loss.detach())
            running_loss += torch.where(finite, loss.detach().double(), 0.0)
            bad_steps += (~finite).long()
            log_steps += 1
            train_steps += 1
            batches_done += 1
            if train_steps % args.log_every == 0:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.time() - start_time
                avg_loss = window_check(running_loss, bad_steps, log_steps)
                record = {"step": train_steps, "epoch": epoch, "loss": avg_loss,
                          "steps_per_sec": log_steps / elapsed, "images_per_sec": log_steps * B / elapsed,
                          "peak_mem_gib": peak_memory_gib(device), "lr": opt.param_groups[0]["lr"]}
                if args.precision == "fp16":
                    record["skipped_steps"] = int(distributed.mean_over_ranks(bad_steps.item(), device) * world_size)
                if rank == 0:
                    logger.info(f"(step={train_steps:07d}) Train Loss: {avg_loss:.4f}, Train Steps/Sec: "
                                f"{record['steps_per_sec']:.2f}, Images/Sec: {record['images_per_sec']:.1f}, "
                                f"Peak Mem: {record['peak_mem_gib']:.2f} GiB")
                    append_metrics(experiment_dir, record)
                running_loss.zero_()
                bad_steps.zero_()
                log_steps, start_time = 0, time.time()
            final = train_steps >= max_steps
            if train_steps % args.ckpt_every == 0 or final:
                if log_steps:
                    window_check(running_loss, bad_steps, log_steps)
                save_checkpoint()
            if args.sample_every or args.eval_every:
                monitor()
            if final:
                break
        else:
            epoch, batches_done = epoch + 1, 0
            continue
        break
    if last_ckpt is None or not last_ckpt.endswith(f"{train_steps:07d}.pt"):
        if log_steps:
            window_check(running_loss, bad_steps, log_steps)
        save_checkpoint()
    logger.info("Done!")


if __name__ == "__main__":
    cli.run(main)
