"""Swin Transformer V2 (Liu et al., 2021, arXiv 2111.09883) as subclasses of timm's, which computes the paper's
function under our parameter names. Added: the SimMIM mask token, a fused SDPA attention path, the reference's window
clipping at any input size, the absolute position embedding, the huge / giant extra norms, the optimizer hooks."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import (
    calculate_drop_path_rates,
    gen_relative_log_coords,
    gen_relative_position_index,
    to_2tuple,
    trunc_normal_,
)
from timm.models import swin_transformer_v2 as timm_swinv2
from timm.models._features import feature_take_indices
from timm.models.swin_transformer_v2 import window_partition, window_reverse
from torch import nn

# exp(logit_scale) is clamped to 100, as in the paper's code
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)
# a shifted window adds this to logits between tokens from different image regions (the reference value, not -inf)
SHIFT_MASK_VALUE = -100.0

# derived tables for any window (timm builds them in its modules for the built window only)


def make_relative_coords_table(
    window_size: tuple[int, int], pretrained_window_size: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """timm's log-spaced CPB input table (2Wh-1, 2Ww-1, 2), offsets normalised by the pretrained window if given."""
    norm = pretrained_window_size if pretrained_window_size[0] > 0 else window_size
    # timm's function divides by (n - 1), 0 / 0 for a 1x1 window; its modules divide by max(n - 1, 1), which n = 2 gives
    norm = tuple(max(int(n), 2) for n in norm)
    return gen_relative_log_coords(tuple(window_size), norm)


def make_shift_attn_mask(
    feat_size: tuple[int, int], window_size: tuple[int, int], shift_size: tuple[int, int], device: Any = None
) -> torch.Tensor:
    """Additive mask for shifted windows, shape (nW, Wh*Ww, Wh*Ww): 0 within an image region, -100 across regions."""
    # timm's get_attn_mask is tied to the block's built window; inputs of other sizes need masks for other windows
    (H, W), (wh, ww), (sh, sw) = feat_size, window_size, shift_size
    region = torch.zeros(1, H, W, 1, device=device)
    label = 0
    # after the cyclic roll by -shift, the last windows mix tokens from the image's far edges: label the 3x3 regions
    for hs in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
        for ws in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
            region[:, hs, ws, :] = label
            label += 1
    region_windows = window_partition(region, window_size).reshape(-1, wh * ww)  # nW, N
    diff = region_windows[:, None, :] - region_windows[:, :, None]  # nW, N, N
    return torch.zeros_like(diff).masked_fill(diff != 0, SHIFT_MASK_VALUE)


def clip_window(
    feat_size: tuple[int, int], window_size: tuple[int, int], shifted: bool
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (window, shift) of a block on a feature map of `feat_size`, clipped as the reference clips."""
    # once the shorter side fits in the window: square windows of that side, unshifted, on both axes (timm clips each
    # axis on its own and keeps shifting the longer one); the pretrained window size is left as it was
    side = min(feat_size)
    if side <= max(window_size):
        window, shift = (side, side), (0, 0)
    else:
        window, shift = tuple(window_size), (window_size[0] // 2, window_size[1] // 2)
    if any(r % w for r, w in zip(feat_size, window)):
        raise ValueError(
            f"feature map {tuple(feat_size)} is not divisible by window {window}; choose the image size so that "
            "img_size / patch_size / 2**stage is a multiple of window_size on both axes (or give one window per stage)"
        )
    return window, shift if shifted else (0, 0)


def check_divisible_size(size: int | Sequence[int], patch_size: int, num_stages: int, name: str = "input_size") -> None:
    """Raise ValueError, naming `name` and the nearest fit, unless `size` divides by the last stage's stride."""
    reduction = patch_size * 2 ** (num_stages - 1)
    sides = (size, size) if isinstance(size, int) else tuple(size)
    if sides[0] % reduction or sides[1] % reduction:
        fits = [max(1, round(side / reduction)) * reduction for side in sides]
        suggestion = fits[0] if isinstance(size, int) else fits if isinstance(size, list) else tuple(fits)
        raise ValueError(
            f"{name}={size} must be divisible by patch_size * 2**(stages-1) = {reduction} (patch_size {patch_size}, "
            f"{num_stages} stages) on both sides; try {name}={suggestion}"
        )


class WindowAttention(timm_swinv2.WindowAttention):
    """timm's cosine window attention with the CPB, plus a fused SDPA path and windows other than the built one."""

    def __init__(
        self, dim: int, window_size: tuple[int, int], num_heads: int, fused_attn: bool = False, **kwargs: Any
    ) -> None:
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        super().__init__(dim, to_2tuple(window_size), num_heads, **kwargs)
        self.fused_attn = fused_attn
        # (coords table, index) of other windows (the model run at another input size), built once per window
        self._other_tables: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, window_size: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if window_size == self.window_size:
            return self.relative_coords_table, self.relative_position_index
        tables = self._other_tables.get(window_size)
        if tables is None or tables[0].device != device:
            table = make_relative_coords_table(window_size, self.pretrained_window_size).to(device)
            tables = self._other_tables[window_size] = (table, gen_relative_position_index(window_size, device=device))
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
        """x (B*nW, N, C), shift mask (nW, N, N) or None, the windows' size if not the built one -> (B*nW, N, C)."""
        B_, N, C = x.shape
        qkv_bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        q, k, v = qkv.view(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # each B*nW, heads, N, d
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        logit_scale = torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()  # heads, 1, 1
        bias = self.position_bias(window_size)  # heads, N, N
        if not self.fused_attn:  # timm's eager path (on the CPU masked SDPA is slower)
            attn = (q @ k.transpose(-2, -1)) * logit_scale + bias.unsqueeze(0)  # B*nW, heads, N, N
            if mask is not None:
                attn = attn.view(-1, mask.shape[0], self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            out = self.attn_drop(attn.view(-1, self.num_heads, N, N).softmax(dim=-1)) @ v  # B*nW, heads, N, d
        else:
            # the bias needs gradients, so SDPA's flash backend is out; the memory-efficient and cuDNN ones accept it
            q = q * logit_scale  # cosine logits scaled per head; SDPA then uses scale 1
            heads = self.num_heads
            attn_mask = bias.unsqueeze(0)  # 1, heads, N, N broadcast over windows
            if mask is not None:
                # fold windows into heads: one (nW*heads, N, N) mask broadcasts over the batch, not repeated B times
                heads = mask.shape[0] * self.num_heads
                attn_mask = (attn_mask + mask.unsqueeze(1)).reshape(1, heads, N, N)
                q, k, v = (t.reshape(-1, heads, N, t.shape[-1]) for t in (q, k, v))  # B, nW*heads, N, d
            dropout_p = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask.to(q.dtype), dropout_p=dropout_p, scale=1.0)
            out = out.view(B_, self.num_heads, N, -1)
        x = out.transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))


class SwinTransformerV2Block(timm_swinv2.SwinTransformerV2Block):
    """timm's res-post-norm block with the reference's window clipping, the fused attention and any map size."""

    def __init__(
        self, dim: int, input_resolution: tuple[int, int], num_heads: int, *, fused_attn: bool = False, **kwargs: Any
    ) -> None:
        # timm's keyword arguments (window_size, shift_size ...); fused_attn keyword-only: timm's 4th is the window
        super().__init__(dim, input_resolution, num_heads, **kwargs)
        # timm's block takes no attention class: its attention is replaced by the subclass (a build-time cost only)
        names = ("qkv_bias", "attn_drop", "proj_drop", "pretrained_window_size")
        attn_kwargs = {name: kwargs[name] for name in names if name in kwargs}
        self.attn = WindowAttention(dim, self.window_size, num_heads, fused_attn, **attn_kwargs)
        # (window, shift, shift mask) of other feature-map sizes (the model run at another input size)
        self._other_sizes: dict[tuple[int, int], tuple[tuple[int, int], tuple[int, int], torch.Tensor | None]] = {}

    def _calc_window_shift(
        self, target_window_size: int | tuple[int, int], target_shift_size: int | tuple[int, int] | None = None
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        # timm calls this with the unclipped window at build and from set_input_size: kept for other input sizes
        self.target_window_size = to_2tuple(target_window_size)
        shift = self.target_shift_size if target_shift_size is None else to_2tuple(target_shift_size)
        return clip_window(self.input_resolution, self.target_window_size, shifted=any(shift))

    def _geometry(self, feat_size: tuple[int, int], device: torch.device) -> tuple:
        # (window, shift, shift mask) of a map of feat_size: the built ones, or cached per size (timm pads instead)
        if feat_size == self.input_resolution:
            return self.window_size, self.shift_size, self.attn_mask
        geometry = self._other_sizes.get(feat_size)
        if geometry is None or (geometry[2] is not None and geometry[2].device != device):
            window, shift = clip_window(feat_size, self.target_window_size, shifted=any(self.target_shift_size))
            mask = make_shift_attn_mask(feat_size, window, shift, device) if any(shift) else None
            geometry = self._other_sizes[feat_size] = (window, shift, mask)
        return geometry

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape  # windows clipped for the actual H, W (no padding)
        window, shift, mask = self._geometry((H, W), x.device)
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = window_partition(x, window).view(-1, window[0] * window[1], C)  # B*nW, N, C
        windows = self.attn(windows, mask=mask, window_size=window)
        x = window_reverse(windows.view(-1, *window, C), window, (H, W))  # B, H, W, C
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x


class SwinTransformerV2Stage(timm_swinv2.SwinTransformerV2Stage):
    """timm's stage built from our blocks, plus SwinV2-H/G's main-branch LayerNorm after every `extra_norm_every`."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        downsample: bool = False,
        drop_path: Sequence[float] = (),
        extra_norm_every: int = 0,
        **block_kwargs: Any,
    ) -> None:
        # timm's stage builds the patch merging; its constructor takes no block class, so the blocks are built here
        super().__init__(dim, out_dim, input_resolution, 0, num_heads, window_size, downsample=downsample)
        self.depth = depth
        self.blocks = nn.ModuleList(
            SwinTransformerV2Block(
                out_dim, self.output_resolution, num_heads, window_size=window_size,
                shift_size=0 if j % 2 == 0 else window_size // 2, drop_path=drop_path[j] if drop_path else 0.0,
                **block_kwargs,
            )
            for j in range(depth)
        )  # fmt: skip
        # after blocks every-1, 2*every-1, ...: keyed by block index within the stage
        every = extra_norm_every or depth + 1
        self.extra_norms = nn.ModuleDict({str(j): nn.LayerNorm(out_dim) for j in range(every - 1, depth, every)})

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


class SwinTransformerV2(timm_swinv2.SwinTransformerV2):
    """Swin Transformer V2 encoder and classifier: timm's model, keyword names and all, with the module's additions.

    Args:
        pretrained_window_sizes: per stage, the window the CPB inputs are normalised by (the one pretraining used):
            how a model fine-tuned at a larger window inherits the pretrained position bias.
        fused_attn: SDPA or the eager path; None: SDPA on CUDA.
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
        window_size: int | Sequence[int] = 7,
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
        img_size = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
        num_stages = len(depths)
        check_divisible_size(img_size, patch_size, num_stages, name="img_size")
        pretrained_window_sizes = tuple(pretrained_window_sizes or (0,) * num_stages)
        windows = [window_size] * num_stages if isinstance(window_size, int) else [int(w) for w in window_size]
        per_stage = {"num_heads": num_heads, "window_size": windows, "pretrained_window_sizes": pretrained_window_sizes}
        for name, values in per_stage.items():
            if len(values) != num_stages:
                raise ValueError(f"{name}={list(values)} needs one entry per stage, as depths={list(depths)}")
        # timm builds the patch embedding (any input size), final norm, head and feature_info; its constructor
        # takes no stage class, so it is given no blocks and its stages are replaced by ours below
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            embed_dim=embed_dim, depths=(0,) * num_stages, num_heads=num_heads, window_size=windows,
            strict_img_size=False, drop_rate=drop_rate,
        )  # fmt: skip
        self.img_size, self.patch_size, self.depths = img_size, patch_size, tuple(depths)
        self.window_size, self.pretrained_window_sizes = window_size, pretrained_window_sizes
        grid = self.patch_embed.grid_size
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, *grid, embed_dim)) if ape else None
        self.register_parameter("mask_token", None)  # created by enable_mask_token() for SimMIM
        self.pos_drop = nn.Dropout(drop_rate)
        fused_attn = torch.cuda.is_available() if fused_attn is None else fused_attn
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages, resolution = [], grid
        for i in range(num_stages):
            stage = SwinTransformerV2Stage(
                embed_dim * 2 ** max(i - 1, 0), embed_dim * 2**i, resolution, depths[i], num_heads[i], windows[i],
                downsample=i > 0, drop_path=dpr[i], extra_norm_every=extra_norm_every,
                pretrained_window_size=pretrained_window_sizes[i], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, fused_attn=fused_attn,
            )  # fmt: skip
            stages.append(stage)
            resolution = stage.output_resolution
        self.layers = nn.Sequential(*stages)
        self.init_weights(needs_reset=False)  # timm's: trunc-normal Linear weights, zero biases, zero post-norms
        if self.absolute_pos_embed is not None:
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.set_grad_checkpointing(grad_checkpointing)

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

    def set_fused_attn(self, enable: bool = True) -> None:
        """Switch every block between the SDPA path and the eager path."""
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.fused_attn = enable

    def no_weight_decay(self) -> set[str]:
        """fnmatch patterns of the >= 2-D parameters without weight decay: timm's, ape and the mask token."""
        return {*super().no_weight_decay(), "*absolute_pos_embed", "*mask_token"}

    def layer_id(self, name: str) -> int:
        """Layer id for layer-wise lr decay: patch embedding 0, one per block, everything after the blocks top."""
        # block j of stage i: sum(depths[:i]) + j + 1; the merging stored as layers.{i+1}.downsample shares stage i's
        # last block's id (timm's group_matcher puts it with the next stage's blocks); every id from 0 to
        # sum(depths) + 1 is used, so timm's renumbering of the ordinals keeps them
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
        """Parameter name -> layer ordinal for timm's optimizer factory: layer_id, or coarse: one per stage."""
        if not coarse:
            return self.layer_id

        def stage_id(name: str) -> int:
            if name.startswith("patch_embed."):
                return 0
            parts = name.split(".")
            return int(parts[1]) + 1 if parts[0] == "layers" else len(self.depths) + 1

        return stage_id

    def _embed(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Patch embedding, mask tokens where `mask` (B, H/p, W/p) is 1, position embedding: (B, H/p, W/p, C)."""
        size = tuple(x.shape[-2:])
        check_divisible_size(size, self.patch_size, self.num_layers)
        if size != self.img_size and self.absolute_pos_embed is not None:
            raise ValueError(
                f"input size {size} differs from img_size {self.img_size}, and the absolute position embedding "
                "(ape=True) is only defined at img_size; build the model for this size"
            )
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
        """(B, C_in, H, W) of any fitting size -> (B, H/r, W/r, C_last) normed; `mask` (B, H/p, W/p) as in _embed."""
        return self.norm(self.layers(self._embed(x, mask)))

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
        """timm's stage feature maps at any fitting size, plus NHWC output (timm's: NCHW only) and a SimMIM mask."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt={output_fmt!r} must be NCHW or NHWC")
        take, max_index = feature_take_indices(self.num_layers, indices)
        x = self._embed(x, mask)
        stages = self.layers[: max_index + 1] if stop_early else self.layers
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)  # B, H_i, W_i, C_i
            if i in take:
                feat = self.norm(x) if norm and i == self.num_layers - 1 else x
                intermediates.append(feat.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else feat)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if len(stages) == self.num_layers else x), intermediates


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


def size_fields(
    arch: str, embed_dim: int | None = None, depths: Sequence[int] | None = None, num_heads: Sequence[int] | None = None
) -> dict[str, Any]:
    """embed_dim, depths and num_heads (as lists) as given, else the named size's: what a config leaves to its arch."""
    given = dict(embed_dim=embed_dim, depths=depths, num_heads=num_heads)
    values = {key: SWINV2_SIZES[arch][key] if value is None else value for key, value in given.items()}
    return {key: list(value) if isinstance(value, (list, tuple)) else value for key, value in values.items()}


def create_swinv2(arch: str, **kwargs: Any) -> SwinTransformerV2:
    """The SwinV2 of a named size (a key of SWINV2_SIZES) with keyword overrides; None sizes mean "from arch"."""
    if arch not in SWINV2_SIZES:
        raise ValueError(f"unknown model size {arch!r}; choose one of {sorted(SWINV2_SIZES)}")
    given = {key: value for key, value in kwargs.items() if value is not None or key not in SWINV2_SIZES[arch]}
    return SwinTransformerV2(**{**SWINV2_SIZES[arch], **given})


# timm interoperability: the layouts are the same, only derived tables and SimMIM-only weights differ


def is_derived_buffer(key: str) -> bool:
    """True for keys of tables rebuilt from sizes, never carried between models (and the zero k bias)."""
    return key.rsplit(".", 1)[-1] in ("relative_position_index", "relative_coords_table", "attn_mask", "k_bias")


def from_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm `swinv2_*` state dict as ours: the same, less the derived tables some checkpoints carry."""
    return {key: value for key, value in state_dict.items() if not is_derived_buffer(key)}


def to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our encoder or classifier state dict (or a SimMIM one, less mask token and decoder) in timm's layout."""
    if any(key.startswith("encoder.") for key in state_dict):
        state_dict = {key[len("encoder.") :]: v for key, v in state_dict.items() if key.startswith("encoder.")}
    for key in state_dict:
        if key == "absolute_pos_embed" or ".extra_norms." in key:
            raise ValueError(
                f"{key} has no place in timm's swinv2, which lacks the absolute position embedding (ape) and the "
                "huge / giant extra norms; export such a model in our layout (--format simmim)"
            )
    return {key: value for key, value in state_dict.items() if not is_derived_buffer(key) and key != "mask_token"}
