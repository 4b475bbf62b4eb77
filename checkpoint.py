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
tensor shapes), `.safetensors` files and diffusers DiT folders or hub ids (see the sections
below). The command line writes the last two, from any checkpoint it reads (the EMA weights):

    python checkpoint.py export results/000-DiT-XL-2/checkpoints/0400000.pt dit.safetensors
    python checkpoint.py export results/000-DiT-XL-2/checkpoints/0400000.pt dit-pipeline/   # diffusers
    python checkpoint.py export CKPT OUT --format diffusers --vae mse   # format by OUT's extension, else --format

Note: diffusers' DiTTransformer2DModel embeds timesteps with slightly other frequencies than DiT,
so stock diffusers runs DiT weights (ours, and the hub's facebook/DiT-XL-2-*) as a slightly
different function; `use_original_timestep_frequencies(pipeline.transformer)` makes it exact.
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import shutil
import tempfile
import warnings

import torch

import files
import vae as vae_lib
from cli import UserError
from diffusion import DEFAULT_DIFFUSION_ARGS  # the release's process: what older checkpoints were trained with
from models import MODEL_SIZES, DiT, config_name, load_weights, model_args_for, sincos_pos_embed_2d

FORMAT = 2
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
    import download  # lazily: download imports this module for find_model

    source = os.fspath(name_or_path)
    if source.endswith(".safetensors"):
        return load_safetensors(source)
    if os.path.isdir(source) or _looks_like_hub_id(source):
        return load_diffusers(source)
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


def _looks_like_hub_id(source):
    """'facebook/DiT-XL-2-256': one slash, not an existing file, no file extension."""
    return source.count("/") == 1 and not os.path.exists(source) and not os.path.splitext(source)[1]


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


# ------------------------------------------------------------------ diffusers
# diffusers' DiTPipeline runs the same network under other names (DiTTransformer2DModel):
#   - the timestep and class embedders are copied into every block (norm1.emb); the final
#     layer reads block 0's, so export copies ours into all, import takes block 0's and checks
#     the others equal it;
#   - attn.qkv is three Linears (to_q, to_k, to_v), rows in that order;
#   - the adaLN-Zero chunks (shift, scale, gate for attention, then for the MLP) and the final
#     layer's (shift, scale) come in DiT's order: those Linears copy unchanged;
#   - pos_embed is recomputed by diffusers (the same sin-cos table: equal in diffusers 0.42);
#   - the timestep features differ: diffusers uses frequencies 10000**(-i/127)
#     (Timesteps(downscale_freq_shift=1)) where DiT, which the weights were trained with, uses
#     10000**(-i/128). No config option changes it; use_original_timestep_frequencies() sets it
#     on a loaded transformer, so diffusers then computes exactly DiT's function.
# The hub's facebook/DiT-XL-2-256 and -512 hold the released weights under diffusers' names.
GLOBAL_LAYERS = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
                 "final_layer.linear": "proj_out_2"}
BLOCK_LAYERS = {"adaLN_modulation.1": "norm1.linear", "attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj",
                "mlp.fc2": "ff.net.2"}
EMBEDDER_LAYERS = {"t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
                   "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
                   "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table"}
QKV_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v")
DIFFUSERS_DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the second: older hub configs


def layer_pairs(depth):
    """(our layer, diffusers layer) for every layer whose weight and bias copy unchanged."""
    pairs = list(GLOBAL_LAYERS.items())
    for i in range(depth):
        pairs += [(f"blocks.{i}.{ours}", f"transformer_blocks.{i}.{theirs}") for ours, theirs in BLOCK_LAYERS.items()]
    return pairs


def _copy_layer(source, source_layer, target, target_layer):
    for param in ("weight", "bias"):
        if f"{source_layer}.{param}" in source:
            target[f"{target_layer}.{param}"] = source[f"{source_layer}.{param}"]


def to_diffusers_state_dict(state_dict, model_args):
    """Our DiT weights under DiTTransformer2DModel's names."""
    check_standard_positions(state_dict, model_args)
    out = {}
    for ours, theirs in layer_pairs(model_args["depth"]):
        _copy_layer(state_dict, ours, out, theirs)
    for i in range(model_args["depth"]):
        for ours, theirs in EMBEDDER_LAYERS.items():
            _copy_layer(state_dict, ours, out, f"transformer_blocks.{i}.{theirs}")
        for param in ("weight", "bias"):
            q, k, v = state_dict[f"blocks.{i}.attn.qkv.{param}"].chunk(3, dim=0)
            for layer, value in zip(QKV_LAYERS, (q, k, v)):
                out[f"transformer_blocks.{i}.{layer}.{param}"] = value
    return out


def from_diffusers_state_dict(theirs, model_args, source):
    """DiTTransformer2DModel weights under our DiT's names (pos_embed recomputed, as diffusers does)."""

    depth = model_args["depth"]
    check_shared_embedders(theirs, depth, source)
    out = {}
    for ours, their_layer in layer_pairs(depth):
        _copy_layer(theirs, their_layer, out, ours)
    for ours, their_layer in EMBEDDER_LAYERS.items():
        _copy_layer(theirs, f"transformer_blocks.0.{their_layer}", out, ours)
    for i in range(depth):
        for param in ("weight", "bias"):
            parts = [theirs[f"transformer_blocks.{i}.{layer}.{param}"] for layer in QKV_LAYERS]
            out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat(parts, dim=0)
    grid = model_args["input_size"] // model_args["patch_size"]
    out["pos_embed"] = sincos_pos_embed_2d(model_args["hidden_size"], grid).unsqueeze(0)
    return out


def check_standard_positions(state_dict, model_args):
    """diffusers cannot store positions: refuse weights whose pos_embed is not the fixed table."""

    grid = model_args["input_size"] // model_args["patch_size"]
    expected = sincos_pos_embed_2d(model_args["hidden_size"], grid).unsqueeze(0)
    if not torch.allclose(state_dict["pos_embed"].float(), expected, rtol=0, atol=1e-5):
        raise UserError("this DiT's pos_embed is not the fixed sine-cosine table that diffusers recomputes, so a "
                        "diffusers copy would compute something else; export it as .safetensors instead")


def check_shared_embedders(theirs, depth, source):
    """DiT has one timestep/class embedder; diffusers has one per block (equal when converted from DiT)."""
    for i in range(1, depth):
        for layer in EMBEDDER_LAYERS.values():
            for param in ("weight", "bias"):
                name = f"{layer}.{param}"
                first, other = theirs.get(f"transformer_blocks.0.{name}"), theirs.get(f"transformer_blocks.{i}.{name}")
                if first is not None and (other is None or not torch.equal(first, other)):
                    raise UserError(f"{source!r}: block {i} has its own {layer} weights (trained in diffusers?); "
                                    f"DiT shares one embedder across blocks, so it cannot be converted")


def diffusers_config(model_args):
    """DiTTransformer2DModel's constructor arguments for our (complete) model_args, refusing what it lacks."""
    if model_args.get("block", "adaLN-Zero") != "adaLN-Zero":
        raise UserError(f"DiTTransformer2DModel has adaLN-Zero blocks only; this DiT's are {model_args['block']}: "
                        f"export it as .safetensors instead")
    modern = [f"--{flag} {model_args[name]}" for flag, name, release in
              (("pos", "pos", "sincos"), ("qk-norm", "qk_norm", False), ("mlp", "mlp", "gelu"), ("norm", "norm", "layernorm"))
              if model_args.get(name, release) != release]
    if modern:
        raise UserError(f"DiTTransformer2DModel has the release's sincos positions, GELU MLP and LayerNorms only; this "
                        f"DiT has {', '.join(modern)}: export it as .safetensors instead")
    if not isinstance(model_args["input_size"], int):
        raise UserError(f"DiTTransformer2DModel takes square inputs only; this DiT's is "
                        f"{model_args['input_size'][0]}x{model_args['input_size'][1]}: export it as .safetensors instead")
    if model_args["mlp_ratio"] != 4.0:
        raise UserError(f"DiTTransformer2DModel has MLPs of 4x the width; this DiT has mlp_ratio "
                        f"{model_args['mlp_ratio']}: export it as .safetensors instead")
    if model_args["class_dropout_prob"] <= 0:
        raise UserError("this DiT was built without the null-class row (class_dropout_prob 0) that "
                        "DiTTransformer2DModel always has; export it as .safetensors instead")
    heads = model_args["num_heads"]
    in_channels = model_args["in_channels"]
    return dict(num_attention_heads=heads, attention_head_dim=model_args["hidden_size"] // heads,
                in_channels=in_channels, out_channels=2 * in_channels if model_args["learn_sigma"] else in_channels,
                num_layers=model_args["depth"], sample_size=model_args["input_size"],
                patch_size=model_args["patch_size"], num_embeds_ada_norm=model_args["num_classes"],
                norm_type="ada_norm_zero", activation_fn="gelu-approximate", attention_bias=True,
                norm_elementwise_affine=False, norm_eps=1e-6)  # DiT's LayerNorms all use 1e-6


def model_args_from_diffusers(config, source):
    """Our model_args for a DiTTransformer2DModel config (all keys present, as model.config has them)."""
    unsupported = {"activation_fn": "gelu-approximate", "attention_bias": True, "norm_elementwise_affine": False}
    for key, value in unsupported.items():
        if config.get(key, value) != value:
            raise UserError(f"{source!r} has {key}={config[key]!r}, which DiT does not have ({value!r}); "
                            f"it cannot be converted")
    in_channels = config["in_channels"]
    out_channels = config.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise UserError(f"{source!r} outputs {out_channels} channels for {in_channels} in; a DiT outputs "
                        f"{in_channels} or {2 * in_channels} (with learned sigma)")
    heads = config["num_attention_heads"]
    return complete_model_args(dict(
        input_size=config["sample_size"], patch_size=config["patch_size"], in_channels=in_channels,
        hidden_size=heads * config["attention_head_dim"], depth=config["num_layers"], num_heads=heads, mlp_ratio=4.0,
        class_dropout_prob=0.1, num_classes=config["num_embeds_ada_norm"], learn_sigma=out_channels == 2 * in_channels))


def use_original_timestep_frequencies(transformer):
    """Make a diffusers DiTTransformer2DModel compute the original DiT exactly (see the notes
    above): its timestep features then use DiT's frequencies. Changes the modules, not the
    config, so nothing of it is saved."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return transformer


def to_diffusers_transformer(state_dict, model_args):
    """A DiTTransformer2DModel holding our weights (float32, eval mode)."""
    from diffusers import DiTTransformer2DModel

    model_args = complete_model_args(model_args)
    transformer = DiTTransformer2DModel(**diffusers_config(model_args))
    transformer.load_state_dict(to_diffusers_state_dict(state_dict, model_args), strict=True)
    return transformer.eval()


def scheduler_for(diffusion_args):
    """A DDIMScheduler (DiTPipeline's kind) over the same training betas as diffusion_args."""
    from diffusers import DDIMScheduler

    args = {**DEFAULT_DIFFUSION_ARGS, **diffusion_args}
    steps = args["diffusion_steps"]
    if args["noise_schedule"] == "linear":  # ours scales the range so that any step count spans the same
        betas = dict(beta_schedule="linear", beta_start=0.0001 * 1000 / steps, beta_end=0.02 * 1000 / steps)
    elif args["noise_schedule"] == "squaredcos_cap_v2":  # the same cosine in both, capped at 0.999
        betas = dict(beta_schedule="squaredcos_cap_v2")
    else:
        raise UserError(f"noise schedule {args['noise_schedule']!r} has no diffusers scheduler; "
                        f"export it as .safetensors instead")
    return DDIMScheduler(num_train_timesteps=steps, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                         prediction_type="sample" if args.get("predict_xstart") else "epsilon", **betas)


def diffusion_args_from_scheduler(config, learn_sigma, source):
    """Our diffusion_args for a diffusers scheduler config (None: the paper's)."""

    args = {**DEFAULT_DIFFUSION_ARGS, "learn_sigma": learn_sigma}
    if config is None:
        return args
    steps = config.get("num_train_timesteps", 1000)
    schedule = config.get("beta_schedule", "linear")
    linear = (schedule == "linear" and math.isclose(config.get("beta_start", 0.0001), 0.1 / steps)
              and math.isclose(config.get("beta_end", 0.02), 20 / steps))
    if config.get("trained_betas") is None and (linear or schedule == "squaredcos_cap_v2"):
        args.update(noise_schedule=schedule, diffusion_steps=steps)
    else:
        warnings.warn(f"{source!r}: its scheduler's betas are not a DiT schedule; sampling with DiT's linear "
                      f"1000-step schedule", stacklevel=3)
    if config.get("prediction_type", "epsilon") == "sample":
        args["predict_xstart"] = True
    return args


def export_diffusers(ckpt_path, out_dir, vae=None, vae_path=None):
    """Write a DiTPipeline folder (transformer, DDIM scheduler, VAE) for any checkpoint load()
    reads. vae / vae_path replace the checkpoint's VAE; it is loaded through vae.load_vae."""
    from diffusers import DiTPipeline

    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UserError(f"{out_dir!r} already exists and is not empty; choose a new folder or remove it")
    if out_dir.endswith(".safetensors"):
        raise UserError(f"{out_dir!r}: a diffusers export is a folder; name it without .safetensors")
    loaded, model_args = _load_for_export(ckpt_path)
    if vae is None and vae_path is None:  # no flags: the VAE the checkpoint was trained with
        vae, vae_path = loaded.settings.get("vae"), loaded.settings.get("vae_path")
    if vae == "none" or model_args["in_channels"] != 4:
        raise UserError("DiTPipeline decodes with a Stable Diffusion VAE, and this DiT works in pixel space; "
                        "export it as .safetensors instead")
    pipeline = DiTPipeline(transformer=to_diffusers_transformer(loaded.state_dict, model_args),
                           vae=vae_lib.load_vae(vae or "ema", vae_path), scheduler=scheduler_for(loaded.diffusion_args))
    _warn_if_guidance_breaks(model_args)
    _write_folder_atomically(out_dir, pipeline.save_pretrained)
    return out_dir


def _write_folder_atomically(out_dir, write):
    """write(folder) into a temporary folder beside out_dir, renamed to out_dir once complete."""

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=files.TEMP_PREFIX, dir=parent)
    try:
        write(tmp)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked by the caller); rename cannot replace a folder everywhere
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _warn_if_guidance_breaks(model_args):

    if model_args["num_classes"] != 1000:
        warnings.warn(f"DiTPipeline takes label 1000 as the null class; this DiT has {model_args['num_classes']} "
                      f"classes, so use the pipeline with guidance_scale=1 only", stacklevel=3)


def load_diffusers(folder_or_hub_id):
    """Loaded from a diffusers DiT: a DiTPipeline folder, a bare DiTTransformer2DModel folder,
    or a hub id such as facebook/DiT-XL-2-256 (from the Hugging Face cache when offline).
    Settings: image size sample_size * 8, the pipeline's vae/ folder when it is at hand."""
    source = os.fspath(folder_or_hub_id)
    location, subfolder = _transformer_location(source)
    transformer = _load_transformer(location, subfolder, source)
    model_args = model_args_from_diffusers(dict(transformer.config), source)
    state_dict = from_diffusers_state_dict(transformer.state_dict(), model_args, source)
    scheduler_config = _pipeline_json(source, subfolder, "scheduler/scheduler_config.json")
    diffusion_args = diffusion_args_from_scheduler(scheduler_config, model_args["learn_sigma"], source)
    vae_path = _pipeline_vae_folder(source, subfolder)
    settings = {"model": config_name(model_args), "image_size": model_args["input_size"] * vae_lib.DOWNSAMPLE,
                "vae": "ema", "vae_path": vae_path}
    return Loaded(state_dict, model_args, diffusion_args, settings, source)


def _transformer_location(source):
    """(folder or hub id, subfolder) of the transformer: a pipeline's transformer/, else the folder."""
    if not os.path.isdir(source):
        return source, "transformer"  # a hub id
    if os.path.isfile(os.path.join(source, "transformer", "config.json")):
        return source, "transformer"
    if os.path.isfile(os.path.join(source, "config.json")):
        return source, None
    raise UserError(f"{source!r} is a folder but not a diffusers DiT (no transformer/config.json or config.json); "
                    f"pass a DiTPipeline folder, a DiTTransformer2DModel folder or a checkpoint file")


def _load_transformer(location, subfolder, source):
    """DiTTransformer2DModel.from_pretrained, after checking that the config is a DiT's."""
    from diffusers import DiTTransformer2DModel

    try:
        config = DiTTransformer2DModel.load_config(location, subfolder=subfolder)
    except Exception as e:  # offline, not on the hub, bad JSON: huggingface_hub and diffusers raise many kinds
        raise UserError(f"could not read the diffusers DiT {source!r} ({_first_line(e)}); for a hub id connect to "
                        f"the internet once so it is cached, or pass a local folder") from None
    if config.get("_class_name") not in DIFFUSERS_DIT_CLASSES or config.get("norm_type") != "ada_norm_zero":
        raise UserError(f"{source!r} holds a {config.get('_class_name')} (norm_type {config.get('norm_type')}), not "
                        f"a DiT transformer; pass a DiTPipeline or DiTTransformer2DModel folder or hub id")
    try:
        return DiTTransformer2DModel.from_pretrained(location, subfolder=subfolder).eval()
    except Exception as e:
        raise UserError(f"could not load the weights of the diffusers DiT {source!r} ({_first_line(e)}); "
                        f"re-download or re-export it") from None


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _pipeline_json(source, subfolder, name):
    """A JSON file of the pipeline around the transformer (e.g. the scheduler's config) when at hand."""

    if subfolder is None:  # a bare transformer folder: no pipeline around it
        return None
    path = _pipeline_file(source, name)
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)


def _pipeline_file(source, name):
    """Local path of a pipeline file: in the folder, or in the Hugging Face cache for a hub id."""
    if os.path.isdir(source):
        path = os.path.join(source, *name.split("/"))
        return path if os.path.isfile(path) else None
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(source, name)
    return path if isinstance(path, str) else None  # None or "known missing" marker


def _pipeline_vae_folder(source, subfolder):
    """The pipeline's vae/ folder when its config and weights are at hand (cached for a hub id)."""
    if subfolder is None or _pipeline_file(source, "vae/config.json") is None:
        return None
    weights = [_pipeline_file(source, f"vae/diffusion_pytorch_model.{ext}") for ext in ("safetensors", "bin")]
    found = next((path for path in weights if path), None)
    return os.path.dirname(found) if found else None


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
