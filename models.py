"""DiT: the Diffusion Transformer of Peebles & Xie (2023).

A ViT over latent patches whose blocks are conditioned through adaLN-Zero on the sum of a
timestep embedding and a class-label embedding. Parameter names and shapes match the
released checkpoints (DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt), so they load with
strict=True.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def modulate(x, shift, scale):
    # Written exactly as the release computes it: fused variants (addcmul) round differently,
    # and guidance over many sampling steps amplifies that past float32 agreement.
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: (N, C, H, W) -> (N, H*W/p^2, hidden)."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (possibly fractional) timestep, then an MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class-label table with one extra "null" row (index num_classes) for label dropout."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        has_null_row = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + has_null_row, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def norm(self, x):
        return F.layer_norm(x, (self.hidden_size,), eps=1e-6)

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear to patch*patch*out_channels values per token."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.hidden_size = hidden_size
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(F.layer_norm(x, (self.hidden_size,), eps=1e-6), shift, scale)
        return self.linear(x)


class DiT(nn.Module):
    """Diffusion model with a transformer backbone."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by the patch size {patch_size}; "
                             f"pick an input size that is a multiple of {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by the number of heads {num_heads}")
        if hidden_size % 4:
            raise ValueError(f"hidden size {hidden_size} must be a multiple of 4 (2D sine-cosine positions)")
        if num_classes < 1 or depth < 1 or in_channels < 1:
            raise ValueError("num_classes, depth and in_channels must be positive")
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.gradient_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        # Fixed sine-cosine positions; a Parameter (not a buffer) so the state_dict matches the release.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        grid = self.input_size // self.patch_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid).unsqueeze(0))

        # The patch embedding is a linear map over flattened patches.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity and the model outputs exactly zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y, force_drop_ids=None):
        """x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) labels (num_classes = null).
        force_drop_ids: optional (N,) with 1 where the label is dropped, replacing the random
        label dropout (train.py draws it from its own seed so that runs are reproducible)."""
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_all_channels=False):
        """Classifier-free guidance. The batch is the conditional half followed by the same
        latents with the null label; both halves get the guided noise prediction.

        By default only the first three output channels are guided, as in the original
        release (needed to reproduce its published FID); `guide_all_channels=True` guides
        every noise channel. Learned-variance channels are never guided.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        n = self.in_channels if guide_all_channels else min(3, self.in_channels)
        eps, rest = out[:, :n], out[:, n:]
        cond_eps, uncond_eps = eps.split(len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def sincos_pos_embed_2d(dim, grid_size):
    """(grid_size**2, dim) fixed positions: first half encodes the column, second the row."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([sincos_embed_1d(dim // 2, cols.reshape(-1)),
                      sincos_embed_1d(dim // 2, rows.reshape(-1))], dim=1).float()


def sincos_embed_1d(dim, positions):
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


#################################################################################
#                                 DiT configs                                    #
#################################################################################

MODEL_SIZES = {  # name: (depth, hidden_size, num_heads)
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    "T": (4, 128, 4),  # tiny: the CPU demo on 8x8 digits and quick experiments (not in the paper)
}


def _config(size, patch):
    depth, hidden, heads = MODEL_SIZES[size]

    def make(**kwargs):
        return DiT(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads, **kwargs)

    make.__name__ = f"DiT_{size}_{patch}"
    return make


DiT_models = {f"DiT-{size}/{patch}": _config(size, patch) for size in MODEL_SIZES for patch in (2, 4, 8)}


def create_model(name, **kwargs):
    """DiT_models[name](**kwargs) with a clear error for an unknown name."""
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(DiT_models)}")
    return DiT_models[name](**kwargs)


def describe_state_dict(state_dict):
    """A short human description of the DiT a state_dict belongs to, for error messages."""
    try:
        hidden = state_dict["pos_embed"].shape[-1]
        patch = state_dict["x_embedder.proj.weight"].shape[-1]
        in_ch = state_dict["x_embedder.proj.weight"].shape[1]
        depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
        latent = int(round(state_dict["pos_embed"].shape[1] ** 0.5)) * patch
        classes = state_dict["y_embedder.embedding_table.weight"].shape[0] - 1
    except (KeyError, IndexError, AttributeError):
        return "not a DiT state_dict"
    size = next((s for s, cfg in MODEL_SIZES.items() if cfg[:2] == (depth, hidden)), f"depth {depth}, hidden {hidden}")
    return f"DiT-{size}/{patch}, input {latent}x{latent}x{in_ch}, {classes} classes"


def load_weights(model, state_dict, what="checkpoint"):
    """load_state_dict(strict=True) with a one-line error naming both models on a mismatch."""
    own = model.state_dict()
    mismatch = set(own) != set(state_dict) or any(own[k].shape != state_dict[k].shape for k in own)
    if mismatch:
        raise ValueError(f"{what} holds {describe_state_dict(state_dict)}, but the model built is "
                         f"{describe_state_dict(own)}; pass the matching --model / --image-size / --num-classes")
    model.load_state_dict(state_dict, strict=True)
    return model
