"""The DDPM U-Net noise-prediction network.

Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020
(arXiv:2006.11239), appendix B. This is a port of the reference implementation,
diffusion_tf/models/unet.py: a Wide-ResNet-style U-Net with GroupNorm, a sinusoidal
timestep embedding added inside every residual block, and single-head self-attention
at chosen resolutions. The same network is what diffusers' UNet2DModel builds for
google/ddpm-cifar10-32 (35,746,307 parameters).
"""

import math
from dataclasses import MISSING, asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import validate


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int
    resolution: int  # training image size; decides at which levels attention is placed
    ch: int
    ch_mult: tuple
    num_res_blocks: int
    attn_resolutions: tuple
    dropout: float = 0.0
    groups: int = 32  # GroupNorm groups
    learned_variance: bool = False  # also output per-pixel variance interpolation values
    num_classes: int = 0  # > 0: class-conditional, with one more "null" class (label num_classes) for no class

    def __post_init__(self):
        # accept lists (e.g. from JSON) but store tuples, so configs compare equal and hash
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        for name in ("in_channels", "resolution", "ch", "num_res_blocks", "groups"):
            validate.integer(name, getattr(self, name), 1)
        if not self.ch_mult:
            raise ValueError("ch_mult must be non-empty")
        for m in self.ch_mult:
            validate.integer("ch_mult", m, 1)
        for r in self.attn_resolutions:
            validate.integer("attn_resolutions", r, 1)
        if self.ch % 2 or self.ch < 4:
            raise ValueError(f"ch must be even and >= 4 (timestep embedding), got {self.ch}")
        for c in (self.ch, *(self.ch * m for m in self.ch_mult)):
            if c % self.groups:
                raise ValueError(f"groups={self.groups} must divide every width ch*ch_mult, got {c}")
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.resolution % factor:
            raise ValueError(f"resolution={self.resolution} must be divisible by 2**(levels-1) = {factor}")
        level_resolutions = [self.resolution >> i for i in range(len(self.ch_mult))]
        for r in self.attn_resolutions:
            if r not in level_resolutions:
                raise ValueError(f"attn_resolutions entry {r} is not a level resolution {level_resolutions}")
        validate.number("dropout", self.dropout, 0, 1, high_open=True)
        validate.integer("num_classes", self.num_classes, 0)
        if not isinstance(self.learned_variance, bool):
            raise ValueError(f"learned_variance must be true or false, got {self.learned_variance!r}")

    @property
    def out_channels(self):
        return 2 * self.in_channels if self.learned_variance else self.in_channels

    def to_dict(self):
        d = asdict(self)
        d["ch_mult"], d["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown UNetConfig keys {unknown}; known keys: {sorted(names)}")
        missing = sorted(f.name for f in fields(cls) if f.name not in d and f.default is MISSING)
        if missing:
            raise ValueError(f"missing UNetConfig keys {missing}")
        return cls(**d)


PRESETS = {
    # the paper's CIFAR-10 model (35.7M params)
    "ddpm-cifar10": UNetConfig(in_channels=3, resolution=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                               attn_resolutions=(16,), dropout=0.1),
    # the paper's 256x256 model (LSUN, CelebA-HQ)
    "ddpm-256": UNetConfig(in_channels=3, resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                           attn_resolutions=(16,), dropout=0.0),
    # small model for 8x8 grayscale digits (1.1M params): 0.19 s per training step at batch 128
    # on 2 CPU cores, against 0.36 s for ch 64 with mult (1, 2) (2.8M)
    "ddpm-digits": UNetConfig(in_channels=1, resolution=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                              attn_resolutions=(4,), dropout=0.0, groups=16),
    # for fast tests
    "ddpm-tiny": UNetConfig(in_channels=3, resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                            attn_resolutions=(8,), dropout=0.0, groups=8),
}


def _init(layer, zero=False):
    """The reference init: Xavier-uniform (TF fan_avg) weights, or zeros; zero bias."""
    if zero:
        nn.init.zeros_(layer.weight)
    else:
        nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _norm(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


def timestep_embedding(t, dim, dtype=torch.float32):
    """Sinusoidal embedding [B] -> [B, dim]: [sin(t*f), cos(t*f)], f_i = 10000^(-i/(dim/2-1))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=dtype) / (half - 1))
    args = t.to(dtype)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, in_ch, out_ch, temb_ch, dropout, groups):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = _init(nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.time_emb_proj = _init(nn.Linear(temb_ch, out_ch))
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _init(nn.Conv2d(out_ch, out_ch, 3, padding=1), zero=True)
        self.conv_shortcut = _init(nn.Conv2d(in_ch, out_ch, 1)) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.conv_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch, groups):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.q = _init(nn.Linear(ch, ch))
        self.k = _init(nn.Linear(ch, ch))
        self.v = _init(nn.Linear(ch, ch))
        self.proj_out = _init(nn.Linear(ch, ch), zero=True)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)[:, None]  # [B, 1 head, H*W, C]
        # 4-D: the flash and memory-efficient kernels take [B, heads, L, d] (3-D always ran the math path)
        h = F.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h))[:, 0]  # scale C^-0.5
        h = self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = _init(nn.Conv2d(ch, ch, 3, stride=2))

    def forward(self, x):
        # TF "SAME" padding for a stride-2 3x3 conv on even sizes pads only right/bottom
        # (diffusers: downsample_padding=0); needed to reproduce the released weights
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = _init(nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, config):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"config must be a UNetConfig, got {type(config).__name__}")
        self.config = cfg = config
        ch, temb_ch, levels = cfg.ch, 4 * cfg.ch, len(cfg.ch_mult)

        def block(cin, cout):
            return ResBlock(cin, cout, temb_ch, cfg.dropout, cfg.groups)

        def attn(c, res):
            return AttnBlock(c, cfg.groups) if res in cfg.attn_resolutions else nn.Identity()

        self.time_embed = nn.Sequential(_init(nn.Linear(ch, temb_ch)), nn.SiLU(), _init(nn.Linear(temb_ch, temb_ch)))
        # a class embedding added to the timestep embedding, as improved-diffusion's; row num_classes is the null class
        self.class_embed = nn.Embedding(cfg.num_classes + 1, temb_ch) if cfg.num_classes else None
        self.conv_in = _init(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))

        skip_chs, cur, res = [ch], ch, cfg.resolution  # channels of every skip connection
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.blocks, level.attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.blocks.append(block(cur, ch * mult))
                level.attns.append(attn(ch * mult, res))
                cur = ch * mult
                skip_chs.append(cur)
            if i != levels - 1:
                level.downsample = Downsample(cur)
                skip_chs.append(cur)
                res //= 2
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block1, self.mid.attn, self.mid.block2 = block(cur, cur), AttnBlock(cur, cfg.groups), block(cur, cur)

        # up[i] mirrors down[i]; it is run deepest level first
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            level = nn.Module()
            level.blocks, level.attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.blocks.append(block(cur + skip_chs.pop(), ch * mult))
                level.attns.append(attn(ch * mult, res))
                cur = ch * mult
            if i != 0:
                level.upsample = Upsample(cur)
                res *= 2
            self.up.insert(0, level)

        self.norm_out = _norm(cur, cfg.groups)
        self.conv_out = _init(nn.Conv2d(cur, cfg.out_channels, 3, padding=1), zero=True)

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        names = {f.name for f in fields(UNetConfig)}
        for key in overrides:
            if key not in names:
                raise ValueError(f"unknown override {key!r} for preset {name!r}; UNetConfig fields: {sorted(names)}")
        return cls(replace(PRESETS[name], **overrides))

    def forward(self, x, t, y=None):
        """Predict the noise in x [B, C, H, W] at integer (or float) timesteps t [B], of class y [B]
        (int64 labels in [0, num_classes]; num_classes is the null class, also what y=None means)."""
        cfg = self.config
        if x.ndim != 4:
            raise ValueError(f"x must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
        B, C, H, W = x.shape
        if C != cfg.in_channels:
            raise ValueError(f"x has {C} channels but the model has in_channels={cfg.in_channels}")
        factor = 2 ** (len(cfg.ch_mult) - 1)
        if H % factor or W % factor:
            raise ValueError(f"x height and width must be divisible by {factor}, got {H}x{W}")
        if t.shape != (B,):
            raise ValueError(f"t must have shape [B] = [{B}], got {tuple(t.shape)}")

        w = self.conv_in.weight  # embed in float64 for a float64 model, else float32
        temb = timestep_embedding(t, cfg.ch, torch.promote_types(w.dtype, torch.float32)).to(w.dtype)
        temb = self.time_embed(temb)
        if y is not None and self.class_embed is None:
            raise ValueError("y (class labels) was given to an unconditional U-Net (num_classes 0)")
        if self.class_embed is not None:
            if y is None:
                y = torch.full((B,), cfg.num_classes, dtype=torch.int64, device=x.device)
            elif not isinstance(y, torch.Tensor) or y.shape != (B,) or y.dtype != torch.int64:
                raise ValueError(f"y must be int64 class labels of shape [B] = [{B}], got "
                                 f"{tuple(getattr(y, 'shape', ()))} {getattr(y, 'dtype', type(y).__name__)}")
            temb = temb + self.class_embed(y)

        hs = [self.conv_in(x)]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                hs.append(attn(block(hs[-1], temb)))
            if hasattr(level, "downsample"):
                hs.append(level.downsample(hs[-1]))

        h = self.mid.block2(self.mid.attn(self.mid.block1(hs[-1], temb)), temb)

        for level in reversed(self.up):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), temb))
            if hasattr(level, "upsample"):
                h = level.upsample(h)

        return self.conv_out(F.silu(self.norm_out(h)))
