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
import json
import os


def _parser():
    parser = argparse.ArgumentParser(prog="checkpoint.py", description="Convert DiT checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a checkpoint as .safetensors or a diffusers DiTPipeline")
    export.add_argument("ckpt", help="a train.py checkpoint, state_dict, .safetensors, diffusers folder or hub id")
    export.add_argument("out", help="OUT.safetensors, or a new folder for the diffusers format")
    export.add_argument("--format", choices=("safetensors", "diffusers"), default=None,
                        help="default: safetensors when OUT ends in .safetensors, else diffusers")
    export.add_argument("--vae", default=None,
                        help="diffusers only: the VAE to include, as sample.py's --vae takes it (default: the "
                             "checkpoint's, else ema)")
    export.add_argument("--vae-path", default=None, help="diffusers only: a local AutoencoderKL folder to include")
    return parser


if __name__ == "__main__":  # --help and flag mistakes answered before the imports below (torch: seconds)
    _parser().parse_args()

# noqa: E402 below: these come after the early parse above
import cli  # noqa: E402
import download  # noqa: E402
import files  # noqa: E402
import interop  # noqa: E402
import vae as vae_lib  # noqa: E402
# the release's process: what older checkpoints were trained with
from diffusion import DEFAULT_DIFFUSION_ARGS  # noqa: E402
from errors import UserError, first_line  # noqa: E402
from models import (BLOCKS, MODEL_SIZES, DiT, DiTConfig, complete_model_args, config_name,  # noqa: E402
                    differences, flag_name, input_hw, model_args_for, variant_fields)

FORMAT = 2
TRAIN_KEYS = {"model", "ema", "opt", "train_steps"}


@dataclasses.dataclass
class Loaded:
    """What sampling needs from any checkpoint."""
    state_dict: dict  # the weights to sample with (a train.py checkpoint's EMA)
    model_args: dict  # DiT(**model_args); None when nothing recorded them
    diffusion_args: dict
    settings: dict  # model (name), image_size, vae, vae_path, aspect_buckets, as far as known
    source: str  # the path, name or hub id read


# ------------------------------------------------------------------ train.py checkpoints
def train_state(model, ema, opt, scaler, args, diffusion_args, progress, whole=None):
    """The dict train.py saves; `progress` holds train_steps, epoch, batches_in_epoch, world_size.
    `whole`: the model, ema and opt state dicts where they were gathered from shards (train.py --fsdp)."""
    if whole is None:
        whole = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict()}
    return {"format": FORMAT, "model": whole["model"], "ema": whole["ema"], "opt": whole["opt"],
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
    """A train.py checkpoint as a dict with model_args and diffusion_args filled in. Its tensors are
    memory-mapped, not read: every rank of a resume loads it, and a DiT-XL/2 checkpoint with its
    optimiser state is about 10.8 GB (a node of 8 ranks would hold it 8 times); the pages come from
    the shared page cache as the weights are copied into the model (the mapping is private: the
    file is never written)."""
    ckpt = files.load_torch(path, "--resume checkpoint", mmap=True)
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
    diffusers DiT folder / hub id; weights holding NaN or inf are refused (check_finite)."""
    loaded = _load_any(name_or_path)
    check_finite(loaded.state_dict, loaded.source)
    return loaded


def check_finite(state_dict, source):
    """One line naming the first tensor that holds NaN or inf: such weights sample blank images."""
    for name, tensor in state_dict.items():
        if hasattr(tensor, "is_floating_point") and tensor.is_floating_point() and not tensor.isfinite().all():
            raise UserError(f"checkpoint {source!r} holds NaN or infinite weights (first in {name}), which would "
                            f"sample blank images; use an earlier checkpoint of the run")


def _load_any(name_or_path):
    source = os.fspath(name_or_path)
    if source.endswith(".safetensors"):
        return load_safetensors(source)
    if interop.is_diffusers_source(source):
        state_dict, model_args, diffusion_args, settings = interop.load_diffusers(source)
        return Loaded(state_dict, complete_model_args(model_args), diffusion_args, settings, source)
    if source in download.RELEASED_MODELS and not os.path.isfile(source):
        source = download.download_model(source)
    ckpt = files.load_torch(source, "checkpoint", mmap=True)  # mapped, as load_train: model+EMA+AdamW is ~10.8 GB
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {source!r} holds a {type(ckpt).__name__}, not a state_dict or a train.py "
                        f"checkpoint")
    if "ema" in ckpt or "model_args" in ckpt or isinstance(ckpt.get("args"), dict):
        ckpt = _upgrade(ckpt, source)
        args = ckpt.get("args") or {}
        settings = {k: args.get(k) for k in ("model", "image_size", "vae", "vae_path", "aspect_buckets")}
        weights = ckpt["ema"] if "ema" in ckpt else ckpt["model"]  # sample from the EMA, as the paper does
        return Loaded(weights, ckpt["model_args"], ckpt["diffusion_args"], settings, source)
    return Loaded(ckpt, None, dict(DEFAULT_DIFFUSION_ARGS), {}, source)


def model_args_from_state_dict(state_dict):
    """Complete DiT arguments for a bare state_dict, None when its tensors leave some unknown (not a
    DiT's; a width and depth of no named config, whose head count leaves no trace; no square
    position table to tell the input size)."""
    found = config_of_state_dict(state_dict)
    if found is None or "num_heads" not in found or "input_size" not in found:
        return None
    return complete_model_args(found)


def config_of_state_dict(state_dict):
    """The DiTConfig fields a state_dict's names and shapes show (None when it is not a DiT's): the
    one recogniser of bare weights. The block is the BLOCKS entry whose found_in() matches; the head
    count comes from the named config of that depth and width; input_size from a square pos_embed."""
    try:
        hidden, in_channels, patch = state_dict["x_embedder.proj.weight"].shape[:3]
        depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
        classes = state_dict["y_embedder.embedding_table.weight"].shape[0] - 1
        out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    except (KeyError, ValueError, AttributeError, IndexError, TypeError):
        return None
    found = dict(patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth, num_classes=classes,
                 learn_sigma=out_channels == 2 * in_channels,
                 qk_norm=any(".q_norm." in k for k in state_dict), **_block_parts(state_dict, hidden))
    heads = next((h for d, w, h in MODEL_SIZES.values() if (d, w) == (depth, hidden)), None)
    if heads is not None:
        found["num_heads"] = heads
    if "pos_embed" in state_dict:
        found["pos"] = "sincos"
        grid = int(round(state_dict["pos_embed"].shape[1] ** 0.5))
        if grid * grid == state_dict["pos_embed"].shape[1]:
            found["input_size"] = grid * patch
    return found


def _block_parts(state_dict, hidden):
    """block, mlp (and the GELU MLP's ratio), mm-dit's context_tokens, as far as the tensors show them."""
    found = {}
    block = next((name for name, kind in BLOCKS.items() if kind.found_in(state_dict, hidden)), None)
    if block is not None:
        found["block"] = block
    fc1 = next((k for k in state_dict if k.endswith(".mlp.fc1.weight")), None)
    if any(".mlp.fc1_g." in k for k in state_dict):
        found["mlp"] = "swiglu"
    elif fc1 is not None:
        found.update(mlp="gelu", mlp_ratio=state_dict[fc1].shape[0] / hidden)
    if "class_tokens.embedding_table.weight" in state_dict:
        found["context_tokens"] = state_dict["class_tokens.embedding_table.weight"].shape[1] // hidden
    return found


def describe_state_dict(state_dict):
    """A short description of the DiT a state_dict belongs to, for error messages: its config name,
    input and classes, and the fields its tensors show that differ from the release."""
    found = config_of_state_dict(state_dict)
    if found is None:
        return "not a DiT state_dict"
    depth, hidden, patch = found["depth"], found["hidden_size"], found["patch_size"]
    name = config_name(found) if "num_heads" in found else f"DiT-depth{depth}-hidden{hidden}/{patch}"
    size = "x".join(map(str, input_hw(found["input_size"]))) if "input_size" in found else "any size"
    release = DiTConfig()
    rest = [f"{k} {v}" for k, v in found.items() if k in {f.name for f in variant_fields()} and v != getattr(release, k)]
    if "pos" not in found:
        rest.append("no pos_embed (pos rope or none)")
    return ", ".join([f"{name}, input {size}x{found['in_channels']}, {found['num_classes']} classes", *rest])


def refuse_contradictions(recorded, given, remedy):
    """One line for the first flag given whose value contradicts a checkpoint's record (its model_args
    or diffusion_args): another value would run or train its weights as another network or process.
    given: field name -> the flag's value; "model" (a config name such as DiT-S/2) is compared with
    the config the record describes."""
    for name, value in given.items():
        theirs = config_name(recorded) if name == "model" else recorded.get(name, value)
        if theirs != value:
            flag = flag_name(name)
            raise UserError(f"{flag} {value} does not match the checkpoint, which was trained with {flag} {theirs}; "
                            f"drop {flag} ({remedy})")


def load_weights(model, state_dict, what="checkpoint"):
    """load_state_dict(strict=True) with a one-line error naming both models and how they differ."""
    own = model.state_dict()
    if set(own) != set(state_dict) or any(own[k].shape != state_dict[k].shape for k in own):
        found = config_of_state_dict(state_dict) or {}
        differing = differences(found, model.model_args)
        flags = " / ".join(["--model", "--image-size", "--num-classes"] + [flag_name(f.name) for f in variant_fields()])
        raise UserError(f"{what} holds {describe_state_dict(state_dict)}, but the model built is "
                        f"{model.config.describe()}" + (f" (differing: {differing})" if differing else "")
                        + f"; pass the matching {flags}")
    model.load_state_dict(state_dict, strict=True)
    return model


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

    files.check_input_file(path, "checkpoint")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, (f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path!r} is not a readable .safetensors file ({first_line(e)}); "
                        f"re-create it with `python checkpoint.py export`") from None


def _json(value):

    return json.dumps(value, sort_keys=True)


def _unjson(metadata, key, path):

    try:
        return json.loads(metadata[key])
    except (KeyError, ValueError):
        raise UserError(f"{path!r}: its metadata lacks a valid {key!r}; re-export it with "
                        f"`python checkpoint.py export`") from None


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
    if args.vae is not None:
        vae_lib.vae_source(args.vae)  # one line for an unknown name, before the checkpoint is read
    if out_format == "safetensors":
        export_safetensors(args.ckpt, args.out)
    else:
        export_diffusers(args.ckpt, args.out, vae=args.vae, vae_path=args.vae_path)
    print(f"wrote {args.out} ({out_format})")


if __name__ == "__main__":
    cli.run(main)
