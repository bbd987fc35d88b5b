"""The U-Net both ways: `UNet2DModel` config ⇄ `UNetConfig`, and weights by name, strictly
(every tensor used once, every shape checked).

The two networks are the same DDPM U-Net — the DDPM configurations use TF-"SAME" downsampling
(``downsample_padding=0``), [sin, cos] embeddings with frequencies 10000^(−i/(d/2−1))
(``flip_sin_to_cos=False``, ``freq_shift=1``), single-head attention scaled by C^−½
(``attention_head_dim=None``) and GroupNorm ε = 1e-6 — so outputs agree to float rounding. Any
other setting is a ValueError that names the field.
"""

from __future__ import annotations

import inspect
import re

import torch
from diffusers import UNet2DModel

from ...unet import UNet, UNetConfig

# UNet2DModel settings fastddpm's UNet implements (it is the DDPM network), and only those.
_UNET_FIXED = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,  # [sin, cos]
    "freq_shift": 1,  # frequencies 10000^(-i/(d/2-1))
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_padding": 0,  # TF "SAME" for stride 2: pad right and bottom only
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "norm_eps": 1e-6,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
}
_DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
_UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")
_ATTENTION_LAYERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LIST_LIMIT = 10  # names listed per kind in a mapping error


def _with_defaults(cls, config) -> dict:
    """``config``'s fields over ``cls.__init__``'s defaults: the values diffusers builds ``cls`` with
    (it ignores unknown keys, and so do we)."""
    params = inspect.signature(cls.__init__).parameters
    values = {n: p.default for n, p in params.items() if n != "self" and p.default is not inspect.Parameter.empty}
    values.update({k: v for k, v in dict(config).items() if k in params})
    return values


def _unsupported(owner: str, name: str, value, supported) -> ValueError:
    return ValueError(f"{owner} {name}={value!r} is not supported by fastddpm (supported: {supported})")


def unet_config_from_diffusers(config) -> UNetConfig:
    """The `UNetConfig` of a `UNet2DModel` config (a dict, or ``model.config``), or a ValueError
    naming the first field fastddpm's UNet cannot express."""
    c = _with_defaults(UNet2DModel, config)
    for name, value in _UNET_FIXED.items():
        if c[name] != value:
            raise _unsupported("UNet2DModel", name, c[name], repr(value))
    down, up, widths = list(c["down_block_types"]), list(c["up_block_types"]), list(c["block_out_channels"])
    for name, types, allowed in (("down_block_types", down, _DOWN_TYPES), ("up_block_types", up, _UP_TYPES)):
        for block in types:
            if block not in allowed:
                raise _unsupported("UNet2DModel", name, block, " or ".join(allowed))
    if not len(down) == len(up) == len(widths) >= 1:
        raise ValueError(f"UNet2DModel needs as many down_block_types, up_block_types and block_out_channels, "
                         f"got {len(down)}, {len(up)} and {len(widths)}")
    attention = [block == "AttnDownBlock2D" for block in down]
    if [block == "AttnUpBlock2D" for block in up] != attention[::-1]:
        raise _unsupported("UNet2DModel", "up_block_types", up, "attention at the levels of down_block_types, mirrored")
    ch = widths[0]
    if any(not isinstance(w, int) or w % ch for w in widths):
        raise _unsupported("UNet2DModel", "block_out_channels", widths, "multiples of the first width")
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _unsupported("UNet2DModel", "sample_size", size, "square images")
        size = size[0]
    if not isinstance(size, int):
        raise _unsupported("UNet2DModel", "sample_size", size, "an int")
    head_dim = c["attention_head_dim"]
    attention_widths = {w for w, a in zip(widths, attention) if a} | {widths[-1]}  # the mid block attends too
    if head_dim is not None and attention_widths != {head_dim}:
        raise _unsupported("UNet2DModel", "attention_head_dim", head_dim,
                           f"None or the attention width (single-head attention over {sorted(attention_widths)} channels)")
    if c["time_embedding_dim"] not in (None, 4 * ch):
        raise _unsupported("UNet2DModel", "time_embedding_dim", c["time_embedding_dim"], f"None or {4 * ch}")
    if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
        raise _unsupported("UNet2DModel", "attn_norm_num_groups", c["attn_norm_num_groups"], "None or norm_num_groups")
    if c["out_channels"] not in (c["in_channels"], 2 * c["in_channels"]):
        raise _unsupported("UNet2DModel", "out_channels", c["out_channels"],
                           "in_channels, or twice it for a learned variance")
    embeds = c["num_class_embeds"]
    if embeds is not None and (isinstance(embeds, bool) or not isinstance(embeds, int) or embeds < 2):
        raise _unsupported("UNet2DModel", "num_class_embeds", embeds, "None or at least 2 (the last is the null class)")
    return UNetConfig(
        in_channels=c["in_channels"], resolution=size, ch=ch, ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=c["layers_per_block"], attn_resolutions=tuple(size >> i for i, a in enumerate(attention) if a),
        dropout=c["dropout"], groups=c["norm_num_groups"], learned_variance=c["out_channels"] == 2 * c["in_channels"],
        num_classes=0 if embeds is None else embeds - 1,
    )


def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """The `UNet2DModel` keyword arguments of the same network as ``cfg``. A class-conditional U-Net's
    K classes and null class are diffusers' K + 1 class embeddings (the last is the null class; so a
    diffusers model with M embeddings is fastddpm's M − 1 classes, its last label meaning "none")."""
    attention = [cfg.resolution >> i in cfg.attn_resolutions for i in range(len(cfg.ch_mult))]
    return {
        "sample_size": cfg.resolution, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
        "down_block_types": [_DOWN_TYPES[a] for a in attention], "up_block_types": [_UP_TYPES[a] for a in attention[::-1]],
        "attention_head_dim": None, "norm_num_groups": cfg.groups, "dropout": cfg.dropout,
        "num_class_embeds": cfg.num_classes + 1 if cfg.num_classes else None, **_UNET_FIXED,
    }


def _diffusers_name(name: str, levels: int) -> str:
    """The UNet2DModel state-dict name of fastddpm's parameter ``name``. fastddpm's up[i] mirrors
    down[i]; diffusers' up_blocks run deepest first, so up[i] is up_blocks[levels − 1 − i]."""
    if m := re.fullmatch(r"(down|up)\.(\d+)\.(blocks|attns)\.(\d+)\.(\w+)\.(weight|bias)", name):
        side, i, kind, j, layer, param = m.groups()
        block = f"{side}_blocks.{int(i) if side == 'down' else levels - 1 - int(i)}"
        if kind == "blocks":
            return f"{block}.resnets.{j}.{layer}.{param}"
        return f"{block}.attentions.{j}.{_ATTENTION_LAYERS[layer]}.{param}"
    if m := re.fullmatch(r"(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)", name):
        side, i, kind, param = m.groups()
        return f"{side}_blocks.{int(i) if side == 'down' else levels - 1 - int(i)}.{kind}rs.0.conv.{param}"
    if m := re.fullmatch(r"mid\.(block1|attn|block2)\.(\w+)\.(weight|bias)", name):
        part, layer, param = m.groups()
        if part == "attn":
            return f"mid_block.attentions.0.{_ATTENTION_LAYERS[layer]}.{param}"
        return f"mid_block.resnets.{int(part[-1]) - 1}.{layer}.{param}"
    top = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
           "class_embed": "class_embedding", "norm_out": "conv_norm_out", "conv_in": "conv_in", "conv_out": "conv_out"}
    module, param = name.rsplit(".", 1)
    return f"{top[module]}.{param}"


def _meta_unet(cfg: UNetConfig) -> UNet:
    with torch.device("meta"):
        return UNet(cfg)


def _name_map(cfg: UNetConfig) -> tuple[dict[str, str], dict[str, torch.Size]]:
    """(fastddpm name → diffusers name, fastddpm name → shape) for every tensor of UNet(cfg)."""
    state = _meta_unet(cfg).state_dict()
    names = {k: _diffusers_name(k, len(cfg.ch_mult)) for k in state}
    assert len(set(names.values())) == len(names), "the name map must be one-to-one"
    return names, {k: v.shape for k, v in state.items()}


def _listed(names) -> str:
    names = sorted(names)
    more = f", … and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else ""
    return ", ".join(names[:_LIST_LIMIT]) + more


def _renamed(state: dict, names: dict[str, str], shapes: dict[str, torch.Size], what: str) -> dict:
    """``state`` (keyed by the values of ``names``) keyed by the keys of ``names``, after checking that
    every tensor maps exactly once and has the shape its target needs."""
    missing = [source for source in names.values() if source not in state]
    unused = set(state) - set(names.values())
    wrong = [f"{source} {tuple(state[source].shape)} (needs {tuple(shapes[target])})"
             for target, source in names.items() if source in state and state[source].shape != shapes[target]]
    if missing or unused or wrong:
        problems = [f"{kind} ({len(items)}): {_listed(items)}"
                    for kind, items in (("missing", missing), ("unmapped", unused), ("wrong shape", wrong)) if items]
        raise ValueError(f"{what} does not map onto the U-Net: " + "; ".join(problems))
    return {target: state[source] for target, source in names.items()}


def _unet_from_state(cfg: UNetConfig, state: dict, what: str) -> UNet:
    """UNet(cfg) holding float32 copies of ``state`` (diffusers names), in eval mode."""
    names, shapes = _name_map(cfg)
    renamed = _renamed(state, names, shapes, what)
    model = _meta_unet(cfg)  # no initialisation: every tensor is assigned below
    model.load_state_dict({k: v.detach().to(torch.float32, copy=True) for k, v in renamed.items()}, assign=True)
    return model.eval()


def unet_from_diffusers(unet2d) -> UNet:
    """fastddpm's `UNet` with the weights of a diffusers `UNet2DModel` (copied, float32, eval mode,
    on the model's device)."""
    return _unet_from_state(unet_config_from_diffusers(unet2d.config), unet2d.state_dict(), "the UNet2DModel's state dict")


def unet_to_diffusers(unet: UNet) -> UNet2DModel:
    """A diffusers `UNet2DModel` with ``unet``'s weights (copied, eval mode, on ``unet``'s device)."""
    names, _ = _name_map(unet.config)
    inverse = {d: f for f, d in names.items()}
    state = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
    model = UNet2DModel(**diffusers_unet_config(unet.config))
    target = model.state_dict()
    renamed = _renamed(state, inverse, {d: target[d].shape for d in inverse if d in target}, "the UNet's state dict")
    if set(renamed) != set(target):  # the two architectures would have drifted apart
        raise ValueError(f"UNet2DModel tensors without a fastddpm counterpart: {_listed(set(target) - set(renamed))}")
    model.load_state_dict({k: v.clone() for k, v in renamed.items()})
    return model.to(unet.conv_in.weight.device).eval()
