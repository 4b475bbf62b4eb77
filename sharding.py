"""Sharded training for train.py --fsdp: PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard).

Each DiT block is sharded on its own, then the root (the embedders and the final layer), so that
a rank holds 1/N of every parameter, gradient and AdamW moment and gathers one block's weights at
a time for its forward and backward. The EMA is sharded the same way: its shards sit beside the
model's, and the EMA update is local. Checkpoints keep train.py's format: the full state dicts
are gathered to rank 0 (on the CPU) when saved, and a resume with --fsdp loads a full checkpoint
and keeps each rank's shard. So sample.py --ckpt, a resume on any number of processes with or
without --fsdp, and every other loader read them as before. train.py's periodic samples come from
a whole copy of the EMA gathered for them (whole_state_dict).
"""
import contextlib
import functools

from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard

# Saving: the whole tensors, on rank 0's CPU (the other ranks get empty dicts). Loading: every rank
# holds the whole checkpoint (memory-mapped, checkpoint.load_train) and keeps its shard.
WHOLE_ON_RANK0_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)
WHOLE_ON_EVERY_RANK = StateDictOptions(full_state_dict=True)


def shard(model):
    """The model sharded in place: fully_shard per block, then the root. It gets a `no_sync()` as
    DDP has (train.py's gradient accumulation uses it): FSDP's own switch,
    set_requires_gradient_sync(False), so the gradients of all but the last micro-batch are kept
    whole and reduce-scattered once."""
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    model.no_sync = functools.partial(_no_gradient_sync, model)
    return model


def is_sharded(model):
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def _no_gradient_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def parameter_names(model):
    """The optimiser's parameter order: train.py builds AdamW on model.parameters()."""
    return [name for name, _ in model.named_parameters()]


def full_state_dicts(model, ema, opt):
    """{model, ema, opt} state dicts gathered whole to rank 0, in train.py's checkpoint format (the
    optimiser's state keyed by parameter index, as Optimizer.state_dict gives it); a collective:
    every rank calls it, and only rank 0 gets the dicts (the others None)."""
    weights = get_model_state_dict(model, options=WHOLE_ON_RANK0_CPU)
    ema_weights = get_model_state_dict(ema, options=WHOLE_ON_RANK0_CPU)
    opt_state = get_optimizer_state_dict(model, opt, options=WHOLE_ON_RANK0_CPU)
    if not opt_state:  # not rank 0
        return None
    index = {name: i for i, name in enumerate(parameter_names(model))}
    return {"model": weights, "ema": ema_weights, "opt": rekeyed(opt_state, index)}


def rekeyed(opt_state, key):
    """An optimiser state dict with each parameter's key mapped through `key` (names <-> indices)."""
    return {"state": {key[k]: value for k, value in opt_state["state"].items()},
            "param_groups": [{**group, "params": [key[k] for k in group["params"]]}
                             for group in opt_state["param_groups"]]}


def whole_state_dict(module, every_rank):
    """The sharded module's whole state dict on every rank (on its device), or on rank 0's CPU only
    (the other ranks get {}); a collective, every rank calls it."""
    return get_model_state_dict(module, options=WHOLE_ON_EVERY_RANK if every_rank else WHOLE_ON_RANK0_CPU)


def load_full_state_dicts(model, ema, opt, ckpt):
    """Load a train.py checkpoint's whole model, EMA and optimiser state into the sharded modules
    (each rank keeps its shard); a collective, on every rank."""
    set_model_state_dict(model, ckpt["model"], options=WHOLE_ON_EVERY_RANK)
    set_model_state_dict(ema, ckpt["ema"], options=WHOLE_ON_EVERY_RANK)
    opt_state = rekeyed(ckpt["opt"], dict(enumerate(parameter_names(model))))
    set_optimizer_state_dict(model, opt, opt_state, options=WHOLE_ON_EVERY_RANK)
    # the saved hyperparameters as saved (it hands back betas as a list), as Optimizer.load_state_dict does
    for group, saved in zip(opt.param_groups, ckpt["opt"]["param_groups"]):
        group.update({key: value for key, value in saved.items() if key != "params"})
