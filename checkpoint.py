"""DiT checkpoints: the one place that writes and reads them, in every format they come in.

A train.py checkpoint (results/NNN-MODEL/checkpoints/STEP.pt) is a dict of tensors and plain
values, read with torch.load(weights_only=True):

    model, ema          state_dicts of the trained and the EMA weights
    opt, scaler         AdamW state; the fp16 loss scaler's state (None unless fp16)
    model_args          the DiT constructor arguments: DiT(**model_args) rebuilds the network
    diffusion_args      the create_diffusion settings it was trained with
    args                every train.py flag (model name, image size, VAE, ...)
    train_steps, epoch, batches_in_epoch, world_size, format

So `sample.py --ckpt STEP.pt` needs no other flags. Checkpoints written before `model_args`
existed (format 1) rebuild from their stored args. Also read: the released state_dicts
(DiT-XL-2-256x256.pt, downloaded once), any bare DiT state_dict (its config is read off the
tensor shapes), `.safetensors` files (see the section below) and diffusers DiT folders or hub ids
(interop.py converts those). The command line writes the last two, from any checkpoint it reads
(the EMA weights, and the process they were trained with):

    python checkpoint.py export results/000-DiT-XL-2/checkpoints/0400000.pt dit.safetensors
    python checkpoint.py export results/000-DiT-XL-2/checkpoints/0400000.pt dit-pipeline/   # diffusers
    python checkpoint.py export CKPT OUT --format diffusers --vae mse   # format by OUT's extension, else --format
"""
import argparse
import dataclasses
import inspect
import json
import os

import download
import files
import interop
import vae as vae_lib
from cli import UserError
from models import MODEL_SIZES, DiT, load_weights, model_args_for

FORMAT = 2
# create_diffusion's settings for everything trained before objectives were stored.
DEFAULT_DIFFUSION_ARGS = {"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True}
TRAIN_KEYS = {"model", "ema", "opt", "train_steps"}


@dataclasses.dataclass
class Loaded:
    """What sampling needs from any checkpoint."""
    state_dict: dict  # the weights to sample with (a train.py checkpoint's EMA)
    model_args: dict  # DiT(**model_args); None when nothing recorded them
    diffusion_args: dict
    settings: dict  # model (name), image_size, vae, vae_path, as far as known
    source: str  # the path, name or hub id read


# ------------------------------------------------------------------ train.py checkpoints
def train_state(model, ema, opt, scaler, args, diffusion_args, progress):
    """The dict train.py saves; `progress` holds train_steps, epoch, batches_in_epoch, world_size."""
    return {"format": FORMAT, "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "model_args": dict(model.model_args),
            "diffusion_args": dict(diffusion_args), "args": dict(vars(args)), **progress}


def save(state, path):
    """Write atomically; a full disk is one line saying the earlier checkpoints are intact."""
    try:
        files.save_torch(state, path)
    except (OSError, RuntimeError) as e:
        # torch reports a full disk as "[enforce fail at inline_container.cc] ... unexpected pos"
        if not files.is_full_disk(e, os.path.dirname(os.path.abspath(path))):
            raise
        raise OSError(28, f"the disk is full: could not write {path} (earlier checkpoints are intact; "
                          f"free space, then resume with --resume auto)") from None


def load_train(path):
    """A train.py checkpoint as a dict with model_args and diffusion_args filled in."""
    ckpt = files.load_torch(path, "--resume checkpoint")
    if not isinstance(ckpt, dict) or not TRAIN_KEYS <= set(ckpt):
        raise UserError(f"{path!r} is not a train.py checkpoint (it lacks {', '.join(sorted(TRAIN_KEYS))}); "
                        f"pass a checkpoint written by train.py")
    return _upgrade(ckpt, path)


def _upgrade(ckpt, path):
    """Format 1 (train.py before model_args) -> the current fields."""
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    if "model_args" not in ckpt:
        if "model" not in args:
            raise UserError(f"checkpoint {path!r} records neither model_args nor its --model; "
                            f"it cannot be rebuilt")
        vae = args.get("vae") or "ema"
        image_size = args.get("image_size") or 256
        ckpt["model_args"] = model_args_for(
            args["model"], input_size=image_size if vae == "none" else image_size // vae_lib.DOWNSAMPLE,
            in_channels=int(args.get("in_channels") or 3) if vae == "none" else 4,
            num_classes=args.get("num_classes") or 1000)
    ckpt["model_args"] = complete_model_args(ckpt["model_args"])
    ckpt.setdefault("diffusion_args", dict(DEFAULT_DIFFUSION_ARGS))
    return ckpt


def complete_model_args(model_args):
    """model_args with DiT's defaults filled in: older checkpoints lack arguments added since
    (and format 1 records only what differs), and an export means the same network if a default
    ever changes."""
    defaults = {name: p.default for name, p in inspect.signature(DiT.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **model_args}


def build_model(model_args, state_dict=None, what="checkpoint"):
    """DiT(**model_args), with the weights loaded when given (one line on a mismatch)."""
    try:
        model = DiT(**model_args)
    except TypeError as e:  # an argument this version of the code does not know
        raise UserError(f"{what} needs a DiT this code cannot build ({e}); update the code") from None
    if state_dict is not None:
        load_weights(model, state_dict, what)
    return model


# ------------------------------------------------------------------ reading any format
def load(name_or_path):
    """Loaded from a released name, a .pt checkpoint or state_dict, a .safetensors file, or a
    diffusers DiT folder / hub id."""
    source = os.fspath(name_or_path)
    if source.endswith(".safetensors"):
        return load_safetensors(source)
    if interop.is_diffusers_source(source):
        state_dict, model_args, diffusion_args, settings = interop.load_diffusers(source)
        return Loaded(state_dict, complete_model_args(model_args), diffusion_args, settings, source)
    if source in download.RELEASED_MODELS and not os.path.isfile(source):
        source = download.download_model(source)
    ckpt = files.load_torch(source, "checkpoint")
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {source!r} holds a {type(ckpt).__name__}, not a state_dict or a train.py "
                        f"checkpoint")
    if "ema" in ckpt or "model_args" in ckpt or isinstance(ckpt.get("args"), dict):
        ckpt = _upgrade(ckpt, source)
        args = ckpt.get("args") or {}
        settings = {k: args.get(k) for k in ("model", "image_size", "vae", "vae_path")}
        weights = ckpt["ema"] if "ema" in ckpt else ckpt["model"]  # sample from the EMA, as the paper does
        return Loaded(weights, ckpt["model_args"], ckpt["diffusion_args"], settings, source)
    return Loaded(ckpt, None, dict(DEFAULT_DIFFUSION_ARGS), {}, source)


def model_args_from_state_dict(state_dict):
    """DiT arguments read off a bare state_dict's shapes (None when it is not a DiT's). The head
    count leaves no trace in the shapes: it is taken from the named config of that size."""
    try:
        patch_weight = state_dict["x_embedder.proj.weight"]
        hidden, in_channels, patch = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[-1]
        depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
        grid = int(round(state_dict["pos_embed"].shape[1] ** 0.5))
        if grid * grid != state_dict["pos_embed"].shape[1]:
            return None  # a non-square grid: its height and width leave no trace in a bare state_dict
        out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
        table_rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
        mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, IndexError, AttributeError):
        return None
    heads = next((h for d, w, h in MODEL_SIZES.values() if (d, w) == (depth, hidden)), None)
    if heads is None:
        return None
    return dict(input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
                num_heads=heads, mlp_ratio=mlp_hidden / hidden, num_classes=table_rows - 1,
                learn_sigma=out_channels == 2 * in_channels)


# ------------------------------------------------------------------ safetensors
# One .safetensors file: the weights to sample with (a train.py checkpoint's EMA) and, as JSON
# strings in the header's metadata (safetensors metadata is str -> str), model_args,
# diffusion_args and settings. No pickle anywhere: the file cannot carry code.
SAFETENSORS_FORMAT = "dit-checkpoint-1"  # metadata["format"]


def export_safetensors(ckpt_path, out_path):
    """Write the weights of any checkpoint load() reads, with their settings, to out_path."""
    from safetensors.torch import save_file

    if not os.fspath(out_path).endswith(".safetensors"):
        raise UserError(f"{out_path!r} must end in .safetensors (that is how checkpoints are recognised when read)")
    loaded, model_args = _load_for_export(ckpt_path)
    metadata = {"format": SAFETENSORS_FORMAT, "model_args": _json(model_args),
                "diffusion_args": _json(loaded.diffusion_args), "settings": _json(loaded.settings)}
    tensors = {name: value.detach().contiguous() for name, value in loaded.state_dict.items()}
    with files.atomic_path(out_path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return out_path


def _load_for_export(ckpt_path):
    """(Loaded, complete model_args) of a checkpoint to export; refused when its config is unknown."""
    loaded = load(ckpt_path)
    model_args = loaded.model_args or model_args_from_state_dict(loaded.state_dict)
    if model_args is None:
        raise UserError(f"{loaded.source!r} does not record its DiT configuration and its shapes match no named "
                        f"config, so it cannot be exported; pass a train.py checkpoint, which records it")
    return loaded, complete_model_args(model_args)


def load_safetensors(path):
    """Loaded from a .safetensors file: its metadata when export_safetensors wrote it, else the
    config its tensor shapes show (a bare DiT state_dict saved as safetensors)."""
    tensors, metadata = _read_safetensors(path)
    if metadata.get("format") == SAFETENSORS_FORMAT:
        return Loaded(tensors, _unjson(metadata, "model_args", path), _unjson(metadata, "diffusion_args", path),
                      _unjson(metadata, "settings", path), path)
    model_args = model_args_from_state_dict(tensors)
    if model_args is None:
        hint = (" (it holds diffusers names: pass its folder instead)"
                if any(k.startswith("transformer_blocks.") for k in tensors) else "")
        raise UserError(f"{path!r} has no DiT metadata and its tensors are not a DiT of a named config{hint}; "
                        f"write it with `python checkpoint.py export CKPT OUT.safetensors`")
    return Loaded(tensors, model_args, dict(DEFAULT_DIFFUSION_ARGS), {}, path)


def _read_safetensors(path):
    """(tensors, metadata) of a .safetensors file, with one-line errors for missing or corrupt files."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; check the path")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, (f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path!r} is not a readable .safetensors file ({_first_line(e)}); "
                        f"re-create it with `python checkpoint.py export`") from None


def _json(value):

    return json.dumps(value, sort_keys=True)


def _unjson(metadata, key, path):

    try:
        return json.loads(metadata[key])
    except (KeyError, ValueError):
        raise UserError(f"{path!r}: its metadata lacks a valid {key!r}; re-export it with "
                        f"`python checkpoint.py export`") from None


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


# ------------------------------------------------------------------ diffusers (interop.py)
def export_diffusers(ckpt_path, out_dir, vae=None, vae_path=None):
    """Write a DiTPipeline folder (interop.write_pipeline) of any checkpoint load() reads: its EMA
    weights, with its process as the scheduler. vae / vae_path replace the VAE it was trained with."""
    interop.check_new_folder(out_dir)  # before loading: a large checkpoint takes a while to read
    loaded, model_args = _load_for_export(ckpt_path)
    if vae is None and vae_path is None:  # no flags: the VAE the checkpoint was trained with
        vae, vae_path = loaded.settings.get("vae"), loaded.settings.get("vae_path")
    return interop.write_pipeline(out_dir, loaded.state_dict, model_args, loaded.diffusion_args, vae, vae_path)


# ------------------------------------------------------------------ command line
def main(argv=None):
    """python checkpoint.py export CKPT OUT [--format safetensors|diffusers] [--vae ...] [--vae-path DIR]

    CKPT: anything `sample.py --ckpt` reads. OUT ending in .safetensors gets one file (the EMA
    weights and their settings); any other OUT a DiTPipeline folder (DiTPipeline.from_pretrained
    loads it; latent-space models only). --format makes the choice explicit."""
    args = _parser().parse_args(argv)
    out_format = args.format or ("safetensors" if args.out.endswith(".safetensors") else "diffusers")
    if out_format == "safetensors" and (args.vae or args.vae_path):
        raise UserError("--vae and --vae-path choose the VAE of a diffusers export; a .safetensors file holds the "
                        "DiT alone (sample.py takes --vae-path itself): drop them")
    if out_format == "safetensors":
        export_safetensors(args.ckpt, args.out)
    else:
        export_diffusers(args.ckpt, args.out, vae=args.vae, vae_path=args.vae_path)
    print(f"wrote {args.out} ({out_format})")


def _parser():

    parser = argparse.ArgumentParser(prog="checkpoint.py", description="Convert DiT checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a checkpoint as .safetensors or a diffusers DiTPipeline")
    export.add_argument("ckpt", help="a train.py checkpoint, state_dict, .safetensors, diffusers folder or hub id")
    export.add_argument("out", help="OUT.safetensors, or a new folder for the diffusers format")
    export.add_argument("--format", choices=("safetensors", "diffusers"), default=None,
                        help="default: safetensors when OUT ends in .safetensors, else diffusers")
    export.add_argument("--vae", choices=tuple(vae_lib.HUB_IDS), default=None,
                        help="diffusers only: the VAE to include (default: the checkpoint's, else ema)")
    export.add_argument("--vae-path", default=None, help="diffusers only: a local AutoencoderKL folder to include")
    return parser


if __name__ == "__main__":
    import cli

    cli.run(main)
