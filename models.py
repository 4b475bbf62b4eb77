"""DiT: the Diffusion Transformer of Peebles & Xie (2023).

A ViT over latent patches whose blocks are conditioned through adaLN-Zero on the sum of a
timestep embedding and a class-label embedding. Parameter names and shapes match the
released checkpoints (DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt), so they load with
strict=True.

`DiTConfig` declares every constructor argument once, with its default, its choices and its
checks: `DiT(**model_args)` builds from it, checkpoints record it, the scripts' variant flags
(cli.add_model_flags) and the "the two models differ" messages derive from it.

`block=` picks how the blocks take the condition (the paper's Section 3.2 ablation, plus Stable
Diffusion 3's joint-attention block). Each is one class in BLOCKS, owning its layers, what they
take besides the image tokens, and its output layer; everything else is shared:

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
`embed`, `run_blocks` and `head` are the forward pass in three public steps, for samplers that
reuse block outputs (sampling.BlockCache). Compilation and int8 live in fast.py; reading
checkpoints (and recognising a bare state_dict's config) in checkpoint.py.
"""
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import RmsNorm, SwiGLU
from timm.layers.pos_embed_sincos import apply_rot_embed, build_rotary_pos_embed
from torch.utils.checkpoint import checkpoint

from errors import UserError


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


# ------------------------------------------------------------------ the parts the blocks are made of
def layer_norm(dim, affine=True):
    return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=affine)


def rms_norm(dim, affine=True):
    return RmsNorm(dim, eps=1e-6, affine=affine)


NORMS = {"layernorm": layer_norm, "rmsnorm": rms_norm}  # the `norm` choices; eps 1e-6 as all of DiT's norms


def make_norm(kind, dim, affine=True):
    """A norm of `kind` over the last dim."""
    return NORMS[kind](dim, affine)


def modulated_norm(kind, dim):
    """The norm under an adaLN modulation: no scale or shift of its own (the modulation gives them),
    as the release's; parameter-free, so it leaves no trace in the state_dict."""
    return make_norm(kind, dim, affine=False)


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
    """fc1, tanh-GELU, fc2. sigmoid_gelu (set by fast.compile_model) writes the GELU as the same function
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


# The `mlp` choices: the release's GELU MLP, or timm's SwiGLU with 2/3 of the hidden width (three
# matrices instead of two, so about the same parameters and flops).
MLPS = {"gelu": Mlp, "swiglu": lambda dim, hidden: SwiGLU(dim, round(2 * hidden / 3))}


def make_mlp(kind, dim, mlp_ratio):
    return MLPS[kind](dim, int(dim * mlp_ratio))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (gated=False: adaLN, scale and shift only)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, gated=True, qk_norm=False, mlp="gelu",
                 norm="layernorm"):
        super().__init__()
        self.gated = gated
        self.attn = Attention(hidden_size, num_heads, qk_norm, norm)
        self.mlp = make_mlp(mlp, hidden_size, mlp_ratio)
        outputs = 6 if gated else 4
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, outputs * hidden_size, bias=True))
        self.norm1, self.norm2 = modulated_norm(norm, hidden_size), modulated_norm(norm, hidden_size)

    def forward(self, x, c, rope=None):
        if not self.gated:
            shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
            return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
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
        self.num_heads = num_heads
        self.update = update
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (6 if update else 2) * hidden_size))
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        if update:
            self.proj = nn.Linear(hidden_size, hidden_size)
            self.mlp = make_mlp(mlp, hidden_size, mlp_ratio)
        self.q_norm, self.k_norm = qk_norms(qk_norm, norm, hidden_size // num_heads)  # each stream its own, as SD3
        self.norm = modulated_norm(norm, hidden_size)

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

    def init_weights(self):
        nn.init.normal_(self.embedding_table.weight, std=0.02)

    def forward(self, labels):
        return self.embedding_table(labels).view(len(labels), self.length, -1)


class FinalLayer(nn.Module):
    """adaLN (shift, scale from c) then a linear to patch*patch*out_channels values per token."""

    def __init__(self, hidden_size, patch_size, out_channels, norm="layernorm"):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))
        self.norm_final = modulated_norm(norm, hidden_size)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PlainFinalLayer(nn.Module):
    """The standard ViT output layer: a norm with its own scale and shift, then the linear; c unused."""

    def __init__(self, hidden_size, patch_size, out_channels, norm="layernorm"):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.norm = make_norm(norm, hidden_size)

    def forward(self, x, c):
        return self.linear(self.norm(x))


# ------------------------------------------------------------------ conditioning blocks
class Conditioning:
    """How the blocks take the timestep, the class and the context: one subclass per `block`
    choice (BLOCKS), made once per DiT from its config. It makes the layers and the output layer,
    turns the embeddings into what every layer takes besides the image tokens (`cond`), and runs a
    layer. The defaults are the adaLN family's: c = t + y modulates every layer, no extra tokens.
    zero_init: the modulation regressions start at zero (each layer the identity at first);
    final_layer: the output layer's class (adaLN-modulated, or a plain norm and linear)."""
    zero_init = False
    final_layer = FinalLayer

    def __init__(self, config):
        self.config = config

    def layer_options(self):
        c = self.config
        return dict(qk_norm=c.qk_norm, mlp=c.mlp, norm=c.norm)

    def make_final_layer(self, out_channels):
        c = self.config
        return self.final_layer(c.hidden_size, c.patch_size, out_channels, c.norm)

    def extra_modules(self):
        """Modules of the DiT beyond the shared ones, by attribute name (registered after them)."""
        return {}

    def begin(self, model, tokens, t_emb, y_emb, labels, context):
        """(tokens, cond): the tokens the first layer takes, and what every layer takes besides them."""
        refuse_context(context, self.config.block)
        return tokens, t_emb + y_emb

    def run_layer(self, layer, tokens, cond, rope):
        """(tokens, cond) after one layer."""
        return layer(tokens, cond, rope=rope), cond

    def end(self, tokens, image_tokens):
        """The image tokens after the last layer."""
        return tokens

    @staticmethod
    def found_in(state_dict, hidden_size):
        """Whether a state_dict's names and shapes show this block (checkpoint.config_of_state_dict)."""
        raise NotImplementedError


def refuse_context(context, block):
    if context is not None:
        raise ValueError(f"context= is for block='mm-dit'; this DiT has block={block!r}")


def modulation_width(state_dict):
    weight = state_dict.get("blocks.0.adaLN_modulation.1.weight")
    return None if weight is None else weight.shape[0]


class AdaLN(Conditioning):
    """Scale and shift regressed from t + y (no gates), the modulation ordinarily initialised."""
    gated = False

    def make_layer(self, last):
        c = self.config
        return DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio, gated=self.gated, **self.layer_options())

    @classmethod
    def found_in(cls, state_dict, hidden_size):
        return modulation_width(state_dict) == (6 if cls.gated else 4) * hidden_size


class AdaLNZero(AdaLN):
    """The release's: adaLN plus a gate on each residual, the modulation starting at zero."""
    gated = zero_init = True


class CrossAttentionConditioning(Conditioning):
    """Plain ViT layers that cross-attend to the sequence (t, y) of length two; a plain output layer."""
    final_layer = PlainFinalLayer

    def make_layer(self, last):
        c = self.config
        return ViTBlock(c.hidden_size, c.num_heads, c.mlp_ratio, cross_attention=True, **self.layer_options())

    def begin(self, model, tokens, t_emb, y_emb, labels, context):
        refuse_context(context, self.config.block)
        return tokens, torch.stack([t_emb, y_emb], dim=1)

    @staticmethod
    def found_in(state_dict, hidden_size):
        return "blocks.0.cross_attn.q.weight" in state_dict


class InContext(Conditioning):
    """Plain ViT layers; t and y are two more tokens, dropped again after the last layer; a plain output layer."""
    final_layer = PlainFinalLayer

    def make_layer(self, last):
        c = self.config
        return ViTBlock(c.hidden_size, c.num_heads, c.mlp_ratio, cross_attention=False, **self.layer_options())

    def begin(self, model, tokens, t_emb, y_emb, labels, context):
        refuse_context(context, self.config.block)
        return torch.cat([tokens, t_emb.unsqueeze(1), y_emb.unsqueeze(1)], dim=1), None

    def run_layer(self, layer, tokens, cond, rope):
        return layer(tokens, rope=rope), cond

    def end(self, tokens, image_tokens):
        return tokens[:, :image_tokens]

    @staticmethod
    def found_in(state_dict, hidden_size):
        return "blocks.0.norm1.weight" in state_dict and "blocks.0.cross_attn.q.weight" not in state_dict


class MMDiT(Conditioning):
    """SD3's joint attention: a condition stream (per-class learned tokens, or a given context)
    with its own weights; both streams modulated adaLN-Zero style from t + y."""
    zero_init = True

    def make_layer(self, last):
        c = self.config
        return MMDiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio, last=last, **self.layer_options())

    def extra_modules(self):
        c = self.config
        return {"class_tokens": ClassTokens(c.num_classes, c.hidden_size, c.context_tokens, c.class_dropout_prob > 0)}

    def begin(self, model, tokens, t_emb, y_emb, labels, context):
        c = t_emb + y_emb
        if context is None:
            return tokens, (c, model.class_tokens(labels))
        if context.dim() != 3 or context.shape[0] != len(c) or context.shape[2] != c.shape[1]:
            raise ValueError(f"context must be (N, L, {c.shape[1]}) for a batch of {len(c)}, got "
                             f"{tuple(context.shape)}")
        return tokens, (c, context)

    def run_layer(self, layer, tokens, cond, rope):
        c, context = cond
        tokens, context = layer(tokens, c, context, rope=rope)
        return tokens, (c, context)

    @staticmethod
    def found_in(state_dict, hidden_size):
        return "blocks.0.image.qkv.weight" in state_dict


# The `block` choices: a new conditioning block is one Conditioning subclass plus its entry here.
BLOCKS = {"adaLN-Zero": AdaLNZero, "adaLN": AdaLN, "cross-attention": CrossAttentionConditioning,
          "in-context": InContext, "mm-dit": MMDiT}
POSITIONS = ("sincos", "rope", "none")


# ------------------------------------------------------------------ the configuration
def variant(default, help, choices=None):
    """A DiTConfig field the scripts expose as a flag (--name-with-dashes), with its help and choices."""
    return dataclasses.field(default=default, metadata={"flag": {"help": help, "choices": choices}})


@dataclasses.dataclass
class DiTConfig:
    """Every argument of a DiT, with its default (the released DiT-XL/2 at 256 px): the one list.
    input_size is the latent's side, or [height, width]; fields made with `variant` are the
    scripts' model-variant flags. Checked on creation (one-line UserError with the fix)."""
    input_size: object = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    block: str = variant("adaLN-Zero", "how the blocks take the timestep and class: adaLN-Zero (the paper's), adaLN, "
                         "cross-attention, in-context, mm-dit (Stable Diffusion 3's joint attention)", tuple(BLOCKS))
    context_tokens: int = variant(4, "--block mm-dit: length of the learned condition token sequence per class")
    pos: str = variant("sincos", "positions: sincos (the paper's fixed table), rope (axial 2D rotary on queries and "
                       "keys: trains at one size, samples at others), none", POSITIONS)
    rope_base: float = variant(10000.0, "--pos rope: base of the rotary frequencies")
    qk_norm: bool = variant(False, "normalise each head's queries and keys (by --norm's kind)")
    mlp: str = variant("gelu", "gelu (the paper's) or swiglu (2/3 of the width: about the same parameters)",
                       tuple(MLPS))
    norm: str = variant("layernorm", "layernorm (the paper's) or rmsnorm", tuple(NORMS))

    def __post_init__(self):
        self.input_size = plain_input_size(self.input_size)
        self.check_choices()
        self.check_shapes()

    def check_choices(self):
        for field in variant_fields():
            choices = field.metadata["flag"]["choices"]
            value = getattr(self, field.name)
            if choices and value not in choices:
                raise UserError(f"unknown {flag_name(field.name)} {value!r}; choose one of: {', '.join(choices)}")
        if not isinstance(self.qk_norm, bool):
            raise UserError(f"qk_norm must be True or False, got {self.qk_norm!r}")
        if not isinstance(self.context_tokens, int) or self.context_tokens < 1:
            raise UserError(f"--context-tokens (context_tokens) must be a positive integer, got "
                            f"{self.context_tokens!r}")
        if not (isinstance(self.rope_base, (int, float)) and math.isfinite(self.rope_base) and self.rope_base > 1):
            raise UserError(f"--rope-base must be a number above 1, got {self.rope_base!r}")

    def check_shapes(self):
        if any(side % self.patch_size for side in input_hw(self.input_size)):
            raise UserError(f"input size {self.input_size} is not divisible by the patch size {self.patch_size}; "
                            f"pick an input size that is a multiple of {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise UserError(f"hidden size {self.hidden_size} is not divisible by the number of heads "
                            f"{self.num_heads}")
        if self.hidden_size % 4:
            raise UserError(f"hidden size {self.hidden_size} must be a multiple of 4 (2D sine-cosine positions)")
        if self.num_classes < 0 or self.depth < 1 or self.in_channels < 1:
            raise UserError("depth and in_channels must be positive, num_classes 0 (unconditional) or more")
        if self.num_classes == 0 and not self.class_dropout_prob > 0:
            raise UserError("an unconditional model (num_classes 0) embeds every label as the null class, which needs "
                            "class_dropout_prob > 0 (its null row)")
        if self.pos == "rope" and (self.hidden_size // self.num_heads) % 4:
            raise UserError(f"--pos rope needs a head size that is a multiple of 4 (half for rows, half for columns, "
                            f"in pairs); hidden size {self.hidden_size} / {self.num_heads} heads is not")

    def describe(self):
        """'DiT-S/2, input 32x32x4, 1000 classes', plus every field that differs from the release."""
        args = dataclasses.asdict(self)
        release = dataclasses.asdict(DiTConfig())
        shown = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes")
        rest = [f"{name} {value}" for name, value in args.items() if name not in shown and value != release[name]]
        height, width = input_hw(self.input_size)
        return ", ".join([f"{config_name(args)}, input {height}x{width}x{self.in_channels}, "
                          f"{self.num_classes} classes", *rest])


def variant_fields():
    """The DiTConfig fields that are model-variant flags."""
    return [field for field in dataclasses.fields(DiTConfig) if "flag" in field.metadata]


def flag_name(field_name):
    return "--" + field_name.replace("_", "-")


def complete_model_args(model_args):
    """model_args with DiTConfig's defaults filled in (older checkpoints lack arguments added since)."""
    defaults = {field.name: field.default for field in dataclasses.fields(DiTConfig)}
    return {**defaults, **model_args}


def differences(recorded, built):
    """'block mm-dit (built: adaLN-Zero), ...': the fields two sets of model arguments disagree on,
    only those both know (a state_dict shows some fields only)."""
    return ", ".join(f"{name} {recorded[name]} (built: {built[name]})" for name in recorded
                     if name in built and recorded[name] != built[name])


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


# ------------------------------------------------------------------ the network
@dataclasses.dataclass
class Embedded:
    """What embed() hands the blocks: the tokens, what every block takes besides them, the output
    layer's condition c = t + y, the token grid (rows, columns) and the rotary table (or None)."""
    tokens: torch.Tensor
    cond: object
    c: torch.Tensor
    grid: tuple
    rope: tuple = None


class DiT(nn.Module):
    """Diffusion model with a transformer backbone, built from a DiTConfig: DiT(**model_args),
    DiT(config=...) or positionally in the reference's order (input_size, patch_size, ...)."""

    def __init__(self, *args, config=None, **kwargs):
        super().__init__()
        config = config if config is not None else DiTConfig(*args, **kwargs)
        self.config = config
        # Everything needed to rebuild this network: checkpoints store it, DiT(**model_args) rebuilds it.
        self.model_args = dataclasses.asdict(config)
        self.conditioning = BLOCKS[config.block](config)
        self.in_channels = config.in_channels
        self.out_channels = config.in_channels * 2 if config.learn_sigma else config.in_channels
        self.patch_size = config.patch_size
        self.num_classes = config.num_classes
        self.gradient_checkpointing = False

        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size, config.class_dropout_prob)
        height, width = input_hw(config.input_size)
        self.grid = (height // config.patch_size, width // config.patch_size)  # the token grid it is built for
        self.num_patches = self.grid[0] * self.grid[1]
        self.pos_tables = {}  # (kind, rows, columns, device) -> positions of a grid, computed on first use
        if config.pos == "sincos":  # a Parameter (not a buffer) so the state_dict matches the release
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, config.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([self.conditioning.make_layer(last=i == config.depth - 1)
                                     for i in range(config.depth)])
        self.final_layer = self.conditioning.make_final_layer(self.out_channels)
        self.extra_names = []  # after the released modules, so their initial draws do not move
        for name, module in self.conditioning.extra_modules().items():
            self.add_module(name, module)
            self.extra_names.append(name)
        self.initialize_weights()

    def initialize_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.config.pos == "sincos":
            self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid).unsqueeze(0))

        # The patch embedding is a linear map over flattened patches.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for name in self.extra_names:
            getattr(self, name).init_weights()

        # adaLN-Zero: every block starts as the identity and the model outputs exactly zero.
        # adaLN keeps the ordinary (xavier) initialisation of its modulation.
        if self.conditioning.zero_init:
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
        if self.config.pos != "rope":
            return None
        key = ("rope", *grid, str(device))
        if key not in self.pos_tables:
            head_dim = self.config.hidden_size // self.config.num_heads
            self.pos_tables[key] = build_rotary_pos_embed(list(grid), dim=head_dim, temperature=self.config.rope_base,
                                                          in_pixels=False, device=device)
        return self.pos_tables[key]

    def forward(self, x, t, y, force_drop_ids=None, context=None):
        """x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) labels (num_classes = null).
        force_drop_ids: optional (N,) with 1 where the label is dropped, replacing the random
        label dropout (train.py draws it from its own seed so that runs are reproducible).
        context: mm-dit only, an (N, L, hidden_size) condition sequence (e.g. a text encoder's
        output, projected) replacing the class tokens; y still adds its class embedding to t.
        Any height and width that are multiples of the patch work; positions follow the input's grid."""
        embedded = self.embed(x, t, y, force_drop_ids, context)
        tokens, _ = self.run_blocks(embedded.tokens, embedded.cond, embedded.rope)
        return self.head(tokens, embedded)

    def embed(self, x, t, y, force_drop_ids=None, context=None):
        """The first step of forward: patches, positions, the timestep and label embeddings (Embedded)."""
        grid = self.token_grid(x)
        tokens = self.x_embedder(x)
        if self.config.pos == "sincos":
            tokens = tokens + self.positions(grid, tokens.device)
        t_emb = self.t_embedder(t)
        labels = self.y_embedder.drop_labels(y, self.training, force_drop_ids)
        y_emb = self.y_embedder(labels, train=False)
        tokens, cond = self.conditioning.begin(self, tokens, t_emb, y_emb, labels, context)
        return Embedded(tokens, cond, t_emb + y_emb, grid, self.rotary(grid, tokens.device))

    def run_blocks(self, tokens, cond, rope=None, start=0, stop=None):
        """(tokens, cond) after blocks start .. stop - 1 (default: all); cond changes only for mm-dit,
        whose condition stream each block updates. Gradient checkpointing applies here."""
        for layer in self.blocks[start:stop]:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens, cond = checkpoint(self.conditioning.run_layer, layer, tokens, cond, rope, use_reentrant=False)
            else:
                tokens, cond = self.conditioning.run_layer(layer, tokens, cond, rope)
        return tokens, cond

    def head(self, tokens, embedded):
        """The last step of forward: the output layer on the image tokens, back to (N, C, H, W)."""
        tokens = self.conditioning.end(tokens, embedded.grid[0] * embedded.grid[1])
        return self.unpatchify(self.final_layer(tokens, embedded.c), embedded.grid)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_all_channels=False, context=None):
        """Classifier-free guidance. The batch is the conditional half followed by the same
        latents with the null label; both halves get the guided noise prediction (apply_guidance).
        context (mm-dit): the conditional then the unconditional condition sequences, as the labels."""
        half = x[: len(x) // 2]
        # self(...), not self.forward(...): a compiled model (--compile) runs its compiled forward here too
        out = self(torch.cat([half, half]), t, y, context=context)
        return self.apply_guidance(out, cfg_scale, guide_all_channels)

    def apply_guidance(self, out, cfg_scale, guide_all_channels=False):
        """The guided output of a conditional-then-unconditional batch. By default only the first three
        output channels are guided, as in the original release (needed to reproduce its published FID);
        `guide_all_channels=True` guides every noise channel. Learned-variance channels are never guided.
        Combined in float32 (a no-op for float32 outputs): the scale amplifies bf16/fp16 rounding."""
        n = self.in_channels if guide_all_channels else min(3, self.in_channels)
        eps, rest = out[:, :n], out[:, n:]
        cond_eps, uncond_eps = eps.float().split(len(eps) // 2, dim=0)
        half_eps = (uncond_eps + cfg_scale * (cond_eps - uncond_eps)).to(eps.dtype)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


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


def _config(name):
    def make(**kwargs):
        return create_model(name, **kwargs)

    make.__name__ = name.replace("-", "_").replace("/", "_")
    return make


DiT_models = {f"DiT-{size}/{patch}": _config(f"DiT-{size}/{patch}") for size in MODEL_SIZES for patch in (2, 4, 8)}

# The reference's module-level names (`from models import DiT_XL_2`): the same callables as DiT_models.
DiT_XL_2, DiT_XL_4, DiT_XL_8 = DiT_models["DiT-XL/2"], DiT_models["DiT-XL/4"], DiT_models["DiT-XL/8"]
DiT_L_2, DiT_L_4, DiT_L_8 = DiT_models["DiT-L/2"], DiT_models["DiT-L/4"], DiT_models["DiT-L/8"]
DiT_B_2, DiT_B_4, DiT_B_8 = DiT_models["DiT-B/2"], DiT_models["DiT-B/4"], DiT_models["DiT-B/8"]
DiT_S_2, DiT_S_4, DiT_S_8 = DiT_models["DiT-S/2"], DiT_models["DiT-S/4"], DiT_models["DiT-S/8"]
DiT_T_2, DiT_T_4, DiT_T_8 = DiT_models["DiT-T/2"], DiT_models["DiT-T/4"], DiT_models["DiT-T/8"]
