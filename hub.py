"""The Hugging Face hub ids the scripts read (the Stable Diffusion VAE, diffusers DiT pipelines
such as facebook/DiT-XL-2-256): a complete cached copy is read without asking the network, and
when none is cached and there is no network (HF_HUB_OFFLINE set, or the hub's host name does not
resolve) the error is one quick line naming the network, instead of huggingface_hub's retries,
warnings and an error about a missing config.json.

    folder_or_id = hub.cached_or_reachable("stabilityai/sd-vae-ft-ema", "the VAE", "pass --vae-path DIR")
"""
import os
import socket
import threading
from urllib.parse import urlparse

from errors import UserError

LOOKUP_SECONDS = 3.0  # the hub's name lookup: longer than this counts as no network
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # diffusers', preferred first


def cached_or_reachable(repo_id, what, fix, subfolder=None):
    """The local snapshot folder of `repo_id` when its config and weights (in `subfolder`) are cached;
    else the id itself when the hub can be reached (huggingface_hub downloads it); else one line."""
    cached = cached_snapshot(repo_id, subfolder)
    if cached is not None:
        return cached
    reason = offline_reason()
    if reason is None:
        return repo_id
    raise UserError(f"cannot fetch {what} {repo_id!r} from the Hugging Face hub ({reason}) and no copy is cached; "
                    f"connect to the internet once so it is cached, or {fix}")


def cached_snapshot(repo_id, subfolder=None):
    """The snapshot folder holding `subfolder`/config.json and its weights in the local cache, else None."""
    prefix = f"{subfolder}/" if subfolder else ""
    config = cached_file(repo_id, prefix + "config.json")
    if config is None or not any(cached_file(repo_id, prefix + name) for name in WEIGHT_FILES):
        return None
    folder = os.path.dirname(config)
    return os.path.dirname(folder) if subfolder else folder


def cached_file(repo_id, name):
    """Local path of file `name` (e.g. "vae/config.json") of hub repo `repo_id` in the cache, else None;
    it asks no network."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, name)
    return path if isinstance(path, str) else None  # None, or the "known to be missing" marker


def offline_reason():
    """Why the hub cannot be reached, or None when it may be: HF_HUB_OFFLINE, or a failed (or slower
    than LOOKUP_SECONDS) name lookup of the hub's host."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname
    resolved = []

    def lookup():
        try:
            socket.getaddrinfo(host, 443)
            resolved.append(host)
        except OSError:
            pass

    thread = threading.Thread(target=lookup, daemon=True)  # getaddrinfo itself has no timeout
    thread.start()
    thread.join(LOOKUP_SECONDS)
    return None if resolved else f"no network: the hub's host {host} does not resolve"
