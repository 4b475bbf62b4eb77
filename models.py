"""DiT: the Diffusion Transformer of Peebles & Xie (2023).

A ViT over latent patches whose blocks are conditioned through adaLN-Zero on the sum of a
timestep embedding and a class-label embedding. Parameter names and shapes match the
released checkpoints (DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt), so they load with
strict=True.

`DiT(block=...)` picks how the blocks take the condition (the paper's Section 3.2 ablation,
plus Stable Diffusion 3's joint-attention block); everything else is shared:

    adaLN-Zero       the released block: LayerNorm scale/shift and residual gates regressed from
                     t + c, the regression zero-initialised so every block starts as the identity
    adaLN            scale and shift only (no gates), ordinarily initialised
    cross-attention  plain ViT blocks plus a cross-attention to the sequence (t, c) of length two
    in-context       plain ViT blocks; t and c are two extra tokens, dropped after the last block
    mm-dit           SD3's MM-DiT: a condition token stream with its own weights attends jointly
                     with the image tokens; both modulated adaLN-Zero style from t + c

Positions and the later transformers' block (SD3, Flux, Lumina, LightningDiT), each off by default
and composing with every block above:

    pos=sincos       the release's fixed 2D sine-cosine table added to the tokens; an input of another
                     size gets the table recomputed for its grid (token (i, j) keeps position (i, j))
    pos=rope         axial 2D rotary positions on the queries and keys of the self-attention (timm's
                     build_rotary_pos_embed / apply_rot_embed): half of each head's dims turn with the
                     token's row, half with its column, so attention logits depend on the offset only.
                     Condition tokens (in-context's t and y, mm-dit's stream) are not rotated (as if all
                     at (0, 0), as Flux's text tokens); cross-attention is not rotated at all
    pos=none         no position signal
    qk_norm          each head's queries and keys normalised (by `norm`'s kind, with a learned scale)
    mlp=swiglu       timm's SwiGLU with 2/3 of the hidden width: about the GELU MLP's parameters
    norm=rmsnorm     timm's RmsNorm in place of every LayerNorm (without scale in the modulated ones)

The model runs at any height and width the patch divides, whatever input_size it was built for.

`python benchmarks/flops.py` prints parameters and Gflops per config and block.
"""
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import RmsNorm, SwiGLU
from timm.layers.pos_embed_sincos import apply_rot_embed, build_rotary_pos_embed
from torch.utils.checkpoint import checkpoint

from cli import UserError


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

    def drop_labels(self, labels, train, force_drop_ids=None):
        """The labels with the dropped ones replaced by the null class (num_classes)."""
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return labels

    def forward(self, labels, train, force_drop_ids=None):
        return self.embedding_table(self.drop_labels(labels, train, force_drop_ids))


def make_norm(kind, dim, affine=True):
    """A LayerNorm or timm's RmsNorm over the last dim (eps 1e-6, as all of DiT's norms)."""
    if kind == "rmsnorm":
        return RmsNorm(dim, eps=1e-6, affine=affine)
    return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=affine)


def qk_norms(qk_norm, norm, head_dim):
    """qk-norm (as timm's Attention does it): the queries and keys of each head normalised over the head's
    dims, by the model's kind of norm with a learned scale; identities when off (no parameters, no draws)."""
    if not qk_norm:
        return nn.Identity(), nn.Identity()
    return make_norm(norm, head_dim), make_norm(norm, head_dim)


def rotate(z, rope):
    """Axial 2D RoPE on (B, heads, N, head_dim) queries or keys: rope = (sin, cos), each (T, head_dim), rotates
    the first T tokens (the image's); tokens after them (in-context's t and y) are left as they are."""
    if rope is None:
        return z
    sin, cos = rope
    if z.shape[-2] == len(sin):
        return apply_rot_embed(z, sin, cos)
    image, rest = z.split([len(sin), z.shape[-2] - len(sin)], dim=-2)
    return torch.cat([apply_rot_embed(image, sin, cos), rest], dim=-2)


def split_heads(z, num_heads):
    """(B, N, C) -> (B, heads, N, C / heads)."""
    B, N, C = z.shape
    return z.view(B, N, num_heads, C // num_heads).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention; qk_norm normalises each head's
    queries and keys, forward's rope rotates them by their position (see rotate)."""

    def __init__(self, dim, num_heads, qk_norm=False, norm="layernorm"):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.q_norm, self.k_norm = qk_norms(qk_norm, norm, dim // num_heads)

    def forward(self, x, rope=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = rotate(self.q_norm(q), rope), rotate(self.k_norm(k), rope)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Multi-head attention from the image tokens (queries) to the condition tokens (keys, values).
    No RoPE here: the condition tokens have no position, and rotating the queries alone would add
    an absolute position signal; the self-attention carries the positions."""

    def __init__(self, dim, num_heads, qk_norm=False, norm="layernorm"):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm, self.k_norm = qk_norms(qk_norm, norm, dim // num_heads)

    def forward(self, x, context):
        k, v = self.kv(context).chunk(2, dim=-1)
        q, k, v = (split_heads(z, self.num_heads) for z in (self.q(x), k, v))
        attended = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(attended.transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    """fc1, tanh-GELU, fc2. sigmoid_gelu (set by compile_model) writes the GELU as the same function
    x * sigmoid(2u) in place of 0.5 * x * (1 + tanh(u)): the compiled CPU kernel's exp is about 2.7x
    faster than its tanh, and the results agree to float32 rounding."""
    sigmoid_gelu = False

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        x = self.fc1(x)
        if self.sigmoid_gelu:  # 2u = 2 * sqrt(2 / pi) * (x + 0.044715 x^3)
            return self.fc2(x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x)))
        return self.fc2(F.gelu(x, approximate="tanh"))


def make_mlp(kind, dim, mlp_ratio):
    """The release's GELU MLP, or timm's SwiGLU with 2/3 of the hidden width: three matrices instead of two,
    so about the same parameters (and flops)."""
    hidden = int(dim * mlp_ratio)
    if kind == "swiglu":
        return SwiGLU(dim, round(2 * hidden / 3))
    return Mlp(dim, hidden)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (gated=False: adaLN, scale and shift only)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, gated=True, qk_norm=False, mlp="gelu",
                 norm="layernorm"):
        super().__init__()
        self.hidden_size = hidden_size
        self.gated = gated
        self.attn = Attention(hidden_size, num_heads, qk_norm, norm)
        self.mlp = make_mlp(mlp, hidden_size, mlp_ratio)
        outputs = 6 if gated else 4
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, outputs * hidden_size, bias=True))
        self.rms_norm = RmsNorm(hidden_size, eps=1e-6, affine=False) if norm == "rmsnorm" else None

    def norm(self, x):
        """The modulated norm: no scale or shift of its own (the modulation gives them), as the release's."""
        return F.layer_norm(x, (self.hidden_size,), eps=1e-6) if self.rms_norm is None else self.rms_norm(x)

    def forward(self, x, c, rope=None):
        if not self.gated:
            shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            x = x + self.attn(modulate(self.norm(x), shift_msa, scale_msa), rope)
            return x + self.mlp(modulate(self.norm(x), shift_mlp, scale_mlp))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm(x), shift_mlp, scale_mlp))
        return x


class ViTBlock(nn.Module):
    """A standard pre-norm ViT block, no modulation: the in-context variant's block. With
    cross_attention, a cross-attention to the condition tokens follows the self-attention, as
    in the original Transformer decoder (the paper's cross-attention variant)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, cross_attention=False, qk_norm=False, mlp="gelu",
                 norm="layernorm"):
        super().__init__()
        self.norm1 = make_norm(norm, hidden_size)
        self.attn = Attention(hidden_size, num_heads, qk_norm, norm)
        if cross_attention:
            self.norm_cross = make_norm(norm, hidden_size)
            self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm, norm)
        self.norm2 = make_norm(norm, hidden_size)
        self.mlp = make_mlp(mlp, hidden_size, mlp_ratio)

    def forward(self, x, context=None, rope=None):
        x = x + self.attn(self.norm1(x), rope)
        if context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context)
        return x + self.mlp(self.norm2(x))


class JointStream(nn.Module):
    """The weights of one token stream of an MM-DiT block: modulation, qkv, output projection, MLP.
    update=False keeps only shift, scale and qkv: the condition stream of the last block, whose
    output nothing reads (unused weights would also stall DDP's gradient reduction)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, update=True, qk_norm=False, mlp="gelu",
                 norm="layernorm"):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.update = update
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (6 if update else 2) * hidden_size))
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        if update:
            self.proj = nn.Linear(hidden_size, hidden_size)
            self.mlp = make_mlp(mlp, hidden_size, mlp_ratio)
        self.q_norm, self.k_norm = qk_norms(qk_norm, norm, hidden_size // num_heads)  # each stream its own, as SD3
        self.rms_norm = RmsNorm(hidden_size, eps=1e-6, affine=False) if norm == "rmsnorm" else None

    def norm(self, x):
        return F.layer_norm(x, (self.hidden_size,), eps=1e-6) if self.rms_norm is None else self.rms_norm(x)

    def qkv_of(self, x, c, rope=None):
        """(queries, keys, values, each (N, heads, T, head_dim), the modulation) of the tokens x; rope rotates
        the queries and keys by their position."""
        mods = self.adaLN_modulation(c).chunk(6 if self.update else 2, dim=1)
        qkv = self.qkv(modulate(self.norm(x), mods[0], mods[1]))
        q, k, v = (split_heads(z, self.num_heads) for z in qkv.chunk(3, dim=-1))
        return rotate(self.q_norm(q), rope), rotate(self.k_norm(k), rope), v, mods

    def finish(self, x, attended, mods):
        """The gated residual of the attention output, then the modulated, gated MLP."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa.unsqueeze(1) * self.proj(attended)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm(x), shift_mlp, scale_mlp))


class MMDiTBlock(nn.Module):
    """Stable Diffusion 3's joint-attention block: the image tokens and the condition tokens keep
    separate weights but attend together over their concatenation. forward(x, c, context) ->
    (x, context); c (N, D) modulates both streams."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, last=False, **options):
        super().__init__()
        self.num_heads = num_heads
        self.image = JointStream(hidden_size, num_heads, mlp_ratio, **options)
        self.context = JointStream(hidden_size, num_heads, mlp_ratio, update=not last, **options)

    def forward(self, x, c, context, rope=None):
        """rope rotates the image tokens only: the condition tokens have no position (as if all at (0, 0),
        as Flux places its text tokens)."""
        *qkv_x, mods_x = self.image.qkv_of(x, c, rope)
        *qkv_c, mods_c = self.context.qkv_of(context, c)
        q, k, v = (torch.cat([of_c, of_x], dim=2) for of_c, of_x in zip(qkv_c, qkv_x))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        attended_c, attended_x = attended.split([context.shape[1], x.shape[1]], dim=1)
        x = self.image.finish(x, attended_x, mods_x)
        if self.context.update:
            context = self.context.finish(context, attended_c, mods_c)
        return x, context


class ClassTokens(nn.Module):
    """The mm-dit condition stream for class labels: a learned sequence of `length` tokens per
    class, and one for the null class (index num_classes) when labels are dropped for guidance."""

    def __init__(self, num_classes, hidden_size, length, has_null_row):
        super().__init__()
        self.length = length
        self.embedding_table = nn.Embedding(num_classes + has_null_row, length * hidden_size)

    def forward(self, labels):
        return self.embedding_table(labels).view(len(labels), self.length, -1)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear to patch*patch*out_channels values per token.
    adaptive=False: the standard ViT output layer, a LayerNorm with its own scale and shift."""

    def __init__(self, hidden_size, patch_size, out_channels, adaptive=True, norm="layernorm"):
        super().__init__()
        self.hidden_size = hidden_size
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        if adaptive:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))
            self.rms_norm = RmsNorm(hidden_size, eps=1e-6, affine=False) if norm == "rmsnorm" else None
        else:
            self.norm = make_norm(norm, hidden_size)

    def forward(self, x, c):
        if not hasattr(self, "adaLN_modulation"):
            return self.linear(self.norm(x))
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        normed = F.layer_norm(x, (self.hidden_size,), eps=1e-6) if self.rms_norm is None else self.rms_norm(x)
        return self.linear(modulate(normed, shift, scale))


BLOCKS = ("adaLN-Zero", "adaLN", "cross-attention", "in-context", "mm-dit")
ZERO_INIT_BLOCKS = ("adaLN-Zero", "mm-dit")  # modulation regressed to zero at init: each block the identity
ADAPTIVE_BLOCKS = ("adaLN-Zero", "adaLN", "mm-dit")  # the output layer's norm is adaptive too


POSITIONS = ("sincos", "rope", "none")
MLPS = ("gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")


def make_block(block, hidden_size, num_heads, mlp_ratio, last, **options):
    """options: qk_norm, mlp, norm, which every block takes alike."""
    if block in ("adaLN-Zero", "adaLN"):
        return DiTBlock(hidden_size, num_heads, mlp_ratio, gated=block == "adaLN-Zero", **options)
    if block == "mm-dit":
        return MMDiTBlock(hidden_size, num_heads, mlp_ratio, last=last, **options)
    return ViTBlock(hidden_size, num_heads, mlp_ratio, cross_attention=block == "cross-attention", **options)


class DiT(nn.Module):
    """Diffusion model with a transformer backbone. `block` picks the conditioning (see the top
    of this file); `context_tokens` is the length of mm-dit's per-class condition sequence.
    input_size: the latent's side, or (height, width); the model runs at any size that the patch
    divides. pos: sincos (the release's fixed table), rope (axial 2D rotary positions of base
    frequency rope_base on queries and keys) or none. qk_norm, mlp (gelu | swiglu) and norm
    (layernorm | rmsnorm): the later transformers' stabilisers (see the top of this file)."""

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
        block="adaLN-Zero",
        context_tokens=4,
        pos="sincos",
        rope_base=10000.0,
        qk_norm=False,
        mlp="gelu",
        norm="layernorm",
    ):
        super().__init__()
        input_size = plain_input_size(input_size)
        # Everything needed to rebuild this network: checkpoints store it, DiT(**model_args) rebuilds it.
        self.model_args = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                               hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                               class_dropout_prob=class_dropout_prob, num_classes=num_classes,
                               learn_sigma=learn_sigma, block=block, context_tokens=context_tokens, pos=pos,
                               rope_base=rope_base, qk_norm=qk_norm, mlp=mlp, norm=norm)
        check_arguments(self.model_args)
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.block = block
        self.pos = pos
        self.rope_base = rope_base
        self.gradient_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        height, width = input_hw(input_size)
        self.grid = (height // patch_size, width // patch_size)  # the token grid (rows, columns) it is built for
        self.num_patches = num_patches = self.grid[0] * self.grid[1]
        self.pos_tables = {}  # (kind, rows, columns, device) -> positions of a grid, computed on first use
        if pos == "sincos":  # a Parameter (not a buffer) so the state_dict matches the release
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        options = dict(qk_norm=qk_norm, mlp=mlp, norm=norm)
        self.blocks = nn.ModuleList([make_block(block, hidden_size, num_heads, mlp_ratio, last=i == depth - 1,
                                                **options) for i in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, adaptive=block in ADAPTIVE_BLOCKS,
                                      norm=norm)
        if block == "mm-dit":  # after the released modules, so their initial draws do not move
            self.class_tokens = ClassTokens(num_classes, hidden_size, context_tokens, class_dropout_prob > 0)
        self.initialize_weights()

    def initialize_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.pos == "sincos":
            self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid).unsqueeze(0))

        # The patch embedding is a linear map over flattened patches.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.block == "mm-dit":
            nn.init.normal_(self.class_tokens.embedding_table.weight, std=0.02)

        # adaLN-Zero: every block starts as the identity and the model outputs exactly zero.
        # adaLN keeps the ordinary (xavier) initialisation of its modulation.
        if self.block in ZERO_INIT_BLOCKS:
            for name, module in self.named_modules():
                if name.endswith("adaLN_modulation"):
                    nn.init.zeros_(module[-1].weight)
                    nn.init.zeros_(module[-1].bias)
        # Every variant's output starts at zero, as the release's does: the blocks are what differs.
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x, grid=None):
        """(N, T, p*p*C) -> (N, C, H, W); grid: the (rows, columns) of the T tokens (default: the built one)."""
        c, p = self.out_channels, self.patch_size
        h, w = grid or self.grid
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def token_grid(self, x):
        """The (rows, columns) of tokens of latents x, refused in one line unless the patch divides them."""
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise UserError(f"a {height}x{width} input is not divisible by the patch size {self.patch_size}; "
                            f"give height and width that are multiples of {self.patch_size}")
        return height // self.patch_size, width // self.patch_size

    def positions(self, grid, device):
        """The sincos table (1, T, D) of a token grid: the stored pos_embed for the built grid (so the
        released outputs stay exact), else the same formula recomputed for the input's grid (not
        interpolated: token (i, j) gets the position (i, j) whatever the grid's size)."""
        if grid == self.grid:
            return self.pos_embed
        key = ("sincos", *grid, str(device))
        if key not in self.pos_tables:
            table = sincos_pos_embed_2d(self.pos_embed.shape[-1], grid).unsqueeze(0)
            self.pos_tables[key] = table.to(device=device, dtype=self.pos_embed.dtype)
        return self.pos_tables[key]

    def rotary(self, grid, device):
        """pos=rope: (sin, cos), each (T, head_dim), of the token grid, by timm's axial 2D RoPE: the first half
        of each head's dims rotates with the token's row, the second half with its column, at frequencies
        rope_base ** (-i / (head_dim / 4)); token (i, j) has position (i, j) on any grid. Else None."""
        if self.pos != "rope":
            return None
        key = ("rope", *grid, str(device))
        if key not in self.pos_tables:
            head_dim = self.x_embedder.proj.out_channels // self.num_heads
            self.pos_tables[key] = build_rotary_pos_embed(list(grid), dim=head_dim, temperature=self.rope_base,
                                                          in_pixels=False, device=device)
        return self.pos_tables[key]

    def forward(self, x, t, y, force_drop_ids=None, context=None, block_cache=None):
        """x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) labels (num_classes = null).
        force_drop_ids: optional (N,) with 1 where the label is dropped, replacing the random
        label dropout (train.py draws it from its own seed so that runs are reproducible).
        context: mm-dit only, an (N, L, hidden_size) condition sequence (e.g. a text encoder's
        output, projected) replacing the class tokens; y still adds its class embedding to t.
        Any height and width that are multiples of the patch work; positions follow the input's grid.
        block_cache: sampling only, see run_blocks."""
        grid = self.token_grid(x)
        x = self.x_embedder(x)
        if self.pos == "sincos":
            x = x + self.positions(grid, x.device)
        t_emb = self.t_embedder(t)
        labels = self.y_embedder.drop_labels(y, self.training, force_drop_ids)
        y_emb = self.y_embedder(labels, train=False)
        c = t_emb + y_emb
        if self.block == "in-context":  # two more tokens, removed again before the output layer
            x = torch.cat([x, t_emb.unsqueeze(1), y_emb.unsqueeze(1)], dim=1)
        x = self.run_blocks(x, self.block_inputs(t_emb, y_emb, labels, context), self.rotary(grid, x.device),
                            block_cache)
        if self.block == "in-context":
            x = x[:, :grid[0] * grid[1]]
        return self.unpatchify(self.final_layer(x, c), grid)

    def block_inputs(self, t_emb, y_emb, labels, context):
        """What each block takes besides the image tokens."""
        if context is not None and self.block != "mm-dit":
            raise ValueError(f"context= is for block='mm-dit'; this DiT has block={self.block!r}")
        if self.block == "cross-attention":
            return (torch.stack([t_emb, y_emb], dim=1),)
        if self.block == "in-context":
            return ()
        c = t_emb + y_emb
        if self.block != "mm-dit":
            return (c,)
        if context is None:
            return c, self.class_tokens(labels)
        if context.dim() != 3 or context.shape[0] != len(c) or context.shape[2] != c.shape[1]:
            raise ValueError(f"context must be (N, L, {c.shape[1]}) for a batch of {len(c)}, got "
                             f"{tuple(context.shape)}")
        return c, context

    def run_blocks(self, x, inputs, rope=None, block_cache=None):
        """The blocks in turn; an mm-dit block also returns the condition stream the next one takes.
        block_cache (a sampling.BlockCache, for faster sampling): at block block_cache.start it may
        hand back the tokens plus the residual the remaining blocks added at an earlier call, in
        place of running them; otherwise it records that residual. It counts the blocks run."""
        for i, block in enumerate(self.blocks):
            if block_cache is not None and i == block_cache.start:
                reused = block_cache.enter(x)
                if reused is not None:
                    return reused
            if self.gradient_checkpointing and torch.is_grad_enabled():
                out = checkpoint(block, x, *inputs, rope=rope, use_reentrant=False)
            else:
                out = block(x, *inputs, rope=rope)
            if self.block == "mm-dit":
                x, inputs = out[0], (inputs[0], out[1])
            else:
                x = out
            if block_cache is not None:
                block_cache.block_evals += 1
        return x if block_cache is None else block_cache.leave(x)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_all_channels=False, context=None, block_cache=None):
        """Classifier-free guidance. The batch is the conditional half followed by the same
        latents with the null label; both halves get the guided noise prediction.

        By default only the first three output channels are guided, as in the original
        release (needed to reproduce its published FID); `guide_all_channels=True` guides
        every noise channel. Learned-variance channels are never guided. context (mm-dit):
        the conditional then the unconditional condition sequences, as the labels.
        """
        half = x[: len(x) // 2]
        # self(...), not self.forward(...): a compiled model (--compile) runs its compiled forward here too
        out = self(torch.cat([half, half]), t, y, context=context, block_cache=block_cache)
        n = self.in_channels if guide_all_channels else min(3, self.in_channels)
        eps, rest = out[:, :n], out[:, n:]
        cond_eps, uncond_eps = eps.split(len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def check_arguments(model_args):
    """Refuse constructor arguments that cannot make a DiT, with the fix."""
    a = model_args
    if any(side % a["patch_size"] for side in input_hw(a["input_size"])):
        raise ValueError(f"input size {a['input_size']} is not divisible by the patch size {a['patch_size']}; "
                         f"pick an input size that is a multiple of {a['patch_size']}")
    if a["hidden_size"] % a["num_heads"]:
        raise ValueError(f"hidden size {a['hidden_size']} is not divisible by the number of heads {a['num_heads']}")
    if a["hidden_size"] % 4:
        raise ValueError(f"hidden size {a['hidden_size']} must be a multiple of 4 (2D sine-cosine positions)")
    if a["num_classes"] < 1 or a["depth"] < 1 or a["in_channels"] < 1:
        raise ValueError("num_classes, depth and in_channels must be positive")
    if a["block"] not in BLOCKS:
        raise UserError(f"unknown block {a['block']!r}; choose one of: {', '.join(BLOCKS)}")
    if not isinstance(a["context_tokens"], int) or a["context_tokens"] < 1:
        raise UserError(f"--context-tokens (context_tokens) must be a positive integer, got {a['context_tokens']!r}")
    for name, choices in (("pos", POSITIONS), ("mlp", MLPS), ("norm", NORMS)):
        if a[name] not in choices:
            raise UserError(f"unknown --{name} {a[name]!r}; choose one of: {', '.join(choices)}")
    if a["pos"] == "rope" and (a["hidden_size"] // a["num_heads"]) % 4:
        raise UserError(f"--pos rope needs a head size that is a multiple of 4 (half for rows, half for columns, in "
                        f"pairs); hidden size {a['hidden_size']} / {a['num_heads']} heads is not")
    if not (isinstance(a["rope_base"], (int, float)) and math.isfinite(a["rope_base"]) and a["rope_base"] > 1):
        raise UserError(f"--rope-base must be a number above 1, got {a['rope_base']!r}")
    if not isinstance(a["qk_norm"], bool):
        raise UserError(f"qk_norm must be True or False, got {a['qk_norm']!r}")


def input_hw(input_size):
    """(height, width) of an input_size: an int for a square, or (height, width)."""
    return (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)


def plain_input_size(input_size):
    """input_size as model_args records it (plain values, for checkpoints and JSON): an int for a
    square, else [height, width]; refused in one line unless it is one or two positive integers."""
    sides = [input_size] if isinstance(input_size, int) else list(input_size)
    if not (1 <= len(sides) <= 2 and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sides)):
        raise UserError(f"input_size must be a positive integer or (height, width), got {input_size!r}")
    return sides[0] if len(set(sides)) == 1 else sides


def sincos_pos_embed_2d(dim, grid_size):
    """(rows * columns, dim) fixed positions of a grid_size (an int for a square, or (rows, columns)):
    the first half encodes the column, the second the row."""
    rows, cols = input_hw(grid_size)
    rows, cols = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                                indexing="ij")
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


def model_args_for(name, **kwargs):
    """The constructor arguments of a named config, e.g. "DiT-XL/2", plus kwargs."""
    size, _, patch = name.removeprefix("DiT-").partition("/")
    if not name.startswith("DiT-") or size not in MODEL_SIZES or not patch.isdigit():
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(DiT_models)}")
    depth, hidden, heads = MODEL_SIZES[size]
    return dict(depth=depth, hidden_size=hidden, patch_size=int(patch), num_heads=heads, **kwargs)


def config_name(model_args):
    """'DiT-XL/2' for the arguments of a named config, else a description of the shape."""
    for size, (depth, hidden, heads) in MODEL_SIZES.items():
        if (depth, hidden, heads) == (model_args["depth"], model_args["hidden_size"], model_args["num_heads"]):
            return f"DiT-{size}/{model_args['patch_size']}"
    return f"DiT-depth{model_args['depth']}-hidden{model_args['hidden_size']}/{model_args['patch_size']}"


def create_model(name, **kwargs):
    """The DiT of a named config, e.g. create_model("DiT-XL/2", input_size=32)."""
    return DiT(**model_args_for(name, **kwargs))


def compile_model(model, inference=False, blocks_only=False):
    """The fast mode (--compile): the whole model through torch.compile, in place (calls of the
    model, forward_with_cfg's and DDP's included, run the compiled forward, and the state_dict
    keeps the release's names). The compiler fuses what the release runs as separate
    kernels (bias + GELU, LayerNorm + modulation, gate + residual, the attention's reshapes), and
    the GELU is computed through exp instead of tanh (Mlp.sigmoid_gelu).
    inference=True (sampling) on CPU also freezes the weights into the no-grad graph (Inductor's
    `freezing`: the linear layers' weights pre-packed for MKL's matmul, constants folded); the
    packed copies do not follow later changes, so only a model whose weights are final may be
    compiled so.
    blocks_only compiles each block instead (regional compilation: the blocks share one graph,
    compiled in a fraction of the whole model's time): train.py's choice, where it measured as
    fast as the whole model, and block caching's, whose Python-side choice of the blocks to run
    would make the whole-model graph recompile at every sampling step. The default (uncompiled) model
    is untouched; compiled outputs match it to float32 rounding (tests/test_speed.py)."""
    for module in model.modules():
        if isinstance(module, Mlp):
            module.sigmoid_gelu = True
    if blocks_only:
        for block in model.blocks:
            block.compile()
        return model
    if not (inference and next(model.parameters()).device.type == "cpu"):
        model.compile()
        return model
    compiled = torch.compile(model.forward)

    def frozen_forward(*args, **kwargs):
        # Dynamo reads `freezing` from the global config as it traces (torch.compile's options
        # reach only Inductor), so it is set around each call, and left as it was outside them.
        with torch._inductor.config.patch(freezing=True):
            return compiled(*args, **kwargs)

    model.forward = frozen_forward  # Module.__call__ (and so forward_with_cfg) runs it
    return model


def quantize_model(model):
    """The int8 mode for sampling on CPU (--quantize int8), in place: every nn.Linear becomes
    PyTorch's dynamically quantized Linear (fbgemm): int8 weights with a scale per output
    channel, the input quantized to int8 at each call from its own range, int32 sums. On an AVX2
    CPU its matmuls run about 1.7x fp32's rate; DiT-S/2's output moves by about 2% (RMS,
    relative), and the digits' accuracy and Frechet distance not measurably (README "Speed").
    The convolution, embeddings, norms and attention stay fp32. Inference only; apply before
    compile_model."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # PyTorch announces a move of eager-mode quantization to torchao; the kernels are its own.
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)


def _config(name):
    def make(**kwargs):
        return create_model(name, **kwargs)

    make.__name__ = name.replace("-", "_").replace("/", "_")
    return make


DiT_models = {f"DiT-{size}/{patch}": _config(f"DiT-{size}/{patch}") for size in MODEL_SIZES for patch in (2, 4, 8)}


def describe_state_dict(state_dict):
    """A short human description of the DiT a state_dict belongs to, for error messages."""
    try:
        hidden, in_ch, _, patch = state_dict["x_embedder.proj.weight"].shape
        depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
        classes = state_dict["y_embedder.embedding_table.weight"].shape[0] - 1
    except (KeyError, ValueError, AttributeError):
        return "not a DiT state_dict"
    size = next((s for s, cfg in MODEL_SIZES.items() if cfg[:2] == (depth, hidden)), f"depth {depth}, hidden {hidden}")
    block = block_of_state_dict(state_dict)
    return f"DiT-{size}/{patch}, input {input_of_state_dict(state_dict, patch)}x{in_ch}, {classes} classes" + \
        ("" if block == "adaLN-Zero" else f", block {block}") + \
        ("" if "pos_embed" in state_dict else ", no pos_embed (pos rope or none)") + \
        (", mlp swiglu" if any(".mlp.fc1_g." in k for k in state_dict) else "") + \
        (", qk-norm" if any(".q_norm." in k for k in state_dict) else "")


def input_of_state_dict(state_dict, patch):
    """'32x32' as far as the pos_embed tells (its token count for a non-square one)."""
    if "pos_embed" not in state_dict:
        return "any size"
    tokens = state_dict["pos_embed"].shape[1]
    side = int(round(tokens ** 0.5))
    return f"{side * patch}x{side * patch}" if side * side == tokens else f"{tokens} tokens of {patch}x{patch}"


def block_of_state_dict(state_dict):
    """The `block` a DiT state_dict was built with, read off its parameter names and shapes."""
    if "blocks.0.image.qkv.weight" in state_dict:
        return "mm-dit"
    if "blocks.0.cross_attn.q.weight" in state_dict:
        return "cross-attention"
    if "blocks.0.norm1.weight" in state_dict:
        return "in-context"
    modulation = state_dict.get("blocks.0.adaLN_modulation.1.weight")
    gated = modulation is None or modulation.shape[0] == 6 * state_dict["x_embedder.proj.weight"].shape[0]
    return "adaLN-Zero" if gated else "adaLN"


def load_weights(model, state_dict, what="checkpoint"):
    """load_state_dict(strict=True) with a one-line error naming both models on a mismatch."""
    own = model.state_dict()
    mismatch = set(own) != set(state_dict) or any(own[k].shape != state_dict[k].shape for k in own)
    if mismatch:
        raise UserError(f"{what} holds {describe_state_dict(state_dict)}, but the model built is "
                        f"{describe_state_dict(own)}; pass the matching --model / --image-size / --num-classes "
                        f"/ --block / --pos / --mlp / --qk-norm")
    model.load_state_dict(state_dict, strict=True)
    return model


# The reference's module-level names (`from models import DiT_XL_2`): the same callables as DiT_models.
DiT_XL_2, DiT_XL_4, DiT_XL_8 = DiT_models["DiT-XL/2"], DiT_models["DiT-XL/4"], DiT_models["DiT-XL/8"]
DiT_L_2, DiT_L_4, DiT_L_8 = DiT_models["DiT-L/2"], DiT_models["DiT-L/4"], DiT_models["DiT-L/8"]
DiT_B_2, DiT_B_4, DiT_B_8 = DiT_models["DiT-B/2"], DiT_models["DiT-B/4"], DiT_models["DiT-B/8"]
DiT_S_2, DiT_S_4, DiT_S_8 = DiT_models["DiT-S/2"], DiT_models["DiT-S/4"], DiT_models["DiT-S/8"]
DiT_T_2, DiT_T_4, DiT_T_8 = DiT_models["DiT-T/2"], DiT_models["DiT-T/4"], DiT_models["DiT-T/8"]
