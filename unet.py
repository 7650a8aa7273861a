"""The unCLIP decoder of SEED: stable-diffusion-2-1-unclip reimplemented in plain torch.

SEED (Ge et al., "Making LLaMA SEE and Draw with SEED Tokenizer", arXiv:2310.01218) draws an image by handing
its 1024-d image embedding to Stability AI's stable-diffusion-2-1-unclip (unCLIP: Ramesh et al. 2022,
arXiv:2204.06125, on latent diffusion: Rombach et al. 2022, arXiv:2112.10752): a UNet whose image condition is a
"projection" class embedding added to the time embedding, a VAE decoder, OpenCLIP ViT-H's text tower (run once,
on the empty prompt), the unCLIP noise augmentation of the embedding, and the PNDM (official) or DDIM sampler;
at the `tiny` preset (pixel space, 3 x 32 x 32, no VAE, no text, FiLM resnets) the same classes are train.py's.

    decoder = UnCLIPDecoder.from_official("stable-diffusion-2-1-unclip")   # the diffusers folder
    images = decoder(image_embeds, steps=20, guidance_scale=10.0)          # (B, 1024) -> B PIL images, 768 x 768

Mirrors: AILab-CVC/SEED @ 93b3cf4 `models/pipeline_stable_unclip_img2img.py` (SEED's copy of diffusers'
StableUnCLIPImg2ImgPipeline, called by `models/seed_llama_tokenizer.py: ImageTokenizer.decode`); diffusers==0.39.0
`models/`: `unets/unet_2d_condition.py`, `unets/unet_2d_blocks.py`, `resnet.py`, `attention.py`, `embeddings.py`,
`transformers/transformer_2d.py`, `autoencoders/vae.py`, and `schedulers/scheduling_{pndm,ddim,ddpm}.py`;
transformers==4.57.6 `models/clip/modeling_clip.py`. Module names follow those checkpoints, so the official keys
load unchanged (all but the legacy VAE attention names, `VAE_LEGACY_NAMES`).

Deliberate deviations:
  * no text tokenizer: the empty prompt's 77 token ids are a constant (`empty_prompt_ids`);
  * attention is `F.scaled_dot_product_attention` everywhere (diffusers' `upcast_attention` has no effect);
  * the sampler state stays fp32 when the networks run in fp16 (the official pipeline keeps it in fp16);
  * the VAE decodes one image at a time (the same output; a lower memory peak at 768 x 768);
  * only the decoder half of the VAE exists: SEED never encodes an image with it.
"""
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import weights

# ---- 1. configs: the UNet, the VAE decoder, the text tower, and the decoder that holds them --------------------------
@dataclass
class UNetConfig:
    """UNet2DConditionModel as SD-2.1-unclip configures it; defaults = the official unet/config.json."""
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

    def __post_init__(self):
        n = len(self.block_out_channels)
        if not (len(self.cross_attention) == len(self.attention_head_dim) == n):
            raise ValueError("block_out_channels, cross_attention and attention_head_dim need one entry per level")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ValueError(f"resnet_time_scale_shift={self.resnet_time_scale_shift!r} (need 'default' or "
                             "'scale_shift')")

    # The options of diffusers' config that this implementation does not generalise over, with the one value it
    # implements: diffusers' default, except for the first two, which the config must therefore set.
    FIXED = dict(use_linear_projection=True, class_embed_type="projection", flip_sin_to_cos=True, freq_shift=0,
                 act_fn="silu", transformer_layers_per_block=1, only_cross_attention=False, dual_cross_attention=False,
                 class_embeddings_concat=False, addition_embed_type=None, time_embedding_type="positional",
                 center_input_sample=False, conv_in_kernel=3, conv_out_kernel=3, mid_block_scale_factor=1,
                 downsample_padding=1, encoder_hid_dim=None, time_cond_proj_dim=None, num_class_embeds=None,
                 time_embedding_dim=None)

    @classmethod
    def from_diffusers(cls, raw: dict) -> "UNetConfig":
        """Read diffusers' unet/config.json; raise on any option this implementation does not have."""
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in raw.items()}  # a live diffusers config has tuples
        bad = [f"{k}={cfg.get(k)!r} (need {want!r})" for k, want in cls.FIXED.items()
               if cfg.get(k, None if k in ("use_linear_projection", "class_embed_type") else want) != want]
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
        if bad:
            raise ValueError("unsupported UNet config: " + "; ".join(bad))
        # diffusers: `num_attention_heads = num_attention_heads or attention_head_dim` (the historical misnomer)
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        same = ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim", "norm_num_groups",
                "norm_eps", "sample_size")  # the fields that keep diffusers' names
        return cls(**{k: cfg[k] for k in same}, block_out_channels=tuple(cfg["block_out_channels"]),
                   cross_attention=cross, mid_attention=mid == "UNetMidBlock2DCrossAttn",
                   attention_head_dim=tuple(heads) if isinstance(heads, list) else (heads,) * len(down),
                   class_embed_dim=cfg["projection_class_embeddings_input_dim"],
                   resnet_time_scale_shift=cfg.get("resnet_time_scale_shift", "default"))

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
    def from_diffusers(cls, raw: dict) -> "VAEConfig":
        """Read diffusers' vae/config.json; raise on any option this implementation does not have."""
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in raw.items()}  # a live diffusers config has tuples
        want = dict(act_fn="silu", up_block_types=["UpDecoderBlock2D"] * len(cfg["block_out_channels"]),
                    use_post_quant_conv=True, mid_block_add_attention=True, shift_factor=None, latents_mean=None)
        bad = [f"{k}={cfg[k]!r} (need {v!r})" for k, v in want.items() if k in cfg and cfg[k] != v]
        if bad:
            raise ValueError("unsupported VAE config: " + "; ".join(bad))
        same = ("latent_channels", "out_channels", "layers_per_block", "norm_num_groups")
        return cls(**{k: cfg[k] for k in same}, block_out_channels=tuple(cfg["block_out_channels"]),
                   scaling_factor=cfg.get("scaling_factor", 0.18215))

@dataclass
class CLIPTextConfig:
    """The text tower of OpenCLIP ViT-H/14 cut at its penultimate layer, as SD-2 uses it (HF `CLIPTextModel`);
    defaults = stable-diffusion-2-1-unclip text_encoder/config.json. SD-2 conditions on the penultimate layer
    (`FrozenOpenCLIPEmbedder(layer="penultimate")`), so diffusers' converter (diffusers==0.39.0 pipelines/
    stable_diffusion/convert_from_ckpt.py: convert_open_clip_checkpoint) keeps 23 of the 24 layers, then ln_final.
    """
    vocab_size: int = 49408
    context_length: int = 77  # positions; every prompt is padded / truncated to this
    width: int = 1024
    layers: int = 23
    heads: int = 16
    mlp_width: int = 4096
    layer_norm_eps: float = 1e-5

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
        """The inverse of `asdict` (save_pretrained's config.json: lists back to tuples); unknown keys are an error."""
        def part(kind, values: dict | None):
            unknown = set(values or ()) - {f.name for f in fields(kind)}
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields in config.json: {sorted(unknown)}")
            return None if values is None else kind(**{k: tuple(v) if isinstance(v, list) else v
                                                       for k, v in values.items()})
        return cls(part(UNetConfig, d["unet"]), part(VAEConfig, d["vae"]), part(CLIPTextConfig, d["text"]))

# Bounds of the config.json values of the UNet, the VAE and the text tower, by our names and diffusers' /
# transformers' (weights.check_config): far beyond SD-2.1, tight enough that a damaged value is named before it
# allocates (a sample_size of 1e6 asks for terabytes).
CONFIG_LIMITS = {**dict.fromkeys(("in_channels", "out_channels", "latent_channels"), (1, 64)),
                 "cross_attention_dim": (0, 1 << 16),  # 0: no text, as the tiny decoder
                 **dict.fromkeys(("block_out_channels", "class_embed_dim", "width", "mlp_width",
                                  "projection_class_embeddings_input_dim", "hidden_size", "intermediate_size"),
                                 (1, 1 << 16)),
                 **dict.fromkeys(("layers_per_block", "layers", "num_hidden_layers"), (1, 256)),
                 **dict.fromkeys(("attention_head_dim", "num_attention_heads", "heads", "norm_num_groups"), (1, 1024)),
                 **dict.fromkeys(("norm_eps", "layer_norm_eps"), (1e-30, 1.0)), "sample_size": (1, 4096),
                 "scaling_factor": (1e-6, 1e3), "vocab_size": (1, 1 << 20),
                 **dict.fromkeys(("context_length", "max_position_embeddings"), (1, 1 << 16))}

DECODER_PRESETS = {
    "sd21-unclip": DecoderConfig,
    # Pixel space, 3 x 32 x 32, no VAE, no text: the shapes-world decoder train.py trains (channels 16-32-64, one
    # resnet per level, no attention); class_embed_dim 256 = 2E for seed.SeedConfig.preset("tiny")'s E = 128. FiLM
    # resnets ("scale_shift") because the condition must scale the features, not only shift them: a per-channel
    # gain can switch a shape's features on and off, while at this size SD-2.1's added bias draws every shape alike.
    "tiny": lambda: DecoderConfig(
        unet=UNetConfig(in_channels=3, out_channels=3, block_out_channels=(16, 32, 64),
                        cross_attention=(False, False, False), mid_attention=False, layers_per_block=1,
                        attention_head_dim=(1, 1, 1), cross_attention_dim=0, class_embed_dim=256,
                        norm_num_groups=8, sample_size=32, resnet_time_scale_shift="scale_shift"),
        vae=None, text=None),
}

# ---- 2. building blocks, bottom-up -----------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim): the UNet's `time_proj` (dim 320)
    and the unCLIP noise level (dim 1024). freq_i = 10000^(-i / (dim/2)), i < dim/2; the output is
    [cos(t f), sin(t f)] when `flip_sin_to_cos` (SD-2 everywhere), else [sin, cos]. Mirrors diffusers
    `models/embeddings.py: get_timestep_embedding` (freq shift 0), in fp32 in the same order, so bit for bit."""
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects a 1-D tensor of timesteps, got shape {tuple(t.shape)}")
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent)[None, :]  # (B, 1) * (1, half) -> (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)],
                    dim=-1)
    if dim % 2:  # odd widths get one zero column, as in diffusers
        emb = F.pad(emb, (0, 1))
    return emb  # (B, dim)

class Attention(nn.Module):
    """Multi-head (cross-)attention with diffusers' names to_q/to_k/to_v/to_out.0, computed with SDPA (which keeps
    the softmax in fp32 on CUDA: what diffusers' `upcast_attention` asked for by hand)."""

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

class FeedForward(nn.Module):
    """The GEGLU feed-forward of SD's transformer: C -> 2 * 4C, value * gelu(gate) (exact gelu), 4C -> C."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # diffusers' `net` = [GEGLU, Dropout, Linear]; the containers only give the checkpoint's net.0.proj, net.2
        self.net = nn.ModuleList([nn.ModuleDict(dict(proj=nn.Linear(dim, 2 * mult * dim))), nn.Identity(),
                                  nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.net[0]["proj"](x).chunk(2, dim=-1)  # diffusers: hidden_states, gate (value first)
        return self.net[2](value * F.gelu(gate))

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
    """GN -> SiLU -> conv3x3 (+ projected time embedding) -> GN -> SiLU -> conv3x3, plus a (1x1) shortcut. With
    `scale_shift` the projected embedding is (scale, shift) instead, applied after the second GN:
    GN(h) * (1 + scale) + shift (FiLM, the tiny preset: see DECODER_PRESETS)."""

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

class Resample2D(nn.Module):
    """Downsample2D (a stride-2 conv3x3) or Upsample2D (nearest x2, then a conv3x3)."""

    def __init__(self, ch: int, down: bool):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(ch, ch, 3, stride=2 if down else 1, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if not self.down:  # x2, or to `size`: the next skip's, which diffusers passes as `upsample_size` (odd sides)
            x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(x)  # down: (B, C, H, W) -> (B, C, H/2, W/2)

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
    """CrossAttnDownBlock2D (`attention`) or DownBlock2D: resnets [+ transformers], then a stride-2 conv; returns
    the output and the skip tensors the up path will concatenate (one per resnet, plus the downsampled)."""

    def __init__(self, in_ch, out_ch, temb_ch, n_layers, n_heads, context_dim, groups, eps, attention, downsample,
                 scale_shift=False):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch, groups, eps,
                                                    scale_shift) for i in range(n_layers)])
        self.attentions = nn.ModuleList([Transformer2D(out_ch, n_heads, context_dim, groups)
                                         for _ in range(n_layers)]) if attention else None
        self.downsamplers = nn.ModuleList([Resample2D(out_ch, down=True)]) if downsample else None

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
    """CrossAttnUpBlock2D / UpBlock2D (UNet) and UpDecoderBlock2D (VAE, no skips, no time embedding): resnet i
    takes the previous output ++ skip i (diffusers' `res_skip_channels`), [then a transformer]; then x2 + conv."""

    def __init__(self, in_chs, out_ch, temb_ch, n_heads, context_dim, groups, eps, attention, upsample,
                 scale_shift=False):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, out_ch, temb_ch, groups, eps, scale_shift) for c in in_chs])
        self.attentions = nn.ModuleList([Transformer2D(out_ch, n_heads, context_dim, groups)
                                         for _ in in_chs]) if attention else None
        self.upsamplers = nn.ModuleList([Resample2D(out_ch, down=False)]) if upsample else None

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

# ---- 3. the UNet -----------------------------------------------------------------------------------------------------
class UNet(nn.Module):
    """UNet2DConditionModel (diffusers models/unets/unet_2d_condition.py) for unCLIP: v = unet(x_t, t, text, label).
    emb = MLP(sinusoid(t)) + MLP(class_label): the image condition enters only through the time embedding that
    every resnet adds; the text (E("") for SEED) enters through the cross-attention of every transformer."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        cfg = self.config = config
        n = len(cfg.block_out_channels)
        ch, temb, G, eps = cfg.block_out_channels, 4 * cfg.block_out_channels[0], cfg.norm_num_groups, cfg.norm_eps
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
        # Up levels mirror down levels i = n-1 ... 0. Their skips, newest first, come from: the downsampler of level
        # i-1 (or conv_in) last, the resnets of level i before; diffusers' prev_output / res_skip channels.
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(n)):
            skip_chs = [ch[i]] * cfg.layers_per_block + [ch[max(i - 1, 0)]]
            in_chs = [(ch[min(i + 1, n - 1)] if k == 0 else ch[i]) + s for k, s in enumerate(skip_chs)]
            self.up_blocks.append(UpBlock(in_chs, ch[i], temb, cfg.attention_head_dim[i], cfg.cross_attention_dim,
                                          G, eps, cfg.cross_attention[i], upsample=i > 0, scale_shift=film))
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
        # time_proj: sinusoid(320) in fp32, then the module dtype (diffusers casts too)
        emb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0]).to(x.dtype))
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

# ---- 4. the VAE decoder ----------------------------------------------------------------------------------------------
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
        """Latents (B, 4, h, w), already divided by `scaling_factor` -> image in about [-1, 1] (B, 3, 8h, 8w). One
        image at a time: at 768 x 768 one image's full-resolution activations are 0.3 GB per fp16 tensor (256
        channels), and SDPA's CUDA kernels never build the mid attention's 9216^2 score matrix (170 MB in fp16)."""
        return torch.cat([self.decoder(self.post_quant_conv(z[i:i + 1])) for i in range(z.shape[0])])

# ---- 5. the text tower: OpenCLIP ViT-H's text encoder as SD-2 uses it (transformers `CLIPTextModel` layout) ----------
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

class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)), mlp = fc2(gelu(fc1(.)))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(config.width, config.mlp_width),  # HF's CLIPMLP names
                                      fc2=nn.Linear(config.mlp_width, config.width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        h = F.gelu(self.mlp["fc1"](self.layer_norm2(x)))  # exact erf GELU, as OpenCLIP ViT-H (OpenAI's: quick_gelu)
        return x + self.mlp["fc2"](h)

class CLIPTextEncoder(nn.Module):
    """ids (B, T<=77) -> last_hidden_state (B, T, D): the text conditioning of every UNet cross-attention.

    The ModuleDicts reproduce the key layout of transformers' `CLIPTextModel` (`text_model.encoder.layers.N.*`,
    ...; as nanoGPT's `transformer`), so the official `text_encoder/model.safetensors` loads without renaming.
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

def empty_prompt_ids(vocab_size: int = 49408, context_length: int = 77) -> list[int]:
    """The token ids of the empty prompt "", the only text SEED conditions on, as the SD-2 pipelines tokenize it
    (transformers' CLIPTokenizer, padding="max_length", max_length=77): <|startoftext|>, <|endoftext|>, then the
    pad token up to `context_length`. For stabilityai/stable-diffusion-2-1-unclip that is [49406, 49407] + [0] * 75
    (tokenizer/special_tokens_map.json: pad "!"; tokenizer/vocab.json: "<|startoftext|>": 49406, "<|endoftext|>":
    49407, "!": 0). A CLIP vocabulary lists the 256 byte symbols ("!" first), their "</w>" forms, one token per
    merge, then the two special tokens, so they are the last two ids of any vocabulary size (the reduced BPE of
    tests/fixtures/text_encoder/tokenizer, 1514 tokens: 1512, 1513, 0, ...).
    """
    return [vocab_size - 2, vocab_size - 1] + [0] * (context_length - 2)

# ---- 6. noise schedules ----------------------------------------------------------------------------------------------
# Everything is indexed by the integer train timestep t in [0, 1000); alphas_cumprod[t] =
# ᾱ_t = ∏_{s<=t} (1 - β_s), and x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε. Computed in fp32 like diffusers, so that the
# sampler trajectories match its schedulers to ~1e-7 (float64 coefficients would move them by ~2e-6).

def scaled_linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ of SD's "scaled_linear" schedule: √β linear from √beta_start to √beta_end (the UNet's training noise)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)

def squaredcos_cap_v2_alphas_cumprod(num_train_timesteps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """ᾱ of the cosine schedule (Nichol & Dhariwal 2021, arXiv:2102.09672), the unCLIP image-embedding noiser:
    f(s) = cos²((s + 0.008) / 1.008 · π/2), β_i = min(1 - f((i+1)/T) / f(i/T), max_beta); the betas are formed in
    float64 and rounded to fp32 before the cumulative product (diffusers `betas_for_alpha_bar`)."""
    def f(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)

def _alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t per sample, cast to the sample dtype first (as diffusers does: in fp16, ᾱ_0 of the cosine schedule
    rounds to exactly 1), shaped (B, 1, ..., 1) to broadcast against `like`."""
    a = alphas_cumprod.to(device=like.device, dtype=like.dtype)[t]
    return a.reshape(-1, *([1] * (like.ndim - 1)))

def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x_0): x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, t (B,) int (diffusers `DDPMScheduler.add_noise`)."""
    a = _alpha_bar(alphas_cumprod, t, x0)
    return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise

def v_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The target of SD-2's v-prediction UNets (Salimans & Ho 2022, arXiv:2202.00512): v = √ᾱ_t ε - √(1-ᾱ_t) x_0;
    training minimises mse(unet(add_noise(x0, ε, t, ᾱ), t, ...), v_target(x0, ε, t, ᾱ)), t ~ U{0..999}."""
    a = _alpha_bar(alphas_cumprod, t, x0)
    return a ** 0.5 * noise - (1 - a) ** 0.5 * x0

# ---- 7. unCLIP noise augmentation of the image embedding -------------------------------------------------------------
# diffusers==0.39.0 pipelines/stable_diffusion/pipeline_stable_unclip_img2img.py: `noise_image_embeddings`, with
# `image_normalizer` = StableUnCLIPImageNormalizer and `image_noising_scheduler` = DDPMScheduler, squaredcos_cap_v2.

class ImageNoiseAugmentation(nn.Module):
    """Noise an image embedding to `noise_level` and append the level's sinusoidal embedding: (B, E) -> (B, 2E).

    `mean`, `std` (1, E) = the official image_normalizer's tensors, 0 and 1 for SD-2.1-unclip-h (no clip_stats_path).
    """

    def __init__(self, embedding_dim: int = 1024, num_train_timesteps: int = 1000):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.num_train_timesteps = num_train_timesteps
        self.mean = nn.Parameter(torch.zeros(1, embedding_dim))
        self.std = nn.Parameter(torch.ones(1, embedding_dim))

    def noise_image_embeddings(self, embeds: torch.Tensor, noise_level: int, noise: torch.Tensor) -> torch.Tensor:
        """embeds (B, E) noised with the draw `noise` (B, E) to `noise_level`, ++ the level's embedding (B, E).
        Even at noise_level 0 this adds √(1-ᾱ_0) = 0.0064 times the noise in fp32 (ᾱ_0 rounds to 1 in fp16)."""

        if embeds.ndim != 2 or embeds.shape[1] != self.embedding_dim:
            raise ValueError(f"image embeddings must have shape (B, {self.embedding_dim}), got {tuple(embeds.shape)}")
        if not 0 <= noise_level < self.num_train_timesteps:
            raise ValueError(f"noise_level must be in [0, {self.num_train_timesteps}), got {noise_level}")
        if noise.shape != embeds.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != image embeddings shape {tuple(embeds.shape)}")
        levels = torch.full((embeds.shape[0],), noise_level, dtype=torch.long, device=embeds.device)
        # The schedule is recomputed per call (1000 floats) rather than kept as a buffer: a buffer would stay on
        # the meta device when the model is built there and loaded with assign=True.
        alphas_cumprod = squaredcos_cap_v2_alphas_cumprod(self.num_train_timesteps)
        x = (embeds - self.mean) / self.std  # image_normalizer.scale
        x = add_noise(x, noise, levels, alphas_cumprod)
        x = x * self.std + self.mean  # image_normalizer.unscale
        level_emb = timestep_embedding(levels, self.embedding_dim).to(x.dtype)
        return torch.cat([x, level_emb], dim=1)  # (B, E) ++ (B, E) -> (B, 2E)

# ---- 8. samplers -----------------------------------------------------------------------------------------------------
# Pure functions over a `model_fn(x, t) -> v` (t a Python int; guidance is the model's, see
# `classifier_free_guidance`), as in k-diffusion; `callback(dict(i=call index, t=timestep, x=sample after the
# update))` after each model call. The official scheduler settings: leading spacing, steps_offset 1,
# set_alpha_to_one False (ᾱ_0 stands in for ᾱ below t = 0).

def leading_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The "leading" spacing of diffusers, descending: k · (T // steps) + 1, k = steps-1 ... 0 (steps_offset 1).
    20 steps -> [951, 901, ..., 51, 1]."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    ratio = num_train_timesteps // steps
    return [k * ratio + 1 for k in reversed(range(steps))]

def pndm_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """PNDM with skip_prk_steps: the leading timesteps with the second one repeated, so `steps` steps take
    `steps + 1` model calls (20 -> [951, 901, 901, 851, ..., 1]; 1 -> [1]). Mirrors
    `PNDMScheduler.set_timesteps`: cat(_t[:-1], _t[-2:-1], _t[-1:]) reversed, _t ascending."""
    ts = leading_timesteps(steps, num_train_timesteps)
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
                callback=None) -> torch.Tensor:
    """PLMS, the pseudo linear multistep sampler of PNDM (Liu et al. 2022, arXiv:2202.09778) for a v-prediction
    model, the official scheduler of SD-2.1-unclip: diffusers `PNDMScheduler.step_plms` with skip_prk_steps=True.

    With δ = T // steps and the raw model outputs e_k (v, oldest first) the slope m used at call c is
        c = 0:  m = e_0                              (a plain step t -> t-δ; its result only feeds call 1)
        c = 1:  m = (v_1 + e_0) / 2, restarting from the sample of call 0, t+δ -> t   (a 2nd-order Heun-like step)
        then    m = (3 e_1 - e_0) / 2,  (23 e_2 - 16 e_1 + 5 e_0) / 12,
                m = (55 e_3 - 59 e_2 + 37 e_1 - 9 e_0) / 24   (Adams-Bashforth, last four outputs)
    and x <- φ(x, m, ᾱ_t, ᾱ_{t-δ}) (`_pndm_transfer`): the combination is formed from v, converted to ε only
    afterwards. `x` is the initial noise (init_noise_sigma = 1).
    """
    ac = (scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod).to(x.device)
    delta = len(ac) // steps
    history: list[torch.Tensor] = []  # raw model outputs of the calls that count as steps (not call 1)
    x_first = x
    for i, t in enumerate(pndm_timesteps(steps, len(ac))):
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
        x = _pndm_transfer(x_from, m, ac[t_from], ac[max(t_to, 0)])
        if callback is not None:
            callback(dict(i=i, t=t, x=x))
    return x

@torch.no_grad()
def ddim_sample(model_fn, x: torch.Tensor, steps: int = 20, alphas_cumprod: torch.Tensor | None = None,
                callback=None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0; Song et al. 2020, arXiv:2010.02502) for a v-prediction model, mirroring
    diffusers `DDIMScheduler.step` (no clipping).

    `UnCLIPDecoder(..., sampler="ddim")`: one model call per step, but not the official unclip scheduler, so
    other images than `pndm_sample` gives. With a = ᾱ_t, a' = ᾱ_{t-δ}:
        x̂_0 = √a · x - √(1-a) · v,   ε̂ = √a · v + √(1-a) · x,   x' = √a' · x̂_0 + √(1-a') · ε̂
    The callback also receives `denoised` = x̂_0.
    """
    ac = (scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod).to(x.device)
    delta = len(ac) // steps
    for i, t in enumerate(leading_timesteps(steps, len(ac))):
        v = model_fn(x, t)
        a, a_prev = ac[t], ac[max(t - delta, 0)]
        x0 = a ** 0.5 * x - (1 - a) ** 0.5 * v
        eps = a ** 0.5 * v + (1 - a) ** 0.5 * x
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        if callback is not None:
            callback(dict(i=i, t=t, x=x, denoised=x0))
    return x

SAMPLERS = {"pndm": pndm_sample, "ddim": ddim_sample}  # name -> sampler; PNDM is the official one

def classifier_free_guidance(model_fn, guidance_scale: float):
    """Wrap a model over the doubled batch [uncond; cond] into a guided one: v = v_u + s (v_c - v_u), with one
    batched call per step: `model_fn(x2, t)` sees cat([x, x]) and puts the unconditional conditioning first."""
    def guided(x: torch.Tensor, t: int) -> torch.Tensor:
        v_uncond, v_cond = model_fn(torch.cat([x, x]), t).chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)
    return guided

# ---- 9. the pipeline: UnCLIPDecoder = text encoder + noise augmentation + UNet + sampler + VAE decoder ---------------
class UnCLIPDecoder(nn.Module):
    """SEED's image decoder: a (B, E) image embedding -> images, as SEED's StableUnCLIPImg2ImgPipeline with
    `image_embeds` and no prompt. The only text it conditions on is the empty prompt, so the text encoder runs
    once, at construction and whenever weights are loaded (any `load_state_dict`), into the buffer
    `empty_prompt_states` E("") (not saved: it is recomputed from the text encoder's weights).
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        u = config.unet
        if (any(u.cross_attention) or u.mid_attention) != (config.text is not None):
            raise ValueError("a UNet with cross-attention needs a text encoder config, and one without needs none")
        if config.text is not None and config.text.width != u.cross_attention_dim:
            raise ValueError(f"text width {config.text.width} != UNet cross_attention_dim {u.cross_attention_dim}")
        self.unet = UNet(u)
        self.vae = VAEDecoder(config.vae) if config.vae is not None else None
        self.text_encoder = CLIPTextEncoder(config.text) if config.text is not None else None
        # holds the official image_normalizer's mean/std (official_key renames the folder to this attribute)
        self.noise_augmentation = ImageNoiseAugmentation(config.embed_dim)
        self.register_buffer("empty_prompt_states", None, persistent=False)  # E(""), (1, 77, D)
        if self.text_encoder is not None:
            # after every load_state_dict (also the assign=True of the loaders): E("") of the new weights
            self.register_load_state_dict_post_hook(UnCLIPDecoder._encode_after_load)
            self.encode_empty_prompt()

    @torch.no_grad()
    def encode_empty_prompt(self) -> None:
        """Run the text encoder on the empty prompt and keep its last_hidden_state (a meta tensor while the model
        is built on the meta device); call it again after changing the text encoder's weights in place."""
        text = self.config.text
        device = self.text_encoder.text_model["final_layer_norm"].weight.device
        ids = torch.tensor([empty_prompt_ids(text.vocab_size, text.context_length)], device=device)  # (1, 77)
        self.empty_prompt_states = self.text_encoder(ids)  # (1, 77, D)

    def _encode_after_load(self, incompatible_keys) -> None:  # a method, not a lambda, so the module still pickles
        self.encode_empty_prompt()

    # -- the steps of the official __call__, in order ------------------------------------------------------

    def prompt_states(self, n: int) -> torch.Tensor | None:
        """E("") for n samples, (n, 77, D), or None without a text tower; the same for both CFG branches because
        SEED passes no prompt (prompt "" and negative prompt "")."""
        states = self.empty_prompt_states
        return None if states is None else states.expand(n, -1, -1)  # (1, 77, D) -> (n, 77, D)

    def class_labels(self, image_embeds: torch.Tensor, negative_image_embeds: torch.Tensor | None,
                     noise_level: int, noise: torch.Tensor, guided: bool) -> torch.Tensor:
        """The UNet's class labels: (2B, 2E) = cat([uncond, cond]) when `guided` (CFG), else cond (B, 2E).
        cond = noise_augment(e) ++ sinusoid(noise_level). uncond = zeros over the WHOLE 2E label (also the
        noise-level half), as the official pipeline and the training-time label dropout; with negative
        embeddings it is their noise augmentation (SEED's pipeline copy), using the second noise draw."""
        augment = self.noise_augmentation.noise_image_embeddings
        cond = augment(image_embeds, noise_level, noise[0])
        if not guided:
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
    def __call__(self, image_embeds: torch.Tensor, negative_image_embeds: torch.Tensor | None = None, steps: int = 20,
                 guidance_scale: float = 10.0, noise_level: int = 0, latents: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None, seed: int | None = None, sampler: str = "pndm") -> list:
        """image_embeds (B, E) -> B PIL images (768 x 768 for the official model).

        `sampler`: "pndm" (the official PNDMScheduler) or "ddim" (deterministic DDIM over the same timesteps).
        `latents` (B, C, h, w) replaces the initial noise; `noise` (draws, B, E) replaces the noise-augmentation
        draws (draw 0 for image_embeds, draw 1 for negative_image_embeds). Whatever is not given is drawn on
        the CPU from `seed` (or the global RNG), in the official order: augmentation noise first, then latents.
        """
        e, neg = self._check_embeds(image_embeds, negative_image_embeds)
        B = e.shape[0]
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choices: {', '.join(SAMPLERS)}")
        noise, latents = self._draw_noise(B, 1 if neg is None else 2, noise, latents, seed)
        device, dtype = self.unet.conv_in.weight.device, self.unet.conv_in.weight.dtype
        guided = guidance_scale > 1.0  # the official `do_classifier_free_guidance`
        labels = self.class_labels(e.to(device, dtype), None if neg is None else neg.to(device, dtype),
                                   noise_level, noise.to(device, dtype), guided)
        context = self.prompt_states(2 * B if guided else B)

        def model_fn(x: torch.Tensor, t: int) -> torch.Tensor:  # with CFG x is cat([x, x]): (2B, C, h, w)
            return self.unet(x.to(dtype), t, context, labels).float()

        if guided:
            model_fn = classifier_free_guidance(model_fn, guidance_scale)
        x = SAMPLERS[sampler](model_fn, latents.to(device, torch.float32), steps)  # fp32 state (see the header)
        return self.to_pil(self.decode(x))

    def _draw_noise(self, B: int, draws: int, noise: torch.Tensor | None, latents: torch.Tensor | None,
                    seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmentation noise (draws, B, E) and the initial latents (B, C, h, w), checked or drawn."""
        E, u = self.config.embed_dim, self.config.unet
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
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
        return noise, latents

    def _check_embeds(self, e: torch.Tensor, neg: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        E = self.config.embed_dim
        for name, t in (("image_embeds", e), ("negative_image_embeds", neg)):
            if t is not None and (t.ndim != 2 or t.shape[1] != E):
                raise ValueError(f"{name} must be (B, {E}) (the decoder's embedding width), got {tuple(t.shape)}")
            if t is not None and not torch.isfinite(t).all():
                raise ValueError(f"{name} contains NaN or inf values")
        if neg is not None and neg.shape != e.shape:
            raise ValueError(f"negative_image_embeds {tuple(neg.shape)} must match image_embeds {tuple(e.shape)}")
        return e, neg

    # -- checkpoints ---------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> None:
        """config.json + model.safetensors (every component; not E(""), which loading recomputes); atomic."""
        folder = Path(folder)
        weights.write_json(folder / "config.json", asdict(self.config))
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        weights.atomic_write(folder / "model.safetensors", lambda p: save_file(tensors, str(p)))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device=None, dtype: torch.dtype | None = None) -> "UnCLIPDecoder":
        """Read what save_pretrained wrote, strictly (every key present with its shape, nothing extra); `device`,
        `dtype` default as in `from_official`."""
        folder = Path(folder)
        for name in ("config.json", "model.safetensors"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} not found (expected a folder written by save_pretrained)")
        raw = weights.read_config(folder / "config.json")
        for part in ("unet", "vae", "text"):
            weights.check_config(raw.get(part) or {}, CONFIG_LIMITS, f"{folder / 'config.json'} ({part})")
        config = DecoderConfig.from_dict(raw)
        path = folder / "model.safetensors"
        header = weights.read_header(path)
        device = weights.pick_device(device)
        dtype = dtype or weights.pick_dtype(device, weights.stored_dtype(header))
        with torch.device("meta"):
            model = cls(config)
        weights.check_keys(weights.shapes(model), {k: shape for k, (shape, _) in header.items()}, str(path),
                           what="the decoder")
        return weights.assign(model, weights.read_weights(path, device=device, dtype=dtype), device, dtype, str(path))

    @classmethod
    def from_official(cls, folder: str | Path, device=None, dtype: torch.dtype | None = None,
                      variant: str | None = None) -> "UnCLIPDecoder":
        """Load `stabilityai/stable-diffusion-2-1-unclip` in its diffusers layout (one folder per component; not
        tokenizer/, see `empty_prompt_ids`): `<name>[.<variant>].safetensors`, else `.bin` (variant "fp16": the
        half-size files), both VAE attention namings. Every key and shape is checked before any tensor is read,
        then the meta-device model is filled tensor by tensor, cast as it goes, so the peak memory is the model in
        `dtype` (default weights.pick_dtype: fp16 on an accelerator; `device` default weights.pick_device())."""
        folder = Path(folder)
        needed = [*OFFICIAL_COMPONENTS, "scheduler", "image_noising_scheduler"]
        missing = [c for c in needed if not (folder / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"{folder} is not a stable-diffusion-2-1-unclip folder: missing {missing} "
                                    f"(expected {needed})")
        _check_official_schedulers(folder)
        raw = {part: weights.read_json(folder / part / "config.json") for part in ("unet", "vae", "text_encoder")}
        for part, values in raw.items():
            weights.check_config(values, CONFIG_LIMITS, str(folder / part / "config.json"))
        config = DecoderConfig(unet=UNetConfig.from_diffusers(raw["unet"]), vae=VAEConfig.from_diffusers(raw["vae"]),
                               text=CLIPTextConfig.from_hf(raw["text_encoder"]))
        suffix = f".{variant}" if variant else ""
        headers = {}  # component -> {weight file: {key: (shape, dtype)}}
        for component, stems in OFFICIAL_COMPONENTS.items():
            names = [f"{stem}{suffix}{ext}" for ext in (".safetensors", ".bin") for stem in stems]  # diffusers' order
            headers[component] = {path: weights.read_header(path)
                                  for path in weights.find_weights(folder / component, names)}
        device = weights.pick_device(device)
        dtype = dtype or weights.pick_dtype(device, weights.stored_dtype(*headers["unet"].values()))
        with torch.device("meta"):
            model = cls(config)
        _check_official_keys(model, headers, folder)
        state = {}
        for component, file_headers in headers.items():
            for path, header in file_headers.items():
                wanted = [k for k in header if official_key(component, k) is not None]
                for key, tensor in weights.read_weights(path, wanted, device, dtype).items():
                    state[official_key(component, key)] = tensor
        return weights.assign(model, state, device, dtype, str(folder))

# ---- 10. loaders: the official diffusers folder ----------------------------------------------------------------------
# The weight-holding folders of the diffusers layout and their file stems, in diffusers' order of preference
# (tokenizer/ and the schedulers hold no weights), and the attribute of UnCLIPDecoder that holds each one.
OFFICIAL_COMPONENTS = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
                       "text_encoder": ("model", "pytorch_model"), "image_normalizer": ("diffusion_pytorch_model",)}
COMPONENT_ATTRIBUTES = {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder",
                        "image_normalizer": "noise_augmentation"}

# Official tensors we deliberately do not load (the official pipeline does not use them either), in our names.
OFFICIAL_IGNORED = ("vae.encoder.", "vae.quant_conv.",  # the VAE encoder and its moment projection: unCLIP decodes
                    *(f"text_encoder.{key}" for key in CLIPTextEncoder.IGNORED_KEYS))  # the position_ids buffer

# Files written by diffusers < 0.18 (the official VAE, Mar 2023) name the VAE mid-block attention
# `query/key/value/proj_attn`; current diffusers (and this file) use `to_q/to_k/to_v/to_out.0`, the same
# Linear shapes (diffusers==0.39.0 models/modeling_utils.py: `_fix_state_dict_keys_on_load`).
VAE_LEGACY_NAMES = {f".attentions.0.{old}.": f".attentions.0.{new}." for old, new in
                    (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0"))}

def official_key(component: str, key: str) -> str | None:
    """Our state-dict name for tensor `key` of the official folder `component`, or None if deliberately ignored."""
    if component == "vae":
        for old, new in VAE_LEGACY_NAMES.items():
            key = key.replace(old, new)
    name = f"{COMPONENT_ATTRIBUTES[component]}.{key}"
    return None if name.startswith(OFFICIAL_IGNORED) else name

def file_key(component: str, name: str, legacy: bool = False) -> str | None:
    """The inverse of `official_key`: the key in the official folder `component` of our state-dict `name` (None
    when `name` belongs to another component); `legacy`: the file uses the VAE names of diffusers < 0.18."""
    prefix = COMPONENT_ATTRIBUTES[component] + "."
    if not name.startswith(prefix):
        return None
    key = name.removeprefix(prefix)
    if component == "vae" and legacy:
        for old, new in VAE_LEGACY_NAMES.items():
            key = key.replace(new, old)
    return key

def _check_official_keys(model: nn.Module, headers: dict[str, dict], folder: Path) -> None:
    """Compare the folder's tensors (component -> {file: {key: (shape, dtype)}}) with the model, in the folder's
    own names ("unet/conv_in.bias"), minus the deliberately ignored ones; one error names every problem."""
    ours, expected, found = weights.shapes(model), {}, {}
    for component, file_headers in headers.items():
        keys = {key: shape for header in file_headers.values() for key, (shape, _) in header.items()}
        legacy = component == "vae" and any(old in key for key in keys for old in VAE_LEGACY_NAMES)
        found.update({f"{component}/{key}": shape for key, shape in keys.items()
                      if official_key(component, key) is not None})
        expected.update({f"{component}/{key}": shape for name, shape in ours.items()
                         if (key := file_key(component, name, legacy)) is not None})
    weights.check_keys(expected, found, str(folder), what="the decoder",
                       note="the VAE encoder and the text encoder's position_ids are left out on purpose")

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
        settings = weights.read_json(path)
        values = {**values, "timestep_spacing": "leading"}  # diffusers' default, what leading_timesteps implements
        bad = [f"{k}={settings.get(k)!r} (need {v!r})" for k, v in values.items() if settings.get(k, v) != v]
        if bad:
            raise ValueError(f"{path}: unsupported scheduler settings: {'; '.join(bad)}")
