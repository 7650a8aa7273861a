"""The unCLIP decoder of SEED: stable-diffusion-2-1-unclip reimplemented in plain torch.

SEED (Ge et al., "Making LLaMA SEE and Draw with SEED Tokenizer", arXiv:2310.01218) draws an image by handing
its 1024-d image embedding to Stability AI's stable-diffusion-2-1-unclip (unCLIP: Ramesh et al. 2022,
arXiv:2204.06125, on latent diffusion: Rombach et al. 2022, arXiv:2112.10752). This file is that decoder:

  * the CLIP text side: OpenCLIP ViT-H's text tower cut at its penultimate layer (`CLIPTextEncoder`) and CLIP's
    byte-level BPE (`CLIPTokenizer`); SEED only ever encodes the empty prompt;
  * the noise schedules, the unCLIP noise augmentation of the image embedding (`ImageNoiseAugmentation`) and
    the samplers as pure functions of `model_fn(x, t)`: PLMS/PNDM (`pndm_sample`, the official scheduler, v-
    prediction, 21 model calls for 20 steps) and DDIM (`ddim_sample`, an alternative);
  * the UNet (`UNet` = diffusers' UNet2DConditionModel in the SD-2.1-unclip configuration: the image condition
    is a "projection" class embedding added to the time embedding) and the VAE decoder (`VAEDecoder`);
  * `UnCLIPDecoder`: embedding -> images exactly as SEED calls the official pipeline, with `from_official`
    (the diffusers folder on the hub) and `save_pretrained` / `from_pretrained` (our own checkpoints).
The same classes at the `tiny` preset (pixel space, 3 x 32 x 32, no VAE, no text) are train.py's decoder; its
resnets take the embedding as FiLM (diffusers' `resnet_time_scale_shift="scale_shift"`, also implemented here).

Mirrors: `AILab-CVC/SEED: models/pipeline_stable_unclip_img2img.py` (SEED's copy of diffusers'
StableUnCLIPImg2ImgPipeline, called by `models/seed_llama_tokenizer.py: ImageTokenizer.decode`) and diffusers
0.20.2 (`models/unet_2d_condition.py`, `unet_2d_blocks.py`, `resnet.py`, `attention.py`, `transformer_2d.py`,
`vae.py`, `schedulers/scheduling_pndm.py`, `scheduling_ddpm.py`), transformers `models/clip/modeling_clip.py`
and `tokenization_clip.py`. Module names follow those checkpoints, so the official keys load unchanged.

Deliberate deviations:
  * attention is `F.scaled_dot_product_attention` everywhere (diffusers' `upcast_attention` has no effect);
  * the sampler state stays fp32 when the networks run in fp16 (the official pipeline keeps it in fp16);
  * the VAE decodes one image at a time (the same output; a lower memory peak at 768 x 768);
  * only the decoder half of the VAE exists: SEED never encodes an image with it;
  * the tokenizer reproduces a subset of ftfy's text repair (see `CLIPTokenizer`).
"""
import html
import json
import math
import os
import re
import unicodedata
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file


# ==============================================================================================================
# Configs: the UNet, the VAE decoder, the CLIP text tower, and the decoder that holds them (+ presets)
# ==============================================================================================================


@dataclass
class UNetConfig:
    """UNet2DConditionModel as SD-2.1-unclip configures it (OFFICIAL_FORMATS.md §d); defaults = the official model."""
    in_channels: int = 4                                    # latent channels (3 for the tiny pixel-space model)
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    cross_attention: tuple[bool, ...] = (True, True, True, False)  # per level: CrossAttn{Down,Up}Block2D or plain
    mid_attention: bool = True                              # UNetMidBlock2DCrossAttn (True) or UNetMidBlock2D
    layers_per_block: int = 2                               # resnets per down block (up blocks have one more)
    attention_head_dim: tuple[int, ...] = (5, 10, 20, 20)   # diffusers' misnomer: the NUMBER of heads (size 64)
    cross_attention_dim: int = 1024                         # width of the text states (OpenCLIP-H)
    class_embed_dim: int = 2048                             # 2E: noised image embedding ++ noise-level embedding
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    sample_size: int = 96                                   # latent side: 96 * 8 = 768 px
    # How a resnet takes the time + image-condition embedding: "default" adds it after conv1 (SD-2.1-unclip);
    # "scale_shift" modulates norm2's output, h * (1 + scale) + shift (FiLM; diffusers' option of the same name).
    resnet_time_scale_shift: str = "default"

    # Every option of diffusers' config that this implementation does not generalise over, with the value it
    # implements; `from_diffusers` refuses a config that asks for anything else (absent keys take diffusers'
    # default, which is given second when it differs from what we need).
    FIXED = {"use_linear_projection": (True, False), "class_embed_type": ("projection", None),
             "flip_sin_to_cos": (True, True), "freq_shift": (0, 0), "act_fn": ("silu", "silu"),
             "transformer_layers_per_block": (1, 1),
             "only_cross_attention": (False, False), "dual_cross_attention": (False, False),
             "class_embeddings_concat": (False, False), "addition_embed_type": (None, None),
             "time_embedding_type": ("positional", "positional"), "center_input_sample": (False, False),
             "conv_in_kernel": (3, 3), "conv_out_kernel": (3, 3), "mid_block_scale_factor": (1, 1),
             "downsample_padding": (1, 1), "encoder_hid_dim": (None, None), "time_cond_proj_dim": (None, None),
             "num_class_embeds": (None, None), "time_embedding_dim": (None, None)}

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "UNetConfig":
        """Read diffusers' unet/config.json; raise on any option this implementation does not have."""
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}  # a live diffusers config has tuples
        bad = [f"{k}={cfg[k]!r} (need {want!r})" for k, (want, default) in cls.FIXED.items()
               if cfg.get(k, default) != want]
        down = cfg.get("down_block_types", [])
        cross = tuple(t == "CrossAttnDownBlock2D" for t in down)
        if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
            bad.append(f"down_block_types={down}")
        up = ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)]
        if cfg.get("up_block_types") != up:  # the up path must mirror the down path, as in every SD UNet
            bad.append(f"up_block_types={cfg.get('up_block_types')} (need {up})")
        mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"):
            bad.append(f"mid_block_type={mid!r}")
        shift = cfg.get("resnet_time_scale_shift", "default")
        if shift not in ("default", "scale_shift"):
            bad.append(f"resnet_time_scale_shift={shift!r} (need 'default' or 'scale_shift')")
        if bad:
            raise ValueError("unsupported UNet config: " + "; ".join(bad))
        # diffusers: `num_attention_heads = num_attention_heads or attention_head_dim` (the historical misnomer)
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        n = len(down)
        return cls(in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
                   block_out_channels=tuple(cfg["block_out_channels"]), cross_attention=cross,
                   mid_attention=mid == "UNetMidBlock2DCrossAttn", layers_per_block=cfg["layers_per_block"],
                   attention_head_dim=tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * n,
                   cross_attention_dim=cfg["cross_attention_dim"],
                   class_embed_dim=cfg["projection_class_embeddings_input_dim"],
                   norm_num_groups=cfg["norm_num_groups"], norm_eps=cfg["norm_eps"],
                   sample_size=cfg["sample_size"], resnet_time_scale_shift=shift)


@dataclass
class VAEConfig:
    """The decoder half of SD-2's AutoencoderKL (vae/config.json); defaults = the official model."""
    latent_channels: int = 4
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # encoder order; the decoder walks it backwards
    layers_per_block: int = 2                                   # the decoder has one more resnet per block
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215                             # latents are stored multiplied by this

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "VAEConfig":
        """Read diffusers' vae/config.json; raise on any option this implementation does not have."""
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}  # a live diffusers config has tuples
        n = len(cfg["block_out_channels"])
        want = {"act_fn": "silu", "up_block_types": ["UpDecoderBlock2D"] * n, "use_post_quant_conv": True,
                "mid_block_add_attention": True, "shift_factor": None, "latents_mean": None}
        bad = [f"{k}={cfg[k]!r} (need {v!r})" for k, v in want.items() if k in cfg and cfg[k] != v]
        if bad:
            raise ValueError("unsupported VAE config: " + "; ".join(bad))
        return cls(latent_channels=cfg["latent_channels"], out_channels=cfg["out_channels"],
                   block_out_channels=tuple(cfg["block_out_channels"]), layers_per_block=cfg["layers_per_block"],
                   norm_num_groups=cfg["norm_num_groups"], scaling_factor=cfg.get("scaling_factor", 0.18215))


@dataclass
class CLIPTextConfig:
    """The text tower of OpenCLIP ViT-H/14 cut at its penultimate layer, as SD-2 uses it (HF `CLIPTextModel`).

    Defaults = `stabilityai/stable-diffusion-2-1-unclip: text_encoder/config.json`: OpenCLIP has 24 layers, but
    diffusers' converter (`convert_from_ckpt.py: convert_open_clip_checkpoint`) drops the last one because SD-2
    conditions on the penultimate layer (`FrozenOpenCLIPEmbedder(layer="penultimate")`), then applies ln_final.
    """
    vocab_size: int = 49408
    context_length: int = 77  # positions; every prompt is padded / truncated to this
    width: int = 1024
    layers: int = 23
    heads: int = 16
    mlp_width: int = 4096
    layer_norm_eps: float = 1e-5
    # The activation is exact (erf) GELU, as OpenCLIP ViT-H; OpenAI's CLIP uses quick_gelu (not supported here).

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"CLIPTextConfig: width {self.width} is not divisible by heads {self.heads}")

    @classmethod
    def preset(cls, name: str) -> "CLIPTextConfig":
        """`sd21` (the official tower) or `tiny` (the shape of tests/fixtures/text_encoder, BPE of 1514 tokens)."""
        presets = {"sd21": {}, "tiny": dict(vocab_size=1514, width=32, layers=2, heads=2, mlp_width=128)}
        if name not in presets:
            raise ValueError(f"unknown CLIPTextConfig preset {name!r}; choices: {sorted(presets)}")
        return cls(**presets[name])

    @classmethod
    def from_hf(cls, hf: dict) -> "CLIPTextConfig":
        """Read a transformers `CLIPTextModel` config.json (as a dict); other keys of that file are not used."""
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"CLIP text config: hidden_act {hf['hidden_act']!r} is not supported (only exact 'gelu')")
        return cls(vocab_size=hf["vocab_size"], context_length=hf["max_position_embeddings"],
                   width=hf["hidden_size"], layers=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
                   mlp_width=hf["intermediate_size"], layer_norm_eps=hf.get("layer_norm_eps", 1e-5))


@dataclass
class DecoderConfig:
    """All components of the decoder. `vae=None` is pixel space (the sample is the image); `text=None` means no
    cross-attention anywhere, so no prompt states (the tiny model)."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig | None = field(default_factory=VAEConfig)
    text: CLIPTextConfig | None = field(default_factory=CLIPTextConfig)

    @property
    def embed_dim(self) -> int:  # E: the image embedding is half of the UNet's class label
        return self.unet.class_embed_dim // 2

    @classmethod
    def preset(cls, name: str) -> "DecoderConfig":
        if name not in DECODER_PRESETS:
            raise ValueError(f"unknown decoder preset {name!r}; choices: {sorted(DECODER_PRESETS)}")
        return DECODER_PRESETS[name]()

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        return cls(unet=_dataclass_from_dict(UNetConfig, d["unet"]),
                   vae=None if d["vae"] is None else _dataclass_from_dict(VAEConfig, d["vae"]),
                   text=None if d["text"] is None else _dataclass_from_dict(CLIPTextConfig, d["text"]))


DECODER_PRESETS = {
    "sd21-unclip": DecoderConfig,
    # Pixel space, 3 x 32 x 32, no VAE, no text: the shapes-world decoder of train.py (SHAPES_WORLD.md: channels
    # 16-32-64, one resnet per level, no attention). train.py sets class_embed_dim = 2E for its tokenizer's E.
    # FiLM resnets ("scale_shift"): with the official additive embedding this UNet drew every shape as a blob
    # (judged shape 0.43 after 1000 steps; 0.62 with FiLM, same steps).
    "tiny": lambda: DecoderConfig(
        unet=UNetConfig(in_channels=3, out_channels=3, block_out_channels=(16, 32, 64),
                        cross_attention=(False, False, False), mid_attention=False, layers_per_block=1,
                        attention_head_dim=(1, 1, 1), cross_attention_dim=0, class_embed_dim=256,
                        norm_num_groups=8, sample_size=32, resnet_time_scale_shift="scale_shift"),
        vae=None, text=None),
}


def _dataclass_from_dict(cls, d: dict):
    """Rebuild a config dataclass from its JSON form (lists back to tuples); unknown keys are an error."""
    names = {f.name for f in fields(cls)}
    if set(d) - names:
        raise ValueError(f"unknown {cls.__name__} fields in config.json: {sorted(set(d) - names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ==============================================================================================================
# Building blocks, bottom-up (diffusers models/embeddings.py, resnet.py, attention.py, transformer_2d.py)
# ==============================================================================================================


# The SD-2.1-unclip UNet is diffusers' UNet2DConditionModel in one configuration. Every module below is named as
# in the diffusers checkpoint (`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight`, ...), so the
# official keys load unchanged; the only renames are the legacy VAE attention names (see VAE_LEGACY_NAMES).

def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim).

    freq_i = exp(-ln(max_period) * i / (dim/2 - shift)), i < dim/2; the output is [cos(t f), sin(t f)] when
    `flip_sin_to_cos` (what SD-2 uses everywhere), else [sin, cos]. Mirrors diffusers
    `models/embeddings.py: get_timestep_embedding` (= ldm `timestep_embedding`), computed in fp32 in the same
    order so that the results agree bit for bit. Used by the UNet's `time_proj` (dim 320) and by the unCLIP
    noise augmentation (dim 1024, the noise level).
    """
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects a 1-D tensor of timesteps, got shape {tuple(t.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
    args = t[:, None].float() * torch.exp(exponent)[None, :]  # (B, 1) * (1, half) -> (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)],
                    dim=-1)
    if dim % 2:  # odd widths get one zero column, as in diffusers
        emb = F.pad(emb, (0, 1))
    return emb  # (B, dim)


class Attention(nn.Module):
    """Multi-head (cross-)attention with diffusers' names to_q/to_k/to_v/to_out.0, computed with SDPA.

    SDPA never materialises the (T, S) score matrix on CUDA (flash / memory-efficient kernels) and keeps the
    softmax in fp32 there, which is what diffusers' `upcast_attention` flag asked for by hand.
    """

    def __init__(self, dim: int, n_heads: int, context_dim: int | None = None, qkv_bias: bool = False):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"width {dim} is not divisible by {n_heads} heads")
        self.n_heads = n_heads
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, dim, bias=qkv_bias)
        # diffusers keeps [Linear, Dropout] here; the list makes the checkpoint key `to_out.0.weight`.
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, T, C = x.shape
        S, nh = context.shape[1], self.n_heads
        q = self.to_q(x).view(B, T, nh, C // nh).transpose(1, 2)        # (B, T, C) -> (B, nh, T, hs)
        k = self.to_k(context).view(B, S, nh, C // nh).transpose(1, 2)  # (B, S, Cc) -> (B, nh, S, hs)
        v = self.to_v(context).view(B, S, nh, C // nh).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)                     # softmax(q k^T / sqrt(hs)) v
        return self.to_out[0](y.transpose(1, 2).reshape(B, T, C))       # (B, nh, T, hs) -> (B, T, C)


class GEGLU(nn.Module):
    """proj: C -> 2 * 4C, then value * gelu(gate) (exact gelu): the feed-forward gate of SD's transformer."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # diffusers: hidden_states, gate (value first)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Indices mirror diffusers' `net` = [GEGLU, Dropout, Linear]: the checkpoint names net.0.proj and net.2.
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention to the text states, GEGLU feed-forward; all residual."""

    def __init__(self, dim: int, n_heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, n_heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """Transformer2DModel with linear proj_in/proj_out (`use_linear_projection`, the SD-2 variant), one block."""

    def __init__(self, channels: int, n_heads: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)  # eps 1e-6 here, 1e-5 in the resnets (as official)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, n_heads, context_dim)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, C, H, W) -> (B, HW, C)
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, HW, C) -> (B, C, H, W)
        return x + h


class ResnetBlock2D(nn.Module):
    """GN -> SiLU -> conv3x3 (+ projected time embedding) -> GN -> SiLU -> conv3x3, plus a (1x1) shortcut.

    With `scale_shift` the projected embedding is (scale, shift) instead, applied after the second GN:
    GN(h) * (1 + scale) + shift. A per-channel gain lets the condition switch features on and off, not only
    move them, which the tiny pixel decoder needs to draw shapes (train.py).
    """

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int | None, groups: int, eps: float,
                 scale_shift: bool = False):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        # the VAE has no time embedding
        self.time_emb_proj = nn.Linear(temb_ch, out_ch * (2 if scale_shift else 1)) if temb_ch else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        emb = None if self.time_emb_proj is None else self.time_emb_proj(F.silu(temb))[:, :, None, None]
        if emb is not None and not self.scale_shift:
            h = h + emb                                   # (B, C) -> (B, C, 1, 1): a bias per channel
        h = self.norm2(h)
        if emb is not None and self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)            # (B, 2C, 1, 1) -> 2 x (B, C, 1, 1)
            h = h * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (B, C, H, W) -> (B, C, H/2, W/2)


class Upsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # Nearest x2, or to `size` (the matching skip's size, which diffusers passes as `upsample_size` when a
        # side is not a multiple of 8 latents).
        x = F.interpolate(x, size=size, mode="nearest") if size else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


class SpatialSelfAttention(Attention):
    """The VAE's mid-block attention: GroupNorm, one head over all H*W positions, residual (eps 1e-6)."""

    def __init__(self, ch: int, groups: int):
        super().__init__(ch, n_heads=1, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)

    def forward(self, x: torch.Tensor, context: None = None) -> torch.Tensor:  # context: MidBlock's interface
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        h = super().forward(h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (`attention` > 0 heads) or DownBlock2D: resnets [+ transformers], then stride-2 conv.

    Returns the output and the skip tensors the up path will concatenate (one per resnet, plus the downsampled).
    """

    def __init__(self, in_ch, out_ch, temb_ch, n_layers, n_heads, context_dim, groups, eps, attention, downsample,
                 scale_shift=False):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch, groups, eps,
                                                    scale_shift) for i in range(n_layers)])
        self.attentions = nn.ModuleList([Transformer2D(out_ch, n_heads, context_dim, groups)
                                         for _ in range(n_layers)]) if attention else None
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)]) if downsample else None

    def forward(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D / UpBlock2D (UNet) and UpDecoderBlock2D (VAE, no skips, no time embedding).

    Resnet i takes the previous output concatenated with skip i (channel counts as in diffusers'
    `res_skip_channels`), then an optional transformer; then nearest x2 + conv3x3.
    """

    def __init__(self, in_chs, out_ch, temb_ch, n_heads, context_dim, groups, eps, attention, upsample,
                 scale_shift=False):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, out_ch, temb_ch, groups, eps, scale_shift) for c in in_chs])
        self.attentions = nn.ModuleList([Transformer2D(out_ch, n_heads, context_dim, groups)
                                         for _ in in_chs]) if attention else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, x, temb=None, context=None, skips=(), size=None):
        for i, resnet in enumerate(self.resnets):
            if skips:  # the UNet pops its skips newest first: (B, C, H, W) ++ (B, Cs, H, W) on channels
                x = torch.cat([x, skips[-1 - i]], dim=1)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution (UNetMidBlock2DCrossAttn, the VAE's UNetMidBlock2D);
    without attention a single resnet (the UNet's "UNetMidBlock2D", built with num_layers=0 by diffusers)."""

    def __init__(self, ch: int, temb_ch: int | None, groups: int, eps: float, attention: nn.Module | None,
                 scale_shift: bool = False):
        super().__init__()
        n = 1 if attention is None else 2
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb_ch, groups, eps, scale_shift) for _ in range(n)])
        self.attentions = nn.ModuleList([attention]) if attention is not None else None

    def forward(self, x, temb=None, context=None):
        x = self.resnets[0](x, temb)
        if self.attentions is not None:
            x = self.resnets[1](self.attentions[0](x, context), temb)
        return x


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear: diffusers' TimestepEmbedding, used for the time and the class ("projection")."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# ==============================================================================================================
# The UNet
# ==============================================================================================================


class UNet(nn.Module):
    """UNet2DConditionModel (diffusers models/unets/unet_2d_condition.py) for unCLIP: v = unet(x_t, t, text, label).

    emb = MLP(sinusoid(t)) + MLP(class_label): the image condition enters only through the time embedding that
    every resnet adds; the text (E("") for SEED) enters through the cross-attention of every transformer.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        cfg = self.config = config
        n = len(cfg.block_out_channels)
        if not (len(cfg.cross_attention) == len(cfg.attention_head_dim) == n):
            raise ValueError("block_out_channels, cross_attention and attention_head_dim need one entry per level")
        ch, temb, G, eps = cfg.block_out_channels, 4 * cfg.block_out_channels[0], cfg.norm_num_groups, cfg.norm_eps
        if cfg.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ValueError(f"resnet_time_scale_shift must be 'default' or 'scale_shift', "
                             f"got {cfg.resnet_time_scale_shift!r}")
        film = cfg.resnet_time_scale_shift == "scale_shift"
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)          # sinusoid(320) -> 1280
        self.class_embedding = TimestepEmbedding(cfg.class_embed_dim, temb)  # "projection": 2048 -> 1280
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], temb, cfg.layers_per_block, cfg.attention_head_dim[i],
                      cfg.cross_attention_dim, G, eps, cfg.cross_attention[i], downsample=i < n - 1,
                      scale_shift=film)
            for i in range(n))
        mid_attn = Transformer2D(ch[-1], cfg.attention_head_dim[-1], cfg.cross_attention_dim, G)
        self.mid_block = MidBlock(ch[-1], temb, G, eps, mid_attn if cfg.mid_attention else None, film)
        # Up level j mirrors down level i = n-1-j. Its skips, newest first, come from: the downsampler of level
        # i-1 (or conv_in) last, the resnets of level i before; diffusers' prev_output / res_skip channels.
        self.up_blocks = nn.ModuleList()
        prev = ch[-1]
        for j in range(n):
            i = n - 1 - j
            skip_chs = [ch[i]] * cfg.layers_per_block + [ch[max(i - 1, 0)]]
            in_chs = [(prev if k == 0 else ch[i]) + s for k, s in enumerate(skip_chs)]
            self.up_blocks.append(UpBlock(in_chs, ch[i], temb, cfg.attention_head_dim[i], cfg.cross_attention_dim,
                                          G, eps, cfg.cross_attention[i], upsample=j < n - 1, scale_shift=film))
            prev = ch[i]
        self.conv_norm_out = nn.GroupNorm(G, ch[0], eps=eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t, encoder_hidden_states: torch.Tensor | None,
                class_labels: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t int / (,) / (B,), text (B, 77, D) (None when no level has attention), label (B, 2E)."""
        cfg = self.config
        B = x.shape[0]
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet input must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if class_labels is None or class_labels.shape != (B, cfg.class_embed_dim):
            got = None if class_labels is None else tuple(class_labels.shape)
            raise ValueError(f"class_labels must be (B={B}, {cfg.class_embed_dim}) (the noised image embedding ++ "
                             f"its noise-level embedding), got {got}")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)  # a shared scalar or one per sample
        # time_proj: sinusoid(320, flip_sin_to_cos, shift 0) in fp32, then the module dtype (diffusers casts too)
        emb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0], True, 0.0).to(x.dtype))
        emb = emb + self.class_embedding(class_labels.to(x.dtype))   # (B, 1280): time + image condition
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, encoder_hidden_states)
            skips += block_skips
        h = self.mid_block(h, emb, encoder_hidden_states)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[-2:] if skips else None  # upsample to the next skip's size (odd sides)
            h = block(h, emb, encoder_hidden_states, block_skips, size)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


# ==============================================================================================================
# The VAE decoder
# ==============================================================================================================


class Decoder(nn.Module):
    """The VAE decoder (diffusers models/autoencoders/vae.py: Decoder): latent (B, 4, h, w) -> image (B, 3, 8h, 8w)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, G = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups   # (512, 512, 256, 128)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], None, G, 1e-6, SpatialSelfAttention(ch[0], G))
        self.up_blocks = nn.ModuleList(
            UpBlock([ch[max(j - 1, 0)]] + [ch[j]] * cfg.layers_per_block, ch[j], None, 1, None, G, 1e-6,
                    attention=False, upsample=j < len(ch) - 1)
            for j in range(len(ch)))
        self.conv_norm_out = nn.GroupNorm(G, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class VAEDecoder(nn.Module):
    """post_quant_conv + Decoder: the half of AutoencoderKL that unCLIP needs (`vae.decode(z)`)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.decoder = Decoder(config)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w), already divided by `scaling_factor` -> image in about [-1, 1] (B, 3, 8h, 8w).

        One image at a time: at 768x768 a single image's activations at full resolution are 128-256 channels
        x 768 x 768 (0.3 GB per fp16 tensor at the 256-channel input of the last block), so batching would
        multiply the peak; the mid attention over 96x96 = 9216 positions goes through SDPA, which on CUDA never
        builds the 9216^2 score matrix (170 MB per image in fp16).
        """
        return torch.cat([self.decoder(self.post_quant_conv(z[i:i + 1])) for i in range(z.shape[0])])


# ==============================================================================================================
# The text tower: OpenCLIP ViT-H's text encoder as SD-2 uses it (transformers `CLIPTextModel` layout)
# ==============================================================================================================


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention; q/k/v/out projections with bias (HF `CLIPAttention` names)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.heads = config.heads
        self.q_proj = nn.Linear(config.width, config.width)
        self.k_proj = nn.Linear(config.width, config.width)
        self.v_proj = nn.Linear(config.width, config.width)
        self.out_proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (proj(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # CLIP's text tower is causal; the SD pipelines pass no padding mask, so pad tokens are attended to and
        # their states (which the UNet cross-attends to as well) depend on the pad id.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, nh, T, hs) -> (B, T, C)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_width)
        self.fc2 = nn.Linear(config.mlp_width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU ("gelu" in the HF config)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEncoder(nn.Module):
    """ids (B, T<=77) -> last_hidden_state (B, T, D): the text conditioning of every UNet cross-attention.

    Module names follow transformers' `CLIPTextModel`, so the official `text_encoder/model.safetensors` loads
    without renaming: `text_model.embeddings.{token,position}_embedding`, `text_model.encoder.layers.N.*`,
    `text_model.final_layer_norm`. The ModuleDicts only reproduce that key layout (as nanoGPT's `transformer`).
    """

    # transformers <= 4.30 saved the (1, 77) int64 buffer `position_ids` = arange(77); we use arange directly.
    IGNORED_KEYS = ("text_model.embeddings.position_ids",)

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = nn.ModuleDict(dict(
            embeddings=nn.ModuleDict(dict(
                token_embedding=nn.Embedding(config.vocab_size, config.width),
                position_embedding=nn.Embedding(config.context_length, config.width),
            )),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.layers)))),
            final_layer_norm=nn.LayerNorm(config.width, eps=config.layer_norm_eps),
        ))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.shape[1] > self.config.context_length:
            raise ValueError(f"CLIPTextEncoder expects token ids of shape (B, T<={self.config.context_length}), "
                             f"got {tuple(ids.shape)}")
        emb = self.text_model["embeddings"]
        T = ids.shape[1]
        x = emb["token_embedding"](ids) + emb["position_embedding"].weight[:T]  # (B, T, D) + (T, D)
        for layer in self.text_model["encoder"]["layers"]:
            x = layer(x)
        # last_hidden_state includes final_layer_norm (= OpenCLIP ln_final applied to the penultimate layer)
        return self.text_model["final_layer_norm"](x)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP / GPT-2 byte-level alphabet: each of the 256 bytes gets a printable character.

    Printable Latin-1 bytes map to themselves; the other 68 (control characters, space, ...) are moved to
    U+0100 and up in byte order, so BPE never sees whitespace or control characters inside a token.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


# The subset of ftfy.fix_text (ftfy 6, default config) that we reproduce, as one translation table; see
# `CLIPTokenizer._clean`. Names in the comments are ftfy's fixers.
_HTML_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_FTFY_TRANSLATE = {
    # fix_c1_controls: C1 controls are Windows-1252 bytes read as Latin-1 (its 5 undefined bytes stay as they are)
    **{c: bytes([c]).decode("cp1252") for c in range(0x80, 0xA0) if c not in (0x81, 0x8D, 0x8F, 0x90, 0x9D)},
    # fix_latin_ligatures: typographic ligatures and legacy digraphs (not æ, œ, which are used on purpose)
    **{ord(c): unicodedata.normalize("NFKC", c) for c in "ﬀﬁﬂﬃﬄﬆĲĳŉǄǅǆǇǈǉǊǋǌǱǲǳ"}, ord("ﬅ"): "ſt",
    # fix_character_width: halfwidth / fullwidth forms to their normal forms, ideographic space to a space
    **{c: unicodedata.normalize("NFKC", chr(c)) for c in range(0xFF01, 0xFFF0)
       if unicodedata.normalize("NFKC", chr(c)) != chr(c)}, 0x3000: " ",
    # uncurl_quotes
    **{c: "'" for c in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)}, **{c: '"' for c in (0x201C, 0x201D, 0x201E, 0x201F)},
    # remove_control_chars: C0 controls other than \t \n \f \r, DEL, deprecated format characters, BOM, ...
    **{c: None for c in [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                         *range(0xFFF9, 0xFFFD)]},
}
# First alternatives of CLIP's pre-tokenizer regex; letter runs, single digits and symbol runs are scanned by hand
# in `_pre_tokenize`, because `\p{L}` / `\p{N}` need the third-party `regex` package.
# IGNORECASE as in the original: it lets "'ſ" (long s, from the ligature ﬅ) count as the contraction "'s".
_SPECIAL_OR_CONTRACTION = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d", re.IGNORECASE)


def _char_class(c: str) -> str:
    """'L' for a Unicode letter (\\p{L}), 'N' for a number (\\p{N}), ' ' for whitespace, else '.'."""
    if c.isspace():
        return " "
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "."


def _pre_tokenize(text: str) -> list[str]:
    """Split cleaned text like CLIP's regex `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|
    [^\\s\\p{L}\\p{N}]+`: the alternatives are tried in that order at each position, the runs are greedy."""
    pieces, i = [], 0
    while i < len(text):
        kind = _char_class(text[i])
        if kind == " ":
            i += 1
            continue
        m = _SPECIAL_OR_CONTRACTION.match(text, i)
        if m:
            j = m.end()
        elif kind == "N":
            j = i + 1  # digits are always single tokens
        else:
            j = i + 1
            while j < len(text) and _char_class(text[j]) == kind:
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every occurrence of `pair` in `symbols` by its concatenation, left to right (one BPE merge)."""
    out, i = [], 0
    while i < len(symbols):
        if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


class CLIPTokenizer:
    """CLIP's byte-level BPE, behaving like transformers' slow `CLIPTokenizer` as the SD-2 pipelines call it.

    Reads `vocab.json`, `merges.txt` and `special_tokens_map.json` of a diffusers `tokenizer/` folder. Steps:
      1. split the prompt on the special tokens of special_tokens_map.json (bos, eos, unk, pad); each one written in
         the text becomes its own id. SD-2's pad token is `!`, so every `!` of a prompt becomes id 0 (OpenCLIP's
         own tokenizer would merge `!!!` instead; the pipelines use the HF one, so we follow it);
      2. clean each remaining chunk: a subset of ftfy.fix_text (below), whitespace runs -> one space, strip,
         lower-case;
      3. pre-tokenize (words, single digits, symbol runs, English contractions), map bytes to the byte alphabet,
         apply the BPE merges in rank order, look the pieces up in the vocabulary;
      4. `__call__`: `<|startoftext|>` + at most 75 ids + `<|endoftext|>`, padded with the pad id to 77.

    Deliberate deviation: transformers runs the full `ftfy.fix_text`; we reproduce HTML-entity unescaping (off
    from the first line containing `<`, as ftfy's "auto" mode), C1 controls, Latin ligatures, character widths, curly
    quotes, control characters and NFC normalisation. ftfy's mojibake repair (`fix_encoding`, e.g. "Ã©" -> "é",
    a heuristic over several legacy codecs), terminal-escape removal and surrogate repair are not reproduced, so
    such prompts can tokenize differently. SEED only ever encodes the empty prompt.
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"CLIPTokenizer: {folder / name} is missing (need vocab.json, merges.txt, "
                                        "special_tokens_map.json)")
        self.vocab: dict[str, int] = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        self.inverse_vocab = {i: s for s, i in self.vocab.items()}
        lines = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")
        # line 0 is the "#version: 0.2" header; the rest are merges, most frequent first (rank = line order)
        self.merge_ranks = {tuple(line.split()): rank for rank, line in enumerate(lines[1:])}
        specials = json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8"))
        # entries are plain strings or AddedToken dicts {"content": ...}
        specials = {k: v["content"] if isinstance(v, dict) else v for k, v in specials.items()
                    if k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        for key in ("bos_token", "eos_token", "pad_token"):
            if specials.get(key) not in self.vocab:
                raise ValueError(f"CLIPTokenizer: {key} {specials.get(key)!r} of special_tokens_map.json is not in "
                                 "vocab.json")
        self.bos_id, self.eos_id, self.pad_id = (self.vocab[specials[k]] for k in ("bos_token", "eos_token",
                                                                                  "pad_token"))
        self.unk_id = self.vocab.get(specials.get("unk_token"), self.eos_id)
        self.context_length = 77
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        # longest first, so that the earliest and longest special token wins (transformers' trie does the same)
        self._special_split = re.compile("(" + "|".join(re.escape(s) for s in sorted(set(specials.values()),
                                                                                     key=len, reverse=True)) + ")")
        self._bpe_cache: dict[str, list[str]] = {}

    @staticmethod
    def _clean(text: str) -> str:
        """ftfy subset, whitespace clean-up, lower-case (transformers `CLIPTokenizer._tokenize` before the regex).

        Like ftfy, each line is fixed on its own, the fixes repeat until nothing changes ("&amp;lt;" -> "&lt;" ->
        "<"), and HTML entities are left alone from the first line that contains `<` on (it looks like HTML).
        """
        lines, unescape = text.split("\n"), True
        for k, line in enumerate(lines):
            unescape = unescape and "<" not in line
            while True:
                fixed = _HTML_ENTITY.sub(lambda m: html.unescape(m.group()), line) if unescape else line
                fixed = unicodedata.normalize("NFC", fixed.translate(_FTFY_TRANSLATE))
                if fixed == line:
                    break
                line = fixed
            lines[k] = line
        return re.sub(r"\s+", " ", "\n".join(lines)).strip().lower()

    def _bpe(self, word: str) -> list[str]:
        """Merge the characters of one pre-token, lowest rank first; the last symbol carries the `</w>` marker."""
        if word in self._bpe_cache:
            return self._bpe_cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda p: self.merge_ranks.get(p, math.inf))
            if best not in self.merge_ranks:
                break
            parts = merge_pair(parts, best)
        self._bpe_cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without `<|startoftext|>` / `<|endoftext|>` and without truncation."""
        ids = []
        # re.split with a capturing group: odd positions are the special tokens written in the prompt
        for k, chunk in enumerate(self._special_split.split(text)):
            if k % 2:
                ids.append(self.vocab[chunk])
                continue
            for piece in _pre_tokenize(self._clean(chunk)):
                if piece in ("<|startoftext|>", "<|endoftext|>"):  # e.g. "<|ENDOFTEXT|>", lower-cased above
                    ids.append(self.vocab.get(piece, self.unk_id))
                    continue
                word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
                ids.extend(self.vocab.get(p, self.unk_id) for p in self._bpe(word))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Ids -> text (special tokens dropped); `</w>` ends a word. Inverts `encode` up to the cleaning."""
        special = {self.bos_id, self.eos_id, self.pad_id}
        text = "".join(self.inverse_vocab[i] for i in ids if i not in special).replace("</w>", " ")
        # a literal space never occurs inside a token (byte 0x20 has its own character), so it is a word end
        data = bytes(0x20 if c == " " else self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Prompt(s) -> LongTensor (B, 77): bos, ids truncated to 75, eos, then the pad id (`!` = 0 for SD-2)."""
        if isinstance(texts, str):
            texts = [texts]
        n = self.context_length - 2
        rows = [[self.bos_id, *self.encode(t)[:n], self.eos_id] for t in texts]
        padded = [row + [self.pad_id] * (self.context_length - len(row)) for row in rows]
        return torch.tensor(padded, dtype=torch.long).view(len(texts), self.context_length)  # (B, 77), also B=0


# ==============================================================================================================
# Noise schedules (fp32, as diffusers computes them)
# ==============================================================================================================


# --- Noise schedules. Everything is indexed by the integer train timestep t in [0, 1000); alphas_cumprod[t] =
# ᾱ_t = ∏_{s<=t} (1 - β_s), and x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε. Computed in fp32 like diffusers, so that the
# sampler trajectories match its schedulers to ~1e-7 (float64 coefficients would move them by ~2e-6).

def scaled_linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ of SD's "scaled_linear" schedule: √β linear from √beta_start to √beta_end (the UNet's training noise)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def squaredcos_cap_v2_alphas_cumprod(num_train_timesteps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """ᾱ of the cosine schedule (Nichol & Dhariwal 2021, arXiv:2102.09672): the unCLIP image-embedding noiser.

    f(s) = cos²((s + 0.008) / 1.008 · π/2), β_i = min(1 - f((i+1)/T) / f(i/T), max_beta); the betas are formed in
    float64 and rounded to fp32 before the cumulative product (diffusers `betas_for_alpha_bar`).
    """
    def f(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def _at(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t per sample, cast to the sample dtype first (as diffusers does: in fp16, ᾱ_0 of the cosine schedule
    rounds to exactly 1), shaped (B, 1, ..., 1) to broadcast against `like`."""
    a = alphas_cumprod.to(device=like.device, dtype=like.dtype)[t]
    return a.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x_0): x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, t (B,) int (diffusers `DDPMScheduler.add_noise`)."""
    a = _at(alphas_cumprod, t, x0)
    return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The v-prediction target (Salimans & Ho 2022, arXiv:2202.00512): v = √ᾱ_t ε - √(1-ᾱ_t) x_0.

    SD-2 UNets predict v. Training a tiny one: t ~ U{0..999}, x_t = add_noise(x0, ε, t, ᾱ),
    loss = mse(unet(x_t, t, ...), v_target(x0, ε, t, ᾱ)) with ᾱ = scaled_linear_alphas_cumprod().
    """
    a = _at(alphas_cumprod, t, x0)
    return a ** 0.5 * noise - (1 - a) ** 0.5 * x0


# ==============================================================================================================
# unCLIP noise augmentation of the image embedding
# ==============================================================================================================


# --- unCLIP noise augmentation of the image embedding (diffusers `StableUnCLIPImg2ImgPipeline.noise_image_embeddings`
# with `image_normalizer` = StableUnCLIPImageNormalizer and `image_noising_scheduler` = DDPM squaredcos_cap_v2).

class ImageNoiseAugmentation(nn.Module):
    """Noise an image embedding to `noise_level` and append the level's sinusoidal embedding: (B, E) -> (B, 2E).

    Parameters `mean`, `std` (1, E) = the official `image_normalizer/diffusion_pytorch_model.safetensors` (same
    key names). For SD-2.1-unclip-h they are 0 and 1: the H config has no `clip_stats_path`.
    """

    def __init__(self, embedding_dim: int = 1024, num_train_timesteps: int = 1000):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.num_train_timesteps = num_train_timesteps
        self.mean = nn.Parameter(torch.zeros(1, embedding_dim))
        self.std = nn.Parameter(torch.ones(1, embedding_dim))

    def noise_image_embeddings(self, embeds: torch.Tensor, noise_level: int, noise: torch.Tensor | None = None,
                               generator: torch.Generator | None = None) -> torch.Tensor:
        """`noise` (B, E) gives the draw explicitly (reproducible runs); otherwise it is drawn with `generator`.

        Even at noise_level 0 this adds √(1-ᾱ_0) = 0.0064 times the noise in fp32 (ᾱ_0 rounds to 1 in fp16).
        """
        if embeds.ndim != 2 or embeds.shape[1] != self.embedding_dim:
            raise ValueError(f"image embeddings must have shape (B, {self.embedding_dim}), got {tuple(embeds.shape)}")
        if not 0 <= noise_level < self.num_train_timesteps:
            raise ValueError(f"noise_level must be in [0, {self.num_train_timesteps}), got {noise_level}")
        if noise is None:
            noise = torch.randn(embeds.shape, generator=generator, device=embeds.device, dtype=embeds.dtype)
        elif noise.shape != embeds.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != image embeddings shape {tuple(embeds.shape)}")
        levels = torch.full((embeds.shape[0],), noise_level, dtype=torch.long, device=embeds.device)
        # The schedule is recomputed per call (1000 floats) rather than kept as a buffer: a buffer would stay on
        # the meta device when the model is built there and loaded with assign=True.
        alphas_cumprod = squaredcos_cap_v2_alphas_cumprod(self.num_train_timesteps)
        x = (embeds - self.mean) / self.std  # image_normalizer.scale
        x = add_noise(x, noise, levels, alphas_cumprod)
        x = x * self.std + self.mean  # image_normalizer.unscale
        level_emb = timestep_embedding(levels, self.embedding_dim, flip_sin_to_cos=True, shift=0).to(x.dtype)
        return torch.cat([x, level_emb], dim=1)  # (B, E) ++ (B, E) -> (B, 2E)


# ==============================================================================================================
# Samplers: pure functions of `model_fn(x, t) -> v`
# ==============================================================================================================


# --- Samplers: pure functions over a `model_fn(x, t) -> v` (t a Python int; the function applies classifier-free
# guidance itself, see `classifier_free_guidance`), in the style of k-diffusion. `callback`, if given, receives
# dict(i=call index, t=timestep, x=sample after the update) after each model call.

def leading_timesteps(steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> list[int]:
    """The "leading" spacing of diffusers, descending: k · (T // steps) + steps_offset, k = steps-1 ... 0.
    20 steps -> [951, 901, ..., 51, 1]."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    ratio = num_train_timesteps // steps
    return [k * ratio + steps_offset for k in reversed(range(steps))]


def pndm_timesteps(steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> list[int]:
    """PNDM with skip_prk_steps: the leading timesteps with the second one repeated, so `steps` steps take
    `steps + 1` model calls (20 -> [951, 901, 901, 851, ..., 1]; 1 -> [1]). Mirrors
    `PNDMScheduler.set_timesteps`: cat(_t[:-1], _t[-2:-1], _t[-1:]) reversed, _t ascending."""
    ts = leading_timesteps(steps, num_train_timesteps, steps_offset)
    return ts[:1] + ts[1:2] + ts[1:] if steps > 1 else ts


def _pndm_transfer(x: torch.Tensor, v: torch.Tensor, a: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
    """One PNDM transfer step φ from ᾱ_t = a to ᾱ_prev = a' (Liu et al. 2022, arXiv:2202.09778, eq. 11), for a
    v-prediction (diffusers `PNDMScheduler._get_prev_sample`):
        ε  = √a · v + √(1-a) · x                          (v -> ε with the current sample)
        x' = √(a'/a) · x - (a' - a) · ε / (a √(1-a') + √(a (1-a) a'))
    """
    b, b_prev = 1 - a, 1 - a_prev
    eps = a ** 0.5 * v + b ** 0.5 * x
    denom = a * b_prev ** 0.5 + (a * b * a_prev) ** 0.5
    return (a_prev / a) ** 0.5 * x - (a_prev - a) * eps / denom


@torch.no_grad()
def pndm_sample(model_fn, x: torch.Tensor, steps: int = 20, alphas_cumprod: torch.Tensor | None = None,
                final_alpha_cumprod: torch.Tensor | None = None, steps_offset: int = 1, callback=None) -> torch.Tensor:
    """PLMS, the pseudo linear multistep sampler of PNDM (Liu et al. 2022, arXiv:2202.09778), for a v-prediction
    model: the official scheduler of stable-diffusion-2-1-unclip. Mirrors diffusers `PNDMScheduler.step_plms` with
    skip_prk_steps=True, timestep_spacing "leading", steps_offset=1, set_alpha_to_one=False.

    With δ = T // steps and the raw model outputs e_k (v, oldest first) the slope m used at call c is
        c = 0:  m = e_0                              (a plain step t -> t-δ; its result only feeds call 1)
        c = 1:  m = (v_1 + e_0) / 2, restarting from the sample of call 0, t+δ -> t   (a 2nd-order Heun-like step)
        then    m = (3 e_1 - e_0) / 2,  (23 e_2 - 16 e_1 + 5 e_0) / 12,
                m = (55 e_3 - 59 e_2 + 37 e_1 - 9 e_0) / 24   (Adams-Bashforth, last four outputs)
    and x <- φ(x, m, ᾱ_t, ᾱ_{t-δ}) (`_pndm_transfer`), with ᾱ_{<0} = `final_alpha_cumprod` (default ᾱ_0, since
    set_alpha_to_one=False). The multistep combination is formed from v, and converted to ε only afterwards.
    `x` is the initial noise (init_noise_sigma = 1); `alphas_cumprod` defaults to SD's scaled_linear schedule.
    """
    ac = (scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod).to(x.device)
    final = ac[0] if final_alpha_cumprod is None else final_alpha_cumprod.to(x.device).reshape(())
    delta = len(ac) // steps
    history: list[torch.Tensor] = []  # raw model outputs of the calls that count as steps (not call 1)
    x_first = x
    for i, t in enumerate(pndm_timesteps(steps, len(ac), steps_offset)):
        v = model_fn(x, t)
        if i == 1:  # the repeated timestep: redo the first step from its start, with the averaged slope
            m, x_from, t_from, t_to = (v + history[-1]) / 2, x_first, t + delta, t
        else:
            history = history[-3:] + [v]
            x_from, t_from, t_to = x, t, t - delta
            if i == 0:
                x_first, m = x, v
            elif len(history) == 2:
                m = (3 * history[-1] - history[-2]) / 2
            elif len(history) == 3:
                m = (23 * history[-1] - 16 * history[-2] + 5 * history[-3]) / 12
            else:
                m = (1 / 24) * (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4])
        x = _pndm_transfer(x_from, m, ac[t_from], ac[t_to] if t_to >= 0 else final)
        if callback is not None:
            callback(dict(i=i, t=t, x=x))
    return x


@torch.no_grad()
def ddim_sample(model_fn, x: torch.Tensor, steps: int = 20, alphas_cumprod: torch.Tensor | None = None,
                final_alpha_cumprod: torch.Tensor | None = None, steps_offset: int = 1, callback=None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0; Song et al. 2020, arXiv:2010.02502) for a v-prediction model, mirroring
    diffusers `DDIMScheduler.step` (leading spacing, steps_offset 1, set_alpha_to_one False, no clipping).

    A documented alternative: it needs one model call per step, but it is not the official unclip scheduler and
    gives different images than `pndm_sample`. With a = ᾱ_t, a' = ᾱ_{t-δ} (ᾱ_0 below 0):
        x̂_0 = √a · x - √(1-a) · v,   ε̂ = √a · v + √(1-a) · x,   x' = √a' · x̂_0 + √(1-a') · ε̂
    The callback also receives `denoised` = x̂_0.
    """
    ac = (scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod).to(x.device)
    final = ac[0] if final_alpha_cumprod is None else final_alpha_cumprod.to(x.device).reshape(())
    delta = len(ac) // steps
    for i, t in enumerate(leading_timesteps(steps, len(ac), steps_offset)):
        v = model_fn(x, t)
        a = ac[t]
        a_prev = ac[t - delta] if t - delta >= 0 else final
        x0 = a ** 0.5 * x - (1 - a) ** 0.5 * v
        eps = a ** 0.5 * v + (1 - a) ** 0.5 * x
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        if callback is not None:
            callback(dict(i=i, t=t, x=x, denoised=x0))
    return x


SAMPLERS = {"pndm": pndm_sample, "ddim": ddim_sample}  # name -> sampler; PNDM is the official one


def classifier_free_guidance(model_fn, guidance_scale: float):
    """Wrap a model over the doubled batch [uncond; cond] into a guided one: v = v_u + s (v_c - v_u).

    `model_fn(x2, t)` sees cat([x, x]) and must put the unconditional conditioning first (as the diffusers
    pipelines do); one batched call per step, then `chunk(2)`.
    """
    def guided(x: torch.Tensor, t: int) -> torch.Tensor:
        v_uncond, v_cond = model_fn(torch.cat([x, x]), t).chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)
    return guided


# ==============================================================================================================
# The pipeline: UnCLIPDecoder = text encoder + noise augmentation + UNet + sampler + VAE decoder
# ==============================================================================================================


class UnCLIPDecoder(nn.Module):
    """SEED's image decoder: a (B, E) image embedding -> images, as StableUnCLIPImg2ImgPipeline with
    `image_embeds` and no prompt (OFFICIAL_FORMATS.md §e, mirroring AILab-CVC/SEED
    models/pipeline_stable_unclip_img2img.py as `ImageTokenizer.decode` calls it)."""

    def __init__(self, config: DecoderConfig, clip_tokenizer: "CLIPTokenizer | None" = None):
        super().__init__()
        self.config = config
        u = config.unet
        if (any(u.cross_attention) or u.mid_attention) != (config.text is not None):
            raise ValueError("a UNet with cross-attention needs a text encoder config, and one without needs none")
        if config.text is not None and config.text.width != u.cross_attention_dim:
            raise ValueError(f"text width {config.text.width} != UNet cross_attention_dim "
                             f"{u.cross_attention_dim}")
        self.unet = UNet(u)
        self.vae = VAEDecoder(config.vae) if config.vae is not None else None
        self.text_encoder = CLIPTextEncoder(config.text) if config.text is not None else None
        self.clip_tokenizer = clip_tokenizer  # files, not weights: only used to encode the empty prompt
        # holds the official image_normalizer's mean/std (official_key renames the folder to this attribute)
        self.noise_augmentation = ImageNoiseAugmentation(config.embed_dim)

    # -- the steps of the official __call__, in order ------------------------------------------------------

    def prompt_states(self, n: int) -> torch.Tensor | None:
        """E(""): the text encoder's last_hidden_state of the empty prompt, (n, 77, D); the same for both CFG
        branches because SEED passes no prompt (prompt "" and negative prompt "")."""
        if self.text_encoder is None:
            return None
        if self.clip_tokenizer is None:
            raise ValueError("this decoder has a text encoder but no clip_tokenizer to encode the empty prompt")
        ids = self.clip_tokenizer("").to(self.unet.conv_in.weight.device)  # (1, 77): bos, eos, pad...
        return self.text_encoder(ids).expand(n, -1, -1)  # (1, 77, D) -> (n, 77, D)

    def class_labels(self, image_embeds: torch.Tensor, negative_image_embeds: torch.Tensor | None,
                     noise_level: int, noise: torch.Tensor, cfg: bool) -> torch.Tensor:
        """The UNet's class labels (2B, 2E) = cat([uncond, cond]) with CFG, else cond (B, 2E).

        cond = noise_augment(e) ++ sinusoid(noise_level). uncond = zeros over the WHOLE 2E label (also the
        noise-level half), as the official pipeline and the training-time label dropout; with negative
        embeddings it is their noise augmentation (SEED's pipeline copy), using the second noise draw.
        """
        augment = self.noise_augmentation.noise_image_embeddings
        cond = augment(image_embeds, noise_level, noise[0])
        if not cfg:
            return cond
        if negative_image_embeds is None:
            return torch.cat([torch.zeros_like(cond), cond])
        return torch.cat([augment(negative_image_embeds, noise_level, noise[1]), cond])

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Final sample -> images (B, 3, H, W) in about [-1, 1], unclamped; fp32."""
        if self.vae is None:
            return x.float()  # pixel space: the sample is the image
        return self.vae(x.to(self.unet.conv_in.weight.dtype) / self.vae.config.scaling_factor).float()

    @staticmethod
    def to_pil(images: torch.Tensor) -> list[Image.Image]:
        """(B, 3, H, W) in [-1, 1] -> PIL images, as VaeImageProcessor.postprocess(output_type="pil")."""
        images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # (B, C, H, W) -> (B, H, W, C)
        return [Image.fromarray(im) for im in (images * 255).round().astype("uint8")]

    @torch.no_grad()
    def __call__(self, image_embeds: torch.Tensor, negative_image_embeds: torch.Tensor | None = None,
                 steps: int = 20, guidance_scale: float = 10.0, noise_level: int = 0,
                 latents: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 seed: int | None = None, sampler: str = "pndm") -> list[Image.Image]:
        """image_embeds (B, E) -> B images (768 x 768 for the official model).

        `sampler`: "pndm" (the official PNDMScheduler) or "ddim" (deterministic DDIM over the same timesteps).
        `latents` (B, C, h, w) replaces the initial noise; `noise` (draws, B, E) replaces the noise-augmentation
        draws (draw 0 for image_embeds, draw 1 for negative_image_embeds). Whatever is not given is drawn on
        the CPU from `seed` (or the global RNG), in the official order: augmentation noise first, then latents.
        """
        e, neg = self._check_embeds(image_embeds, negative_image_embeds)
        B, E = e.shape
        u = self.config.unet
        device, dtype = self.unet.conv_in.weight.device, self.unet.conv_in.weight.dtype
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choices: {', '.join(SAMPLERS)}")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        draws = 1 if neg is None else 2
        if noise is None:
            noise = torch.randn(draws, B, E, generator=gen)
        elif tuple(noise.shape) != (draws, B, E):
            raise ValueError(f"noise must be (draws={draws}, B={B}, E={E}), got {tuple(noise.shape)}")
        if latents is None:
            latents = torch.randn(B, u.in_channels, u.sample_size, u.sample_size, generator=gen)
        elif latents.ndim != 4 or tuple(latents.shape[:2]) != (B, u.in_channels):
            raise ValueError(f"latents must be (B={B}, {u.in_channels}, h, w), got {tuple(latents.shape)}")
        for name, t in (("latents", latents), ("noise", noise)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} contains NaN or inf values")

        guided = guidance_scale > 1.0  # the official `do_classifier_free_guidance`
        labels = self.class_labels(e.to(device, dtype), None if neg is None else neg.to(device, dtype),
                                   noise_level, noise.to(device, dtype), guided)
        context = self.prompt_states(2 * B if guided else B)

        def model_fn(x: torch.Tensor, t: int) -> torch.Tensor:  # with CFG x is cat([x, x]): (2B, C, h, w)
            return self.unet(x.to(dtype), t, context, labels).float()

        if guided:  # one batched call per step on [uncond; cond], then v_u + s (v_c - v_u)
            model_fn = classifier_free_guidance(model_fn, guidance_scale)
        # The sampler state stays fp32 even when the UNet runs in fp16 (the official keeps it in fp16).
        x = SAMPLERS[sampler](model_fn, latents.to(device, torch.float32), steps)
        return self.to_pil(self.decode(x))

    def _check_embeds(self, e: torch.Tensor, neg: torch.Tensor | None):
        E = self.config.embed_dim
        for name, t in (("image_embeds", e), ("negative_image_embeds", neg)):
            if t is None:
                continue
            if t.ndim != 2 or t.shape[1] != E:
                raise ValueError(f"{name} must be (B, {E}) (this decoder's image-embedding width), "
                                 f"got {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} contains NaN or inf values")
        if neg is not None and neg.shape != e.shape:
            raise ValueError(f"negative_image_embeds {tuple(neg.shape)} must match image_embeds {tuple(e.shape)}")
        return e, neg

    # -- checkpoints ---------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> None:
        """config.json + model.safetensors (every component), and tokenizer/ when there is one; atomic."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / "config.json", lambda p: p.write_text(json.dumps(asdict(self.config), indent=1)))
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        _atomic_write(folder / "model.safetensors", lambda p: save_file(tensors, str(p)))
        if self.clip_tokenizer is not None:
            _save_clip_tokenizer(self.clip_tokenizer, folder / "tokenizer")

    @classmethod
    def from_pretrained(cls, folder: str | Path, device=None, dtype=None) -> "UnCLIPDecoder":
        """Read what save_pretrained wrote, strictly (every key present with its shape, nothing extra)."""
        folder = Path(folder)
        for name in ("config.json", "model.safetensors"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} not found (expected a folder written by save_pretrained)")
        config = DecoderConfig.from_dict(json.loads((folder / "config.json").read_text()))
        tokenizer = CLIPTokenizer(folder / "tokenizer") if (folder / "tokenizer").is_dir() else None
        device, dtype = _default_device_dtype(device, dtype)
        with torch.device("meta"):
            model = cls(config, tokenizer)
        _load_strict(model, _read_tensors(folder / "model.safetensors"), device, dtype)
        return model.eval()

    @classmethod
    def from_official(cls, folder: str | Path, device=None, dtype=None, variant: str | None = None
                      ) -> "UnCLIPDecoder":
        """Load `stabilityai/stable-diffusion-2-1-unclip` in its diffusers layout (OFFICIAL_FORMATS.md §d).

        Weights: `<name>[.<variant>].safetensors`, else `.bin` (variant "fp16" for the half-size files); both
        VAE attention namings. Built on the meta device and filled tensor by tensor, cast as it goes, so the
        peak memory is the model in `dtype` (default fp16 on CUDA, fp32 elsewhere).
        """
        folder = Path(folder)
        needed = [*OFFICIAL_COMPONENTS, "tokenizer", "scheduler", "image_noising_scheduler"]
        missing = [c for c in needed if not (folder / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"{folder} is not a stable-diffusion-2-1-unclip folder: missing {missing} "
                                    f"(expected {needed})")
        _check_official_schedulers(folder)
        config = DecoderConfig(unet=UNetConfig.from_diffusers(_read_json(folder / "unet" / "config.json")),
                               vae=VAEConfig.from_diffusers(_read_json(folder / "vae" / "config.json")),
                               text=CLIPTextConfig.from_hf(_read_json(folder / "text_encoder" / "config.json")))
        device, dtype = _default_device_dtype(device, dtype)
        with torch.device("meta"):
            model = cls(config, CLIPTokenizer(folder / "tokenizer"))

        def tensors():  # every official tensor under our names, minus the deliberately ignored ones
            for component, stems in OFFICIAL_COMPONENTS.items():
                for key, t in _read_tensors(_find_weights(folder / component, stems, variant)):
                    if (name := official_key(component, key)) is not None:
                        yield name, t

        _load_strict(model, tensors(), device, dtype)
        return model.eval()


# ==============================================================================================================
# Loaders: the official diffusers folder
# ==============================================================================================================


# The weight-holding folders of the diffusers layout and their file stems (tokenizer/ and the schedulers hold none).
OFFICIAL_COMPONENTS = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
                       "text_encoder": ("model", "pytorch_model"), "image_normalizer": ("diffusion_pytorch_model",)}

# Official tensors we deliberately do not load (the official pipeline does not use them either).
OFFICIAL_IGNORED = (
    "vae.encoder.",       # the VAE encoder: unCLIP decoding only ever decodes
    "vae.quant_conv.",    # the encoder's moment projection
    "text_encoder.text_model.embeddings.position_ids",  # arange(77) buffer saved by transformers <= 4.30
)

# Files written by diffusers < 0.18 (the official VAE, Mar 2023) name the VAE mid-block attention
# `query/key/value/proj_attn`; current diffusers (and this file) use `to_q/to_k/to_v/to_out.0`, the same
# Linear shapes (diffusers models/modeling_utils.py: _convert_deprecated_attention_blocks).
VAE_LEGACY_NAMES = {".attentions.0.query.": ".attentions.0.to_q.",
                    ".attentions.0.key.": ".attentions.0.to_k.",
                    ".attentions.0.value.": ".attentions.0.to_v.",
                    ".attentions.0.proj_attn.": ".attentions.0.to_out.0."}


def official_key(component: str, key: str) -> str | None:
    """Our state-dict name for tensor `key` of the official folder `component`, or None if deliberately ignored."""
    if component == "vae":
        for old, new in VAE_LEGACY_NAMES.items():
            key = key.replace(old, new)
    name = f"{'noise_augmentation' if component == 'image_normalizer' else component}.{key}"
    return None if name.startswith(OFFICIAL_IGNORED) else name


def _check_official_schedulers(folder: Path) -> None:
    """pndm_sample and noise_image_embeddings hard-code the official schedules: refuse a folder that differs."""
    want = {"scheduler": {"_class_name": "PNDMScheduler", "prediction_type": "v_prediction",
                          "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                          "num_train_timesteps": 1000, "skip_prk_steps": True, "steps_offset": 1,
                          "set_alpha_to_one": False},
            "image_noising_scheduler": {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2",
                                        "num_train_timesteps": 1000}}
    for name, values in want.items():
        path = folder / name / "scheduler_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        cfg = _read_json(path)
        bad = [f"{k}={cfg.get(k)!r} (need {v!r})" for k, v in values.items() if cfg.get(k, v) != v]
        if cfg.get("timestep_spacing", "leading") != "leading":
            bad.append(f"timestep_spacing={cfg['timestep_spacing']!r} (need 'leading')")
        if bad:
            raise ValueError(f"{path}: unsupported scheduler settings: {'; '.join(bad)}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return json.loads(path.read_text())


def _default_device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, dtype or (torch.float16 if device.type == "cuda" else torch.float32)


def _find_weights(component: Path, stems: tuple[str, ...], variant: str | None) -> Path:
    """diffusers' file choice: <stem>[.<variant>].safetensors first, then .bin."""
    names = [f"{stem}{'.' + variant if variant else ''}{ext}" for ext in (".safetensors", ".bin") for stem in stems]
    for name in names:
        if (component / name).is_file():
            return component / name
    raise FileNotFoundError(f"no weights in {component}: looked for {names}")


def _read_tensors(path: Path):
    """Yield (key, tensor) one at a time from memory-mapped safetensors or a torch .bin file."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    else:
        yield from torch.load(path, map_location="cpu", mmap=True, weights_only=True).items()


def _load_strict(model: nn.Module, tensors, device, dtype) -> None:
    """Fill a meta-device model from (key, tensor) pairs: every key present with its shape and nothing else,
    otherwise one error naming every problem. Floats are cast to `dtype` as they are read."""
    expected = model.state_dict()  # meta tensors: names and shapes only
    loaded, unexpected, mismatched = {}, [], []
    for key, t in tensors:
        if key not in expected:
            unexpected.append(key)
        elif t.shape != expected[key].shape:
            mismatched.append(f"{key}: file {tuple(t.shape)} vs model {tuple(expected[key].shape)}")
        else:
            loaded[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    missing = sorted(set(expected) - set(loaded))
    if missing or unexpected or mismatched:
        raise ValueError(f"checkpoint does not match the model: missing {missing}; unexpected {unexpected}; "
                         f"wrong shape {mismatched}")
    model.load_state_dict(loaded, strict=True, assign=True)


def _save_clip_tokenizer(tok: CLIPTokenizer, folder: Path) -> None:
    """Write the three files CLIPTokenizer reads, from its tables (merges in rank order)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tok.vocab, ensure_ascii=False), encoding="utf-8")
    merges = sorted(tok.merge_ranks, key=tok.merge_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    names = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.pad_id, "unk_token": tok.unk_id}
    (folder / "special_tokens_map.json").write_text(json.dumps({k: tok.inverse_vocab[i] for k, i in names.items()}))


def _atomic_write(path: Path, write) -> None:
    """write(tmp) then rename over `path`, so a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
