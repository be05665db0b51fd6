"""Swin Transformer V2 (Liu et al., 2021, arXiv 2111.09883): res-post-norm, scaled cosine attention and a
log-spaced continuous position bias (CPB) that transfers across window sizes.

Parameter names match timm's `swinv2_*` models (a stage's patch merging is the start of the next stage, the
classifier is `head.fc`), so timm weights load directly. Tokens are kept channels-last, (B, H', W', C): the same
memory as the paper's (B, L, C) with L in row-major order, and no reshapes between blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import ClassifierHead, DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models._features import feature_take_indices
from torch import nn

# exp(logit_scale) is clamped to 100, as in the paper's code
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)
# a shifted window adds this to logits between tokens from different image regions (the reference value, not -inf)
SHIFT_MASK_VALUE = -100.0


# ----------------------------------------------------------------------------------------------------------------
# window helpers and derived tables (all rebuilt from sizes, never loaded from checkpoints)


def window_partition(x: torch.Tensor, window_size: tuple[int, int]) -> torch.Tensor:
    """Cut (B, H, W, C) into (B*nW, Wh, Ww, C) windows, nW in row-major order."""
    B, H, W, C = x.shape
    wh, ww = window_size
    x = x.view(B, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh, ww, C)


def window_reverse(windows: torch.Tensor, window_size: tuple[int, int], feat_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of window_partition: (B*nW, Wh, Ww, C) -> (B, H, W, C)."""
    wh, ww = window_size
    H, W = feat_size
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def make_relative_coords_table(
    window_size: tuple[int, int], pretrained_window_size: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Log-spaced relative offsets fed to the CPB MLP, shape (2Wh-1, 2Ww-1, 2) in 'ij' order.

    Offsets are normalised by the *pretrained* window when one is given: offsets inside the old window then map to
    exactly the inputs seen in pretraining, and larger ones are extrapolated by the MLP (the paper's transfer).
    """
    wh, ww = window_size
    dy = torch.arange(-(wh - 1), wh, dtype=torch.float32)
    dx = torch.arange(-(ww - 1), ww, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1)  # 2Wh-1, 2Ww-1, 2
    norm = pretrained_window_size if pretrained_window_size[0] > 0 else window_size
    # max(., 1): a 1x1 window has the single offset 0, and 0 / 0 would make the whole table NaN
    table[..., 0] /= max(norm[0] - 1, 1)
    table[..., 1] /= max(norm[1] - 1, 1)
    table = table * 8  # to [-8, 8]
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def make_relative_position_index(window_size: tuple[int, int]) -> torch.Tensor:
    """Index into the flattened coords table for every token pair of a window, shape (Wh*Ww, Wh*Ww)."""
    wh, ww = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # 2, N
    rel = coords[:, :, None] - coords[:, None, :]  # 2, N, N: token i minus token j
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def make_shift_attn_mask(
    feat_size: tuple[int, int], window_size: tuple[int, int], shift_size: tuple[int, int]
) -> torch.Tensor:
    """Additive mask for shifted windows, shape (nW, Wh*Ww, Wh*Ww): 0 within an image region, -100 across regions."""
    H, W = feat_size
    wh, ww = window_size
    sh, sw = shift_size
    region = torch.zeros(1, H, W, 1)
    label = 0
    # after the cyclic roll by -shift, the last windows mix tokens from the image's far edges: label the 3x3 regions
    for hs in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
        for ws in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
            region[:, hs, ws, :] = label
            label += 1
    region_windows = window_partition(region, window_size).reshape(-1, wh * ww)  # nW, N
    diff = region_windows[:, None, :] - region_windows[:, :, None]  # nW, N, N
    return torch.zeros_like(diff).masked_fill(diff != 0, SHIFT_MASK_VALUE)


def clip_window(feat_size: tuple[int, int], window_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (window, shift) a shifted block of a stage uses.

    As in the reference: once the map's shorter side is no larger than the window, the stage attends over
    windows of that side (square) and does not shift; the pretrained window size is left as it was.
    """
    side = min(feat_size)
    if side <= max(window_size):
        return (side, side), (0, 0)
    return tuple(window_size), (window_size[0] // 2, window_size[1] // 2)


# ----------------------------------------------------------------------------------------------------------------
# modules


class WindowAttention(nn.Module):
    """Multi-head scaled cosine attention within windows, plus the continuous position bias.

    Two paths compute the same function: eager matmuls, or `scaled_dot_product_attention` with the logit scale
    folded into the normalised queries and the bias (+ shift mask) as a float mask. The bias needs gradients, so
    SDPA's flash backend is out; its memory-efficient and cuDNN backends accept it.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, int],
        pretrained_window_size: tuple[int, int] = (0, 0),
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused_attn: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = tuple(window_size)
        self.pretrained_window_size = tuple(pretrained_window_size)
        self.fused_attn = fused_attn
        self.attn_drop_rate = attn_drop

        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False)
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            # k gets no bias (a constant added to every key cancels in softmax); it stays a zero buffer
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

        table = make_relative_coords_table(self.window_size, self.pretrained_window_size)
        self.register_buffer("relative_coords_table", table, persistent=False)
        index = make_relative_position_index(self.window_size)
        self.register_buffer("relative_position_index", index, persistent=False)
        # (coords table, index) of other windows (the model run at another input size), built once per window
        self._other_tables: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, window_size: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The coords table and position index of `window_size`: the buffers for the built window, else cached."""
        if window_size == self.window_size:
            return self.relative_coords_table, self.relative_position_index
        tables = self._other_tables.get(window_size)
        if tables is None or tables[0].device != device:
            table = make_relative_coords_table(window_size, self.pretrained_window_size)
            tables = (table.to(device), make_relative_position_index(window_size).to(device))
            self._other_tables[window_size] = tables
        return tables

    def position_bias(self, window_size: tuple[int, int] | None = None) -> torch.Tensor:
        """16 * sigmoid(CPB) for every token pair of a window (default: the built one), shape (heads, N, N)."""
        window_size = self.window_size if window_size is None else tuple(window_size)
        table, index = self._tables(window_size, self.relative_coords_table.device)
        N = window_size[0] * window_size[1]
        bias_table = self.cpb_mlp(table).view(-1, self.num_heads)  # (2Wh-1)(2Ww-1), heads
        bias = bias_table[index.view(-1)].view(N, N, self.num_heads)
        return 16 * torch.sigmoid(bias.permute(2, 0, 1))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, window_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """x: (B*nW, N, C); mask: (nW, N, N) additive shift mask or None; window_size: the windows' size when it
        is not the built one (the model run at another input size). Returns (B*nW, N, C)."""
        B_, N, C = x.shape
        qkv_bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        qkv = qkv.view(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each B*nW, heads, N, d
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        logit_scale = torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()  # heads, 1, 1
        bias = self.position_bias(window_size)  # heads, N, N

        if self.fused_attn:
            q = q * logit_scale  # cosine logits scaled per head; SDPA then uses scale 1
            if mask is None:
                attn_mask = bias.unsqueeze(0).to(q.dtype)  # 1, heads, N, N broadcast over windows
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop_rate if self.training else 0.0, scale=1.0
                )
            else:
                # fold windows into the head axis so one (nW*heads, N, N) mask broadcasts over the batch
                # instead of being repeated B times
                nW = mask.shape[0]
                attn_mask = (bias.unsqueeze(0) + mask.unsqueeze(1)).reshape(1, nW * self.num_heads, N, N).to(q.dtype)
                q, k, v = (t.reshape(-1, nW * self.num_heads, N, t.shape[-1]) for t in (q, k, v))  # B, nW*heads, N, d
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop_rate if self.training else 0.0, scale=1.0
                )
                out = out.view(B_, self.num_heads, N, -1)
        else:
            attn = (q @ k.transpose(-2, -1)) * logit_scale + bias.unsqueeze(0)  # B*nW, heads, N, N
            if mask is not None:
                nW = mask.shape[0]
                attn = attn.view(-1, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, N, N)
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = attn @ v  # B*nW, heads, N, d

        x = out.transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))


class SwinTransformerV2Block(nn.Module):
    """(Shifted) window attention and MLP, each followed by a LayerNorm on the residual branch (res-post-norm)."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: tuple[int, int],
        shifted: bool = False,
        pretrained_window_size: tuple[int, int] = (0, 0),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        fused_attn: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.target_window_size = tuple(window_size)  # before clipping: what another input size clips again
        self.shifted = shifted
        self.window_size, self.shift_size = self.window_and_shift(self.input_resolution)

        self.attn = WindowAttention(
            dim,
            num_heads=num_heads,
            window_size=self.window_size,
            pretrained_window_size=pretrained_window_size,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            fused_attn=fused_attn,
        )
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.norm2 = nn.LayerNorm(dim)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

        if any(self.shift_size):
            attn_mask = make_shift_attn_mask(self.input_resolution, self.window_size, self.shift_size)
        else:
            attn_mask = None
        self.register_buffer("attn_mask", attn_mask, persistent=False)
        # (window, shift, shift mask) of other feature-map sizes (the model run at another input size)
        self._other_sizes: dict[tuple[int, int], tuple[tuple[int, int], tuple[int, int], torch.Tensor | None]] = {}

    def window_and_shift(self, feat_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """The (window, shift) this block uses on a feature map of `feat_size` (clipped as the reference does)."""
        window, shift = clip_window(feat_size, self.target_window_size)
        for r, w in zip(feat_size, window):
            if r % w != 0:
                raise ValueError(
                    f"feature map {tuple(feat_size)} is not divisible by window {window}; choose the image size so "
                    "that img_size / patch_size / 2**stage is a multiple of window_size on both axes (or give one "
                    "window per stage)"
                )
        return window, shift if self.shifted else (0, 0)

    def _geometry(self, feat_size: tuple[int, int], device: torch.device) -> tuple:
        """(window, shift, shift mask) for a feature map of `feat_size`: the built ones, or cached per size."""
        if feat_size == self.input_resolution:
            return self.window_size, self.shift_size, self.attn_mask
        geometry = self._other_sizes.get(feat_size)
        if geometry is None or (geometry[2] is not None and geometry[2].device != device):
            window, shift = self.window_and_shift(feat_size)
            mask = make_shift_attn_mask(feat_size, window, shift).to(device) if any(shift) else None
            geometry = (window, shift, mask)
            self._other_sizes[feat_size] = geometry
        return geometry

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        window, shift, mask = self._geometry((H, W), x.device)
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = window_partition(x, window).reshape(-1, window[0] * window[1], C)
        windows = self.attn(windows, mask=mask, window_size=window)  # B*nW, N, C
        x = window_reverse(windows.view(-1, *window, C), window, (H, W))  # B, H, W, C
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        x = x + self.drop_path1(self.norm1(self._attn(x)))
        x = x + self.drop_path2(self.norm2(self.mlp(x)))
        return x

    def init_respostnorm(self) -> None:
        """Zero both post-norms so the block starts as the identity (the paper's res-post-norm init)."""
        for norm in (self.norm1, self.norm2):
            nn.init.zeros_(norm.weight)
            nn.init.zeros_(norm.bias)


class PatchMerging(nn.Module):
    """V2 patch merging: 2x2 neighbours concatenated, Linear(4C, 2C) then LayerNorm(2C) (V1 normalises first)."""

    def __init__(self, dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)
        self.norm = nn.LayerNorm(self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H/2, W/2, 2C)."""
        B, H, W, C = x.shape
        # B, H/2, 2(row), W/2, 2(col), C -> B, H/2, W/2, 2(col), 2(row), C: concatenation order
        # [0::2, 0::2], [1::2, 0::2], [0::2, 1::2], [1::2, 1::2] as in the reference
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.norm(self.reduction(x))


class SwinTransformerV2Stage(nn.Module):
    """Optional patch merging, then `depth` blocks alternating plain and shifted windows."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: tuple[int, int],
        downsample: bool = False,
        pretrained_window_size: tuple[int, int] = (0, 0),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
        extra_norm_every: int = 0,
        fused_attn: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        if downsample:
            self.output_resolution = (input_resolution[0] // 2, input_resolution[1] // 2)
            self.downsample = PatchMerging(dim, out_dim)
        else:
            if dim != out_dim:
                raise ValueError(f"a stage without downsampling keeps its width: dim={dim}, out_dim={out_dim}")
            self.output_resolution = self.input_resolution
            self.downsample = nn.Identity()
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            [
                SwinTransformerV2Block(
                    out_dim,
                    input_resolution=self.output_resolution,
                    num_heads=num_heads,
                    window_size=window_size,
                    shifted=j % 2 == 1,
                    pretrained_window_size=pretrained_window_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path[j] if drop_path else 0.0,
                    fused_attn=fused_attn,
                )
                for j in range(depth)
            ]
        )
        # SwinV2-H/G stabilisation: a LayerNorm on the main branch after every `extra_norm_every` blocks
        # (counted within the stage). Stored by block index so only those blocks get one.
        self.extra_norms = nn.ModuleDict(
            {
                str(j): nn.LayerNorm(out_dim)
                for j in range(depth)
                if extra_norm_every and (j + 1) % extra_norm_every == 0
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H', W', C')."""
        x = self.downsample(x)
        for j, block in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if str(j) in self.extra_norms:
                x = self.extra_norms[str(j)](x)
        return x


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class SwinTransformerV2(nn.Module):
    """Swin Transformer V2 encoder and classifier.

    Keyword names follow timm's `SwinTransformerV2`. `pretrained_window_sizes` (one per stage) normalises the CPB
    inputs by the window each stage used in pretraining, which is how a model fine-tuned at a larger window
    inherits the pretrained position bias. `fused_attn=None` uses SDPA on CUDA and the eager path elsewhere.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,  # one square window for all stages, or one per stage
        pretrained_window_sizes: Sequence[int] | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        ape: bool = False,
        extra_norm_every: int = 0,
        fused_attn: bool | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        img_size = _pair(img_size)
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have one entry per stage")
        reduction = patch_size * 2 ** (num_stages - 1)
        if img_size[0] % reduction or img_size[1] % reduction:
            raise ValueError(
                f"img_size {img_size} must be divisible by patch_size * 2**(stages-1) = {patch_size} * "
                f"2**{num_stages - 1} = {reduction}; use e.g. img_size={max(1, img_size[0] // reduction) * reduction}"
            )
        pretrained_window_sizes = tuple(pretrained_window_sizes or (0,) * num_stages)
        if len(pretrained_window_sizes) != num_stages:
            raise ValueError(
                f"pretrained_window_sizes {pretrained_window_sizes} needs one entry per stage ({num_stages})"
            )

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_layers = num_stages
        self.num_features = int(embed_dim * 2 ** (num_stages - 1))
        self.window_size = window_size
        self.pretrained_window_sizes = pretrained_window_sizes
        if fused_attn is None:
            fused_attn = torch.cuda.is_available()

        self.depths = tuple(depths)
        # Conv2d(kernel = stride = patch) then LayerNorm over channels, kept channels-last: B, H/p, W/p, C
        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, norm_layer=nn.LayerNorm, output_fmt="NHWC", strict_img_size=False
        )
        grid = self.patch_embed.grid_size
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0], grid[1], embed_dim))
        else:
            self.absolute_pos_embed = None
        self.register_parameter("mask_token", None)  # created by enable_mask_token() for SimMIM
        self.pos_drop = nn.Dropout(drop_rate)

        # stochastic depth rises linearly over all blocks (on the CPU: the model may be built on the meta device)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        if isinstance(window_size, int):
            windows = [(window_size, window_size)] * num_stages
        elif len(window_size) == num_stages:  # one square window per stage
            windows = [(int(w), int(w)) for w in window_size]
        else:
            raise ValueError(f"window_size {tuple(window_size)} must be an int or one int per stage ({num_stages})")
        stages = []
        in_dim = embed_dim
        resolution = grid
        for i in range(num_stages):
            out_dim = embed_dim * 2**i
            stage = SwinTransformerV2Stage(
                in_dim,
                out_dim,
                input_resolution=resolution,
                depth=depths[i],
                num_heads=num_heads[i],
                window_size=windows[i],
                downsample=i > 0,
                pretrained_window_size=_pair(pretrained_window_sizes[i]),
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                extra_norm_every=extra_norm_every,
                fused_attn=fused_attn,
            )
            stages.append(stage)
            in_dim = out_dim
            resolution = stage.output_resolution
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features)
        # the final norm above, then mean over tokens and Linear (`head.fc`, Identity when num_classes == 0)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type="avg", drop_rate=drop_rate, input_fmt="NHWC"
        )

        self.apply(self._init_weights)
        if self.absolute_pos_embed is not None:
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        for stage in self.layers:
            for block in stage.blocks:
                block.init_respostnorm()
        self.set_grad_checkpointing(grad_checkpointing)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def stage_window_sizes(self) -> list[int]:
        """The window each stage actually uses (after clipping): the pretrained_window_sizes of a fine-tune."""
        return [stage.blocks[0].window_size[0] for stage in self.layers]

    @property
    def cpb_window_sizes(self) -> list[int]:
        """The window each stage divides its CPB offsets by: its pretrained window, or its own when that is 0."""
        return [p if p > 0 else w for p, w in zip(self.pretrained_window_sizes, self.stage_window_sizes, strict=True)]

    def enable_mask_token(self) -> nn.Parameter:
        """Create the learned SimMIM mask token (1, 1, C), truncated-normal std 0.02, if it does not exist yet."""
        if self.mask_token is None:
            weight = self.patch_embed.proj.weight
            token = torch.zeros(1, 1, self.embed_dim, device=weight.device, dtype=weight.dtype)
            self.mask_token = nn.Parameter(trunc_normal_(token, std=0.02))
        return self.mask_token

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward to trade compute for memory."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def set_fused_attn(self, enable: bool = True) -> None:
        """Switch every block between the SDPA path and the eager path."""
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.fused_attn = enable

    def no_weight_decay(self) -> set[str]:
        """fnmatch patterns of the >= 2-D parameters trained without weight decay (timm's optimizer factory).

        timm matches these against full parameter names; the leading `*` also covers a wrapper's prefix
        (`encoder.`, `module.`). Biases and other 1-D parameters (norms, q_bias, v_bias) are excluded by timm's
        1-D rule. The SwinV2 reference code means to exclude cpb_mlp and logit_scale but, through a name-prefix
        slip, decays them during pretraining, and timm's own swinv2 list (bare module names) never matches them:
        we exclude them.
        """
        return {"*absolute_pos_embed", "*mask_token", "*cpb_mlp.*", "*logit_scale"}

    def layer_id(self, name: str) -> int:
        """Layer id of a parameter for layer-wise lr decay (lr scale decay^(sum(depths) + 1 - id)).

        Patch embedding 0; block j of stage i -> sum(depths[:i]) + j + 1; a stage's patch merging shares the id
        of that stage's last block (stored as the start of the next stage, layers.{i+1}.downsample, so it gets
        sum(depths[:i+1])); everything else (final norm, head, absolute position embedding, mask token) the top
        id sum(depths) + 1.
        """
        if name.startswith("patch_embed."):
            return 0
        parts = name.split(".")
        if parts[0] == "layers":
            stage = int(parts[1])
            if parts[2] in ("blocks", "extra_norms"):
                return sum(self.depths[:stage]) + int(parts[3]) + 1
            if parts[2] == "downsample":
                return sum(self.depths[:stage])
        return sum(self.depths) + 1

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """Parameter name -> layer ordinal, for timm's group_parameters / param_groups_layer_decay.

        Fine: one id per block (see layer_id); every id from 0 to sum(depths) + 1 is used, so timm's renumbering
        keeps them. Coarse: the stem 0, stage i (with the merging that starts it) i + 1, the rest after.
        """
        if not coarse:
            return self.layer_id

        def stage_id(name: str) -> int:
            if name.startswith("patch_embed."):
                return 0
            parts = name.split(".")
            return int(parts[1]) + 1 if parts[0] == "layers" else len(self.depths) + 1

        return stage_id

    def check_input_size(self, size: Sequence[int]) -> None:
        """Raise ValueError unless an input of `size` (H, W) fits: divisible by patch_size * 2**(stages-1)."""
        size = tuple(size)
        reduction = self.patch_size * 2 ** (self.num_layers - 1)
        if size[0] % reduction or size[1] % reduction:
            raise ValueError(
                f"input size {size} must be divisible by patch_size * 2**(stages-1) = {reduction} on both axes; "
                f"resize or crop to e.g. {tuple(max(1, s // reduction) * reduction for s in size)}"
            )
        if size != self.img_size and self.absolute_pos_embed is not None:
            raise ValueError(
                f"input size {size} differs from img_size {self.img_size}, and the absolute position embedding "
                "(ape=True) is only defined at img_size; build the model for this size"
            )

    def _embed(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Patch embedding, mask tokens where `mask` (B, H/p, W/p) is 1, position embedding: (B, H/p, W/p, C)."""
        self.check_input_size(x.shape[-2:])
        x = self.patch_embed(x)  # B, H/p, W/p, C
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("a mask was given but the encoder has no mask token; call enable_mask_token()")
            w = mask.unsqueeze(-1).to(x.dtype)  # B, H/p, W/p, 1
            x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, H/r, W/r, C_last) after the final norm; `mask` (B, H/p, W/p) selects mask tokens.

        Any input size divisible by patch_size * 2**(stages-1) works (windows clipped and shift masks built for it,
        cached per size); the model's own img_size uses the tables built with it.
        """
        x = self.layers(self._embed(x, mask))
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        mask: torch.Tensor | None = None,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Feature maps of every stage (or of `indices`), timm's `forward_intermediates` contract.

        Args:
            x: images (B, C_in, H, W), any size divisible by patch_size * 2**(stages-1), square or not.
            indices: stages to return: None all, an int n the last n, a sequence those stage indices.
            norm: apply the final norm to the last stage's map (the only norm the encoder has, as in timm).
            stop_early: skip the stages after the last one asked for.
            output_fmt: NCHW (B, C_i, H_i, W_i) or NHWC.
            intermediates_only: return only the list.
            mask: optional SimMIM token mask (B, H/p, W/p).
        Returns:
            the list of maps (stage i: C_i = embed_dim * 2**i, H_i = H / (patch_size * 2**i)), or
            (final-normed last map NHWC, list) when not intermediates_only.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt={output_fmt!r} must be NCHW or NHWC")
        take, max_index = feature_take_indices(self.num_layers, indices)
        x = self._embed(x, mask)
        stages = self.layers[: max_index + 1] if stop_early else self.layers
        intermediates = []
        last = self.num_layers - 1
        for i, stage in enumerate(stages):
            x = stage(x)  # B, H_i, W_i, C_i
            if i in take:
                feat = self.norm(x) if norm and i == last else x
                intermediates.append(feat.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else feat)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if len(stages) == self.num_layers else x), intermediates

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """Channels and stride of each stage's map, as timm's feature_info lists them."""
        return [
            dict(num_chs=self.embed_dim * 2**i, reduction=self.patch_size * 2**i, module=f"layers.{i}")
            for i in range(self.num_layers)
        ]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool (B, H, W, C) features and classify."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> logits (B, num_classes), or pooled features when num_classes == 0."""
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------------------------
# named sizes

SWINV2_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    "huge": dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88), extra_norm_every=6),
    "giant": dict(embed_dim=512, depths=(2, 2, 42, 4), num_heads=(16, 32, 64, 128), extra_norm_every=6),
    # tiny sizes for tests and CPU runs
    "pico": dict(embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4)),
    "nano": dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)),
    "micro": dict(embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16)),
}


def create_swinv2(arch: str, **kwargs: Any) -> SwinTransformerV2:
    """Build a named size (see SWINV2_SIZES); keyword arguments override the size's values."""
    if arch not in SWINV2_SIZES:
        raise ValueError(f"unknown model size {arch!r}; choose one of {sorted(SWINV2_SIZES)}")
    return SwinTransformerV2(**{**SWINV2_SIZES[arch], **kwargs})


# ----------------------------------------------------------------------------------------------------------------
# timm interoperability

# derived tables: rebuilt from the window size, never carried between models
DERIVED_BUFFER_NAMES = ("relative_position_index", "relative_coords_table", "attn_mask", "k_bias")


def is_derived_buffer(key: str) -> bool:
    """True for keys of tables rebuilt from sizes (coords table, position index, shift mask, zero k bias)."""
    return key.rsplit(".", 1)[-1] in DERIVED_BUFFER_NAMES


def from_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a timm `swinv2_*` state dict to ours.

    The parameter layouts are the same by design; derived tables (which some timm versions and checkpoints carry)
    are dropped because ours are rebuilt from the window size.
    """
    return {key: value for key, value in state_dict.items() if not is_derived_buffer(key)}


def to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert our encoder or classifier state dict (or a whole SimMIM one) to timm's `swinv2_*` layout.

    SimMIM-only weights (mask token, decoder) and derived tables are dropped. timm's swinv2 has no absolute
    position embedding, so a model built with ape=True cannot be expressed there.
    """
    if any(key.startswith("encoder.") for key in state_dict):
        state_dict = {key[len("encoder.") :]: v for key, v in state_dict.items() if key.startswith("encoder.")}
    if "absolute_pos_embed" in state_dict:
        raise ValueError(
            "this encoder was built with ape=True (absolute position embedding), which timm's swinv2 lacks; "
            "only ape=False models convert to timm"
        )
    return {key: value for key, value in state_dict.items() if not is_derived_buffer(key) and key != "mask_token"}
