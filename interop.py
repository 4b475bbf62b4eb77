"""diffusers interop: DiT checkpoints as diffusers' DiTPipeline / DiTTransformer2DModel, and back.

checkpoint.py reads every checkpoint format and hands diffusers folders and hub ids to
load_diffusers here; `python checkpoint.py export CKPT DIR` writes a pipeline through
write_pipeline. This module converts plain values (a state_dict, DiT's model_args, the
diffusion_args of create_process): our checkpoint files are checkpoint.py's.

    pipe = DiTPipeline.from_pretrained("dit-pipeline")           # written by checkpoint.py export
    use_original_timestep_frequencies(pipe.transformer)          # exactly DiT's function (see below)
    images = pipe(class_labels=[207, 360], guidance_scale=4.0).images

What a DiTPipeline can hold: latent-space DiTs of the release's architecture (adaLN-Zero blocks,
sin-cos positions, GELU MLPs of 4x width, LayerNorms, square inputs) trained with the eps or v
objective on a linear or cosine schedule; the scheduler's prediction_type records the objective
("epsilon", "v_prediction"), so loading the folder back gives the original process. Flow models
and the rest are refused in one line (export them as .safetensors). DiTPipeline takes label 1000
as the null class, so a DiT with another class count is sampled with guidance_scale=1.

Note: diffusers' DiTTransformer2DModel embeds timesteps with slightly other frequencies than DiT,
so stock diffusers runs DiT weights (ours, and the hub's facebook/DiT-XL-2-*) as a slightly
different function; `use_original_timestep_frequencies(pipeline.transformer)` makes it exact.
"""
import json
import math
import os
import shutil
import sys
import tempfile
import warnings

import torch

import files
import hub
import vae as vae_lib
from errors import UserError, first_line
from diffusion import DEFAULT_DIFFUSION_ARGS, objective_of
from models import config_name, sincos_pos_embed_2d

# ------------------------------------------------------------------ layer names
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
DIFFUSERS_NULL_LABEL = 1000  # DiTPipeline's class label for unconditional: fixed, ImageNet's class count


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


# ------------------------------------------------------------------ configs and the transformer
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
    """Our model_args for a DiTTransformer2DModel config (all keys present, as model.config has
    them): the arguments it determines; models.complete_model_args adds DiT's other defaults."""
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
    return dict(
        input_size=config["sample_size"], patch_size=config["patch_size"], in_channels=in_channels,
        hidden_size=heads * config["attention_head_dim"], depth=config["num_layers"], num_heads=heads, mlp_ratio=4.0,
        class_dropout_prob=0.1, num_classes=config["num_embeds_ada_norm"], learn_sigma=out_channels == 2 * in_channels)


def use_original_timestep_frequencies(transformer):
    """Make a diffusers DiTTransformer2DModel compute the original DiT exactly (see the notes
    above): its timestep features then use DiT's frequencies. Changes the modules, not the
    config, so nothing of it is saved."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return transformer


def to_diffusers_transformer(state_dict, model_args):
    """A DiTTransformer2DModel holding our weights (float32, eval mode). model_args: complete, as
    checkpoint.load gives them."""
    from diffusers import DiTTransformer2DModel

    transformer = DiTTransformer2DModel(**diffusers_config(model_args))
    transformer.load_state_dict(to_diffusers_state_dict(state_dict, model_args), strict=True)
    return transformer.eval()


# ------------------------------------------------------------------ schedulers
# DDIMScheduler's prediction_type for each objective a DiTPipeline can sample (flow is no Gaussian
# diffusion; "sample" stands for create_diffusion's predict_xstart).
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}


def scheduler_for(diffusion_args):
    """A DDIMScheduler (DiTPipeline's kind) for the process diffusion_args name: the same training
    betas, and the objective as its prediction_type. Flow models are refused in one line."""
    from diffusers import DDIMScheduler

    objective = objective_of(diffusion_args)
    if objective not in PREDICTION_TYPES:
        raise UserError(f"DiTPipeline samples Gaussian diffusion ({' or '.join(PREDICTION_TYPES)} objective) only, and "
                        f"this DiT was trained with the {objective} objective: export it as .safetensors instead "
                        f"(sample.py reads it)")
    args = {**DEFAULT_DIFFUSION_ARGS, **diffusion_args}  # what a key missing from a record means
    steps = args["diffusion_steps"]
    if args["noise_schedule"] == "linear":  # ours scales the range so that any step count spans the same
        betas = dict(beta_schedule="linear", beta_start=0.0001 * 1000 / steps, beta_end=0.02 * 1000 / steps)
    elif args["noise_schedule"] == "squaredcos_cap_v2":  # the same cosine in both, capped at 0.999
        betas = dict(beta_schedule="squaredcos_cap_v2")
    else:
        raise UserError(f"noise schedule {args['noise_schedule']!r} has no diffusers scheduler; "
                        f"export it as .safetensors instead")
    prediction = "sample" if args.get("predict_xstart") else PREDICTION_TYPES[objective]  # absent: off
    return DDIMScheduler(num_train_timesteps=steps, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                         prediction_type=prediction, **betas)


def diffusion_args_from_scheduler(config, learn_sigma, source):
    """Our diffusion_args for a diffusers scheduler config (None: the paper's process)."""
    args = {**DEFAULT_DIFFUSION_ARGS, "learn_sigma": learn_sigma}  # the release's schedule unless it says otherwise
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
    return {**args, **_objective_args(config.get("prediction_type", "epsilon"), source)}


def _objective_args(prediction, source):
    """The diffusion_args keys a scheduler's prediction_type sets (eps, the release's, sets none)."""
    objectives = {name: objective for objective, name in PREDICTION_TYPES.items()}
    if prediction == "sample":
        return {"predict_xstart": True}
    if prediction not in objectives:
        raise UserError(f"{source!r}: its scheduler predicts {prediction!r}, which no DiT objective does "
                        f"({', '.join(objectives)} or sample); it cannot be converted")
    return {} if objectives[prediction] == "eps" else {"objective": objectives[prediction]}


# ------------------------------------------------------------------ writing a pipeline
def check_new_folder(out_dir):
    """Refuse an export folder that exists with files in it, or is named like a file."""
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UserError(f"{out_dir!r} already exists and is not empty; choose a new folder or remove it")
    if out_dir.endswith(".safetensors"):
        raise UserError(f"{out_dir!r}: a diffusers export is a folder; name it without .safetensors")


def write_pipeline(out_dir, state_dict, model_args, diffusion_args, vae="ema", vae_path=None):
    """Write a DiTPipeline folder (transformer, DDIM scheduler, VAE) of these weights, atomically.
    model_args complete; vae / vae_path: the VAE to include, loaded through vae.load_vae."""
    from diffusers import DiTPipeline

    out_dir = os.fspath(out_dir)
    check_new_folder(out_dir)
    if vae == "none" or model_args["in_channels"] != 4:
        raise UserError("DiTPipeline decodes with a Stable Diffusion VAE, and this DiT works in pixel space; "
                        "export it as .safetensors instead")
    scheduler = scheduler_for(diffusion_args)  # before the work below: refuses flow models
    pipeline = DiTPipeline(transformer=to_diffusers_transformer(state_dict, model_args),
                           vae=vae_lib.load_vae(vae or "ema", vae_path), scheduler=scheduler)
    _write_folder_atomically(out_dir, pipeline.save_pretrained)
    _note_if_guidance_fails(model_args, out_dir)
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


def _note_if_guidance_fails(model_args, out_dir):
    """DiTPipeline guides with the fixed null label 1000: with another class count its default
    guidance indexes past the class table, and only guidance_scale=1 (no null label) works."""
    classes = model_args["num_classes"]
    if classes != DIFFUSERS_NULL_LABEL:
        print(f"note: DiTPipeline takes label {DIFFUSERS_NULL_LABEL} as the null class but this DiT has {classes} "
              f"classes, so its default guidance fails; sample without guidance: "
              f"DiTPipeline.from_pretrained({out_dir!r})(class_labels=[0], guidance_scale=1)", file=sys.stderr)


# ------------------------------------------------------------------ reading a diffusers DiT
def is_diffusers_source(source):
    """Whether load_diffusers should read `source`: a folder, or a hub id such as
    'facebook/DiT-XL-2-256' (one slash, not an existing file, no file extension)."""
    source = os.fspath(source)
    hub_id = source.count("/") == 1 and not os.path.exists(source) and not os.path.splitext(source)[1]
    return os.path.isdir(source) or hub_id


def load_diffusers(folder_or_hub_id):
    """(state_dict, model_args, diffusion_args, settings) of a diffusers DiT: a DiTPipeline folder,
    a bare DiTTransformer2DModel folder, or a hub id such as facebook/DiT-XL-2-256 (from the Hugging
    Face cache when offline). model_args as model_args_from_diffusers gives them; settings: image
    size sample_size * 8, the pipeline's vae/ folder when it is at hand."""
    source = os.fspath(folder_or_hub_id)
    location, subfolder = _transformer_location(source)
    if not os.path.isdir(source):  # a hub id: its cached copy, or one line when there is neither it nor a network
        location = hub.cached_or_reachable(source, "the diffusers DiT", "pass a local folder or checkpoint file",
                                           subfolder)
    transformer = _load_transformer(location, subfolder, source)
    model_args = model_args_from_diffusers(dict(transformer.config), source)
    state_dict = from_diffusers_state_dict(transformer.state_dict(), model_args, source)
    scheduler_config = _pipeline_json(source, subfolder, "scheduler/scheduler_config.json")
    diffusion_args = diffusion_args_from_scheduler(scheduler_config, model_args["learn_sigma"], source)
    vae_path = _pipeline_vae_folder(source, subfolder)
    settings = {"model": config_name(model_args), "image_size": model_args["input_size"] * vae_lib.DOWNSAMPLE,
                "vae": "ema", "vae_path": vae_path}
    return state_dict, model_args, diffusion_args, settings


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
        raise UserError(f"could not read the diffusers DiT {source!r} ({first_line(e)}); for a hub id connect to "
                        f"the internet once so it is cached, or pass a local folder") from None
    if config.get("_class_name") not in DIFFUSERS_DIT_CLASSES or config.get("norm_type") != "ada_norm_zero":
        raise UserError(f"{source!r} holds a {config.get('_class_name')} (norm_type {config.get('norm_type')}), not "
                        f"a DiT transformer; pass a DiTPipeline or DiTTransformer2DModel folder or hub id")
    try:
        return DiTTransformer2DModel.from_pretrained(location, subfolder=subfolder).eval()
    except Exception as e:
        raise UserError(f"could not load the weights of the diffusers DiT {source!r} ({first_line(e)}); "
                        f"re-download or re-export it") from None


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
    return hub.cached_file(source, name)


def _pipeline_vae_folder(source, subfolder):
    """The pipeline's vae/ folder when its config and weights are at hand (cached for a hub id)."""
    if subfolder is None or _pipeline_file(source, "vae/config.json") is None:
        return None
    weights = [_pipeline_file(source, f"vae/{name}") for name in hub.WEIGHT_FILES]
    found = next((path for path in weights if path), None)
    return os.path.dirname(found) if found else None
