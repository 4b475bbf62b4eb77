"""Fine-tuning (train.py --init-from): a new run that starts from another checkpoint's weights, its
EMA where it has one. Its model config and process are the run's defaults (as a resume's are),
except the number of classes, whose table is rebuilt (--class-map), and the image size, whose
sine-cosine table is recomputed for the new grid. Details and figures: docs/training.md."""
import json

import checkpoint
import cli
import distributed
import vae as vae_lib
from checkpoint import load_weights
from errors import first_line
from models import DiTConfig, differences

# The model fields a fine-tuning run may change: the class table is rebuilt (remap_class_rows) and a
# sincos position table recomputed for the new grid; any other field would be another network.
FINE_TUNE_FIELDS = ("num_classes", "input_size")


CLASS_TABLES = ("y_embedder.embedding_table.weight", "class_tokens.embedding_table.weight")  # mm-dit's too


def load_init(run):
    """--init-from as a checkpoint.Loaded with its model_args (None without the flag). Each machine's
    rank 0 reads it first (a released name is downloaded once per machine), the other ranks after it."""
    source = run.args.init_from
    if not source:
        return None
    with distributed.local_rank0_first():
        init = checkpoint.load(source)
    init.model_args = init.model_args or checkpoint.model_args_from_state_dict(init.state_dict)
    if init.model_args is None:
        raise cli.UserError(f"--init-from {source!r} records no model configuration and its shapes match no named "
                            f"config; pass a train.py checkpoint or a .safetensors export")
    return init


def init_settings(args, init):
    """--init-from's record as take_model_settings and run_diffusion_args read a checkpoint's: its
    model_args (with --num-classes when given), its process, and its image size and VAE (a bare
    state_dict's image size from its position table, as a latent-space model's)."""
    model_args = dict(init.model_args)
    if args.num_classes is not None:
        class_mapping(args.class_map, model_args["num_classes"], args.num_classes)  # a bad file: refused now
        model_args["num_classes"] = args.num_classes
    saved = dict(init.settings)
    if saved.get("image_size") is None and saved.get("vae") != "none":
        height, width = cli.height_width(model_args["input_size"])
        saved["image_size"] = cli.size_value(height * vae_lib.DOWNSAMPLE, width * vae_lib.DOWNSAMPLE)
    return {"model_args": model_args, "args": saved, "diffusion_args": init.diffusion_args}


def class_mapping(path, old, new):
    """{new class: old class}: --class-map's JSON, else identity for the first min(old, new) classes."""
    if path is None:
        return {i: i for i in range(min(old, new))}
    try:
        with open(path) as f:
            mapping = {int(new_class): int(old_class) for new_class, old_class in json.load(f).items()}
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise cli.UserError(f"--class-map {path!r} is not a readable JSON object of new class -> old class, such as "
                            f"{{\"0\": 2, \"1\": 0}} ({first_line(e, 100)}); fix the file") from None
    for new_class, old_class in mapping.items():
        if not (0 <= new_class < new and 0 <= old_class < old):
            raise cli.UserError(f"--class-map {path!r} maps new class {new_class} to old class {old_class}, but the "
                                f"new classes are 0..{new - 1} and the --init-from checkpoint's 0..{old - 1}; fix it")
    return mapping


def remap_class_rows(table, old, new, mapping, has_null):
    """A class table (one row per class, then the null row when there is one) for `new` classes from
    one for `old`: new class i copies old row mapping[i]; the others start at the mean of the old
    class rows (the null row when there are none: an unconditional model); the null row is kept."""
    start = table[:old].mean(0) if old else table[old]
    rows = start.expand(new + has_null, -1).clone()
    for new_class, old_class in mapping.items():
        rows[new_class] = table[old_class]
    if has_null:
        rows[new] = table[old]
    return rows


def start_from(model, init, args):
    """Load --init-from's weights into a newly built model whose fields may differ only in
    FINE_TUNE_FIELDS (else one line naming the field)."""
    theirs, ours = init.model_args, model.model_args
    fixed = {k: v for k, v in theirs.items() if k not in FINE_TUNE_FIELDS}
    if any(ours.get(k) != v for k, v in fixed.items()):
        raise cli.UserError(f"--init-from {args.init_from} holds {DiTConfig(**theirs).describe()}, which cannot carry "
                            f"over to the {model.config.describe()} this run builds ({differences(fixed, ours)}); "
                            f"drop the flags that differ (only --num-classes and --image-size may)")
    weights = dict(init.state_dict)
    old, new, has_null = theirs["num_classes"], ours["num_classes"], model.y_embedder.dropout_prob > 0
    mapping = class_mapping(args.class_map, old, new)
    for name in CLASS_TABLES:
        if name in weights:
            weights[name] = remap_class_rows(weights[name], old, new, mapping, has_null)
    if "pos_embed" in weights and cli.height_width(theirs["input_size"]) != cli.height_width(ours["input_size"]):
        weights["pos_embed"] = model.pos_embed.detach().clone()  # built for this run's grid (fixed sincos)
    load_weights(model, weights, f"--init-from {args.init_from}")
