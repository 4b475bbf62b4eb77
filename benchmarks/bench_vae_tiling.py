"""Peak memory and time of decoding one large image with the Stable Diffusion VAE, with and
without diffusers' tiled decode (what `--vae-tiling` turns on).

    python benchmarks/bench_vae_tiling.py                      # 1024x1024: untiled, then tiled
    python benchmarks/bench_vae_tiling.py --sizes 1024 2048 --untiled-up-to 1024

The VAE has the architecture of stabilityai/sd-vae-ft-ema (its config: 4 blocks of 128, 256,
512, 512 channels, tiles of 256 px) with random weights: the same cost as the real one, no
download. Each decode runs in a fresh process, so one measurement cannot inherit another's
memory. On CPU, the figure is the rise of the process's peak resident memory (VmHWM, reset
through /proc/self/clear_refs after the VAE and the latent exist) during the decode; on CUDA,
the allocator's peak above what was allocated before the decode.
"""
import argparse
import json
import os
import subprocess
import sys
import time

SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                     layers_per_block=2, norm_num_groups=32, sample_size=256)


def proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss():
    """Make VmHWM restart from the current RSS (Linux 4.0+); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(size, tiling, device_name):
    """One decode of a (1, 4, size/8, size/8) latent in this process: a dict of figures."""
    import torch
    from diffusers.models import AutoencoderKL

    device = torch.device(device_name)
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE_CONFIG).to(device).eval().requires_grad_(False)
    if tiling:
        vae.enable_tiling()
    latent = torch.randn(1, 4, size // 8, size // 8, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        exact = reset_peak_rss()
        before = proc_status_kib("VmRSS") * 1024 if exact else None
    start = time.perf_counter()
    with torch.no_grad():
        image = vae.decode(latent).sample
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        rise = torch.cuda.max_memory_allocated() - before
    elif before is not None:
        rise = proc_status_kib("VmHWM") * 1024 - before
    else:
        rise = None  # no reset allowed: only the whole process's peak is known
    assert image.shape == (1, 3, size, size), image.shape
    return {"size": size, "tiling": tiling, "seconds": seconds, "peak_rise_bytes": rise,
            "process_peak_bytes": proc_status_kib("VmHWM") * 1024, "device": device.type,
            "threads": torch.get_num_threads()}


def run_child(size, tiling, device):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(size), str(int(tiling)), "--device", device]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: the {size}px {'tiled' if tiling else 'untiled'} decode failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def gib(n):
    return "n/a" if n is None else f"{n / 2**30:6.2f} GiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024], help="image sides in pixels (multiples of 8)")
    parser.add_argument("--untiled-up-to", type=int, default=1024,
                        help="decode untiled only up to this side (an untiled 2048 px decode needs many GiB)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda")
    parser.add_argument("--child", nargs=2, type=int, metavar=("SIZE", "TILING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(measure(args.child[0], bool(args.child[1]), args.device)))
        return

    print(f"SD-VAE decode of one image, random weights, {args.device}; each decode in a fresh process", flush=True)
    results = {}
    for size in args.sizes:
        for tiling in (False, True):
            if not tiling and size > args.untiled_up_to:
                continue
            r = results[size, tiling] = run_child(size, tiling, args.device)
            mode = "tiled  " if tiling else "untiled"
            print(f"{size:5d}x{size:<5d} {mode}: peak memory rise {gib(r['peak_rise_bytes'])} (process peak "
                  f"{gib(r['process_peak_bytes'])}), {r['seconds']:7.1f} s on {r['threads']} thread(s)", flush=True)
        if (size, False) in results and results[size, False]["peak_rise_bytes"]:
            untiled, tiled = results[size, False], results[size, True]
            print(f"{size:5d}x{size:<5d} tiled / untiled: {tiled['peak_rise_bytes'] / untiled['peak_rise_bytes']:.3f}x "
                  f"peak memory rise, {tiled['seconds'] / untiled['seconds']:.2f}x time", flush=True)


if __name__ == "__main__":
    main()
