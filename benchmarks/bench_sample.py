"""Sampling speed and quality: seconds per image for DDPM-250, DDIM-50 and DPM-Solver++(2M) at
25 steps (and a few more), with classifier-free guidance, on a small model.

Quality, from the same start noise and labels:
- ode_rmse: distance of each deterministic sampler's images from the probability-flow ODE
  solution (DDIM with 1000 steps), in [-1, 1] pixel units: how well it solves the ODE;
- accuracy / fd (digits models only): digits.DigitScorer, i.e. how often a classifier fitted on the
  real digits recognises the requested class, and the Frechet distance to the real digits in its
  hidden features; this compares the ODE solvers with ancestral DDPM-250.

    python benchmarks/bench_sample.py                       # fits a tiny pixel-space DiT on the digits first
    python benchmarks/bench_sample.py --ckpt demo_out/000-DiT-T-2/checkpoints/0002000.pt

Measured on the demo's DiT-T/2 (2,000 steps), 200 images, cfg 4, CPU (2 shared cores):
    sampler          s/image  speed-up  ode_rmse  accuracy    fd
    ddpm-250         0.2818      1.0x       -       1.000    5.20
    ddim-50          0.0609      4.6x    0.0172     1.000    6.34
    ddim-25          0.0322      8.8x    0.0340     1.000    6.29
    dpm-solver-25    0.0279     10.1x    0.0304     1.000    5.96
    dpm-solver-10    0.0112     25.2x    0.0771     1.000    5.43
    (the ODE reference, ddim-1000: accuracy 1.000, fd 6.36)
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
import sampling  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from models import DiT  # noqa: E402

CONFIGS = [("ddpm", 250), ("ddim", 50), ("ddim", 25), ("dpm-solver", 25), ("dpm-solver", 15), ("dpm-solver", 10)]


def tiny_digits_dit():
    return DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=3, num_heads=4, num_classes=10)


def fit_tiny_digits_model(steps, seed=0, batch_size=64, lr=1e-3):
    """A small pixel-space DiT fitted on scikit-learn's 8x8 digits (minutes on a CPU), with an EMA."""
    from digits import load_real_digits

    images, labels = load_real_digits()
    x_all = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)
    y_all = torch.from_numpy(labels)
    torch.manual_seed(seed)
    model, ema = tiny_digits_dit(), tiny_digits_dit()
    ema.load_state_dict(model.state_dict())
    diffusion = create_diffusion("")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0)
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(x_all), (batch_size,))
        t = torch.randint(diffusion.num_timesteps, (batch_size,))
        loss = diffusion.training_losses(model, x_all[idx], t, dict(y=y_all[idx]))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - 0.999)
        if step % 500 == 0 or step == steps - 1:
            print(f"  fit step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)", file=sys.stderr)
    return ema.eval()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="a train.py checkpoint (default: fit a tiny digits DiT)")
    parser.add_argument("--fit-steps", type=int, default=2000)
    parser.add_argument("--fit-cache", default="results/bench_sample_digits.pt",
                        help="where the fitted model is kept for the next run")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_or_fit(args, device):
    """(model, decode, shape, num_classes, name): from --ckpt, else a tiny digits DiT (cached)."""
    if args.ckpt:
        flags = argparse.Namespace(model=None, image_size=None, num_classes=None, vae=None, vae_path=None,
                                   ckpt=args.ckpt)
        model, settings = sampling.load_model(flags, device)
        decode = sampling.load_decoder(settings, device)
        shape = (settings.in_channels, settings.latent_size, settings.latent_size)
        num_classes, name = settings.num_classes, args.ckpt
    else:
        if os.path.exists(args.fit_cache):
            from files import load_torch

            model = tiny_digits_dit()
            model.load_state_dict(load_torch(args.fit_cache))
        else:
            print(f"fitting a tiny digits DiT for {args.fit_steps} steps", file=sys.stderr)
            model = fit_tiny_digits_model(args.fit_steps, args.seed)
            from files import save_torch

            save_torch(model.state_dict(), args.fit_cache)
        model = model.to(device).eval()
        decode, shape, num_classes = (lambda x: x), (1, 8, 8), 10
        name = f"tiny digits DiT ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)"
    return model, decode, shape, num_classes, name


def print_table(rows):
    ddpm = rows[0]["s_per_image"]
    print(f"\n{'sampler':<16}{'s/image':>10}{'vs ddpm-250':>13}{'ode_rmse':>10}{'accuracy':>10}{'fd':>8}")
    for row in rows:
        print(f"{row['sampler']:<16}{row['s_per_image']:>10.5f}{ddpm / row['s_per_image']:>12.1f}x"
              f"{row.get('ode_rmse', float('nan')):>10.4f}{row.get('accuracy', float('nan')):>10.3f}"
              f"{row.get('fd', float('nan')):>8.2f}")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_grad_enabled(True)
    model, decode, shape, num_classes, name = load_or_fit(args, device)
    torch.set_grad_enabled(False)

    labels = [i % num_classes for i in range(args.num_images)]
    generators = sampling.seeded_generators(args.seed, range(args.num_images))
    noise = sampling.draw(generators, shape).to(device)
    scorer = None
    if shape == (1, 8, 8) and num_classes == 10:
        from digits import DigitScorer

        scorer = DigitScorer()

    def run(sampler, steps):
        chosen = sampling.make_sampler(sampler, steps)
        out, start = [], time.perf_counter()
        for i in range(0, args.num_images, args.batch_size):
            torch.manual_seed(args.seed + i)  # DDPM's per-step noise
            latents, _ = sampling.generate(model, chosen, labels[i:i + args.batch_size], args.cfg_scale,
                                           noise[i:i + args.batch_size])
            out.append(decode(latents).float().clamp(-1, 1).cpu())
        if device.type == "cuda":
            torch.cuda.synchronize()
        return torch.cat(out), (time.perf_counter() - start) / args.num_images

    print(f"{name}, {args.num_images} images, cfg {args.cfg_scale}, {device.type}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    reference, _ = run("ddim", 1000)
    rows = []
    for sampler, steps in CONFIGS:
        images, seconds = run(sampler, steps)
        row = {"sampler": f"{sampler}-{steps}", "s_per_image": seconds}
        if sampler != "ddpm":
            row["ode_rmse"] = float((images - reference).pow(2).mean().sqrt())
        if scorer is not None:
            score = scorer.score(cli.to_uint8(images), labels)
            row["accuracy"], row["fd"] = score["accuracy"], score["frechet_distance"]
        rows.append(row)
        print("  " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              file=sys.stderr)
    if scorer is not None:
        score = scorer.score(cli.to_uint8(reference), labels)
        print(f"  reference ddim-1000: accuracy {score['accuracy']:.4g} fd {score['frechet_distance']:.4g}",
              file=sys.stderr)
    print_table(rows)
    return rows


if __name__ == "__main__":
    cli.run(main)
