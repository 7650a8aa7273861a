"""The SEED image tokenizer: image -> 32 causal discrete codes -> 1024-d image embedding for the unCLIP decoder.

SEED (Ge et al., "Making LLaMA SEE and Draw with SEED Tokenizer", ICLR 2024, arXiv:2310.01218), tokenizer v2:
    pixels (B, 3, 224, 224)
      -> EVA ViT-g/14 (BLIP-2's frozen image encoder, 39 blocks) -> ln_vision        (B, 257, 1408)
      -> Causal Q-Former (qformer.py): 32 queries, query i sees queries 0..i          (B, 32, 768)
      -> encode_task_layer (Linear, Tanh, Linear) -> z                               (B, 32, 32)
      -> nearest of 8192 codebook rows (vq.py)                                       (B, 32) codes
and back, for generation:
    codes -> codebook rows -> decode_task_layer (Linear, Tanh, Linear)               (B, 32, 768)
      -> + pos_embed_image -> 4 pre-LN ViT blocks -> image_down (768->256->128->32)  (B, 32, 32)
      -> flatten -> distill_image_proj                                               (B, 1024)
The 1024-d output lives in the space of OpenCLIP ViT-H/14 image embeddings, which the unCLIP UNet (unet.py) draws from.

Mirrors (AILab-CVC/SEED @ 93b3cf4) `models/seed_qformer/qformer_quantizer.py` (`Blip2QformerQuantizer`:
`get_codebook_indices` = `encode`, `get_codebook_entry` = `embed`), `eva_vit.py` (`create_eva_vit_g`), `vit.py`
(`Block`), and the preprocessing of `models/transforms.py` (`get_transform(type='clip')`).
Official files: `AILab-CVC/seed-tokenizer-2/seed_quantizer.pt` and BLIP-2's `eva_vit_g.pth`.

Public API: `SeedConfig` (defaults = the official tokenizer; `SeedConfig.preset("tiny")` = what train.py trains),
`EVAViT` (also train.py's tiny CLIP image tower), `ViTBlock`, `load_image`, and `SeedTokenizer`, whose `encode`/`embed`
compose the differentiable steps train.py trains: `image_features` (ViT + ln_vision) -> `query_embeddings` ->
`to_code_space` z -> `quantize` = (z_q straight-through, codes, loss) -> `from_code_space` -> `image_embedding`.

Loading the official files (`from_official`): every size is read from tensor shapes (reduced checkpoints in the
official format load too); head counts, which shapes cannot tell, are keywords defaulting to the official ones (ViT
16, Q-Former 12, decoder 12). `OFFICIAL_RENAMES` maps official names to ours (the Q-Former only), `OFFICIAL_IGNORED`
lists the keys dropped on purpose. A missing or mis-shaped key is an error naming it (with the unused keys, which
usually show a rename); unused keys alone are allowed as by the official `strict=False` load (the released
`seed_quantizer.pt` holds ~146 unknown tensors) and counted in one log line.

Deviations: attention runs through `F.scaled_dot_product_attention` (EVA scales q before q k^T; SDPA scales the
scores: equal up to rounding); the tokenizer does not build the training-only reconstruction branch
(`pos_embed` + `blocks`, see `OFFICIAL_IGNORED`); on fp16 the official code keeps LayerNorms in fp32, torch's
LayerNorm kernels accumulate in fp32 anyway.
"""
import io
import logging
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors.torch import save_file

from qformer import CausalQFormer, QFormerConfig
from vq import VectorQuantizer
from weights import (assign, atomic_write, check_config, check_keys, pick_device, pick_dtype, read_config,
                     read_header, read_weights, shapes, stored_dtype, write_json)

log = logging.getLogger(__name__)

# CLIP's normalisation (SEED: `transforms.Normalize` in models/transforms.py).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

@dataclass
class SeedConfig:
    # EVA ViT-g/14 as BLIP-2 builds it: 16 heads of 88, MLP int(1408 * 4.3637), the penultimate of 40 blocks.
    image_size: int = 224
    patch_size: int = 14
    vit_width: int = 1408
    vit_depth: int = 39
    vit_heads: int = 16
    vit_mlp: int = 6144
    # Causal Q-Former (bert-base-uncased geometry, cross-attention to the ViT in every 2nd layer, 32 queries).
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    causal: bool = True  # False: the bidirectional Q-Former of the paper's ablation (train.py --no-causal)
    # Codebook: 8192 codes of 32 dims.
    n_codes: int = 8192
    code_dim: int = 32
    # Decoder from codes to the unCLIP image embedding: 4 timm ViT blocks (12 heads hard-coded officially).
    decoder_depth: int = 4
    decoder_heads: int = 12
    decoder_mlp: int = 3072
    image_down: tuple[int, ...] = (256, 128, 32)  # bias-free Linear/ReLU widths after the blocks
    embed_dim: int = 1024  # OpenCLIP ViT-H/14 image-embedding width

    def __post_init__(self):
        self.image_down = tuple(self.image_down)
        for ok, what in [
            (self.image_size % self.patch_size == 0, f"image_size {self.image_size} % patch_size {self.patch_size}"),
            (self.vit_width % self.vit_heads == 0, f"vit_width {self.vit_width} % vit_heads {self.vit_heads}"),
            (self.qformer.width % self.decoder_heads == 0,
             f"decoder width {self.qformer.width} % decoder_heads {self.decoder_heads}")]:
            if not ok:
                raise ValueError(f"SeedConfig: {what} must be 0")
        if self.qformer.vision_width != self.vit_width:
            raise ValueError(f"qformer.vision_width {self.qformer.vision_width} must equal vit_width {self.vit_width}")

    @classmethod
    def preset(cls, name: str) -> "SeedConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown SeedConfig preset {name!r}; choices: {', '.join(PRESETS)}")
        return PRESETS[name]()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SeedConfig":
        if unknown := set(d) - {f.name for f in fields(cls)}:
            raise ValueError(f"SeedConfig: unknown fields {sorted(unknown)}")
        return cls(**{**d, "qformer": QFormerConfig(**d.get("qformer", {}))})

def _tiny() -> SeedConfig:
    # What `train.py --tiny` trains on its 32x32 shapes world: 8x8 patches (16 tokens + CLS; four times cheaper
    # than 4x4 on two CPU cores), width 128. Still 32 queries, so an image is 32 tokens for the LLM, as officially.
    # The Q-Former's text branch (stage 1's contrastive loss) reads the world's 20 words + bos, eos, pad.
    return SeedConfig(
        image_size=32, patch_size=8, vit_width=128, vit_depth=4, vit_heads=4, vit_mlp=512,
        qformer=QFormerConfig(width=128, n_layers=2, n_heads=4, intermediate=512, vision_width=128,
                              max_text_len=32, proj_dim=64, text_vocab_size=23),
        n_codes=256, code_dim=16, decoder_depth=2, decoder_heads=4, decoder_mlp=512, image_down=(64, 32, 8),
        embed_dim=128)

PRESETS = {"seed-tokenizer-2": SeedConfig, "tiny": _tiny}
# Bounds of a config.json's values, SeedConfig's and its QFormerConfig's (weights.check_config): far beyond any real
# model, tight enough that a damaged value is named before it builds a model of terabytes.
CONFIG_LIMITS = {**dict.fromkeys(("image_size", "patch_size"), (1, 4096)), "n_codes": (1, 1 << 20),
                 **dict.fromkeys(("vit_width", "vit_mlp", "decoder_mlp", "image_down", "embed_dim", "code_dim", "width",
                                  "intermediate", "vision_width", "proj_dim"), (1, 1 << 16)),
                 **dict.fromkeys(("vit_depth", "decoder_depth", "n_layers"), (0, 256)),
                 **dict.fromkeys(("vit_heads", "decoder_heads", "n_heads", "n_queries", "cross_attention_freq"),
                                 (1, 1024)), "eps": (1e-30, 1.0), "text_vocab_size": (0, 1 << 20),
                 "max_text_len": (1, 1 << 16)}

# ---- ViT building blocks (timm `vit.Block`; EVA's variant of its attention) ----------------------------------------
class Attention(nn.Module):
    """timm ViT self-attention: one fused qkv projection (rows q | k | v, heads contiguous), no mask."""

    def __init__(self, dim: int, n_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def project_qkv(self, x):
        return self.qkv(x)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.project_qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, T, 3C) -> 3 x (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hs)) v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, nh, T, hs) -> (B, T, C)

class EVAAttention(Attention):
    """EVA's attention: the qkv bias is cat(q_bias, 0, v_bias), stored as two parameters (k has no bias)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__(dim, n_heads, qkv_bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))

    def project_qkv(self, x):
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        return F.linear(x, self.qkv.weight, bias)

class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as nn.GELU()

class ViTBlock(nn.Module):
    """Pre-LN transformer block: x += attn(norm1(x)); x += mlp(norm2(x)). No layer scale, no drop path."""

    def __init__(self, dim: int, n_heads: int, mlp_hidden: int, eps: float = 1e-6, attention=Attention):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = attention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

class EVAViT(nn.Module):
    """EVA ViT-g/14 as BLIP-2 uses it: patch embedding + CLS + absolute positions + pre-LN blocks, no final norm."""

    def __init__(self, image_size=224, patch_size=14, width=1408, depth=39, n_heads=16, mlp_hidden=6144):
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        n_patches = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + n_patches, width) * 0.02)  # includes the CLS position
        self.patch_embed = nn.Module()  # a bare container, so that the key is patch_embed.proj.* as in the file
        self.patch_embed.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.blocks = nn.ModuleList(ViTBlock(width, n_heads, mlp_hidden, eps=1e-6, attention=EVAAttention)
                                    for _ in range(depth))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        S = self.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, S, S):
            raise ValueError(f"expected pixels (B, 3, {S}, {S}), got {tuple(pixels.shape)}")
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)  # (B, C, S/p, S/p) -> (B, N, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, C)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x

# ---- The tokenizer -------------------------------------------------------------------------------------------------
class SeedTokenizer(nn.Module):
    """Image -> 32 codes (`encode`) and codes -> unCLIP image embedding (`embed`), module names as the official keys."""

    def __init__(self, config: SeedConfig | None = None):
        super().__init__()
        self.config = c = config or SeedConfig()
        D, Q = c.qformer.width, c.qformer.n_queries
        self.visual_encoder = EVAViT(c.image_size, c.patch_size, c.vit_width, c.vit_depth, c.vit_heads, c.vit_mlp)
        self.ln_vision = nn.LayerNorm(c.vit_width, eps=1e-5)  # torch default eps, unlike the ViT's 1e-6
        self.qformer = CausalQFormer(c.qformer, causal=c.causal)
        self.encode_task_layer = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, c.code_dim))
        self.quantize = VectorQuantizer(c.n_codes, c.code_dim)
        self.decode_task_layer = nn.Sequential(nn.Linear(c.code_dim, c.code_dim), nn.Tanh(), nn.Linear(c.code_dim, D))
        self.pos_embed_image = nn.Parameter(torch.randn(1, Q, D) * 0.02)
        self.blocks_image = nn.ModuleList(ViTBlock(D, c.decoder_heads, c.decoder_mlp) for _ in range(c.decoder_depth))
        widths = (D, *c.image_down)
        down = [m for w_in, w_out in zip(widths, widths[1:]) for m in (nn.Linear(w_in, w_out, bias=False), nn.ReLU())]
        self.image_down = nn.Sequential(*down[:-1])  # no ReLU after the last Linear
        self.distill_image_proj = nn.Linear(Q * c.image_down[-1], c.embed_dim)

    # --- the chain, step by step (differentiable) ---------------------------------------------------------------

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, 1+N, vit_width): all ViT tokens (CLS included) after ln_vision."""
        return self.ln_vision(self.visual_encoder(pixels))

    def query_embeddings(self, image_feats: torch.Tensor) -> torch.Tensor:
        """(B, 1+N, vit_width) -> (B, 32, Dq): the causal Q-Former embeddings."""
        return self.qformer(image_feats)

    def to_code_space(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, 32, Dq) -> (B, 32, code_dim): z, the input of the quantizer."""
        return self.encode_task_layer(queries)

    def from_code_space(self, z_q: torch.Tensor) -> torch.Tensor:
        """(B, 32, code_dim) -> (B, 32, Dq): the reconstruction of the query embeddings (official query_output_up)."""
        return self.decode_task_layer(z_q)

    def image_embedding(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, 32, Dq) reconstructed queries -> (B, E) image embedding (official get_codebook_entry, after the VQ)."""
        x = queries + self.pos_embed_image
        for block in self.blocks_image:
            x = block(x)  # no final norm after the blocks
        x = self.image_down(x)  # (B, 32, Dq) -> (B, 32, 32)
        return self.distill_image_proj(x.flatten(1))  # (B, 32 * 32) -> (B, E)

    # --- inference -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels (see `preprocess`) -> (B, 32) long codes in [0, n_codes)."""
        pixels = pixels.to(device=self.ln_vision.weight.device, dtype=self.ln_vision.weight.dtype)
        z = self.to_code_space(self.query_embeddings(self.image_features(pixels)))
        return self.quantize.nearest(z)

    @torch.no_grad()
    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, 32) codes -> (B, E) image embedding, the condition of the unCLIP decoder."""
        Q = self.config.qformer.n_queries
        if codes.ndim != 2 or codes.shape[1] != Q:
            raise ValueError(f"expected codes (B, {Q}), got {tuple(codes.shape)}")
        z_q = self.quantize.lookup(codes.to(self.pos_embed_image.device))
        return self.image_embedding(self.from_code_space(z_q))

    def preprocess(self, image) -> torch.Tensor:
        """Path / bytes / PIL image / uint8 array -> (3, S, S) float32, as the official scripts: bilinear resize
        to S x S (no crop, aspect ratio not kept; PIL antialiases when shrinking), /255, CLIP mean/std."""
        S = self.config.image_size
        image = load_image(image).resize((S, S), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (S, S, 3) -> (3, S, S)
        mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
        return (x - mean) / std

    # --- native checkpoints ----------------------------------------------------------------------------------------

    def save_pretrained(self, folder) -> None:
        """Write config.json + model.safetensors into `folder`, each atomically."""
        folder = Path(folder)
        write_json(folder / "config.json", self.config.to_dict())
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        atomic_write(folder / "model.safetensors", lambda path: save_file(tensors, str(path)))

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=None) -> "SeedTokenizer":
        """Read a folder written by `save_pretrained`; every key must match exactly."""
        folder = Path(folder)
        try:  # a missing file is an error naming it (weights.read_json, read_header)
            raw = read_config(folder / "config.json")
            for values in (raw, raw.get("qformer") if isinstance(raw.get("qformer"), dict) else {}):
                check_config(values, CONFIG_LIMITS, str(folder / "config.json"))
            config = SeedConfig.from_dict(raw)
        except TypeError as e:
            raise ValueError(f"{folder / 'config.json'} is not a SeedConfig: {e}") from e
        path = folder / "model.safetensors"
        header = read_header(path)
        with torch.device("meta"):
            model = cls(config)
        check_keys(shapes(model), {k: shape for k, (shape, _) in header.items()}, str(path), "the SEED tokenizer")
        device, dtype = _placement(device, dtype, header)
        return assign(model, read_weights(path, device=device, dtype=dtype), device, dtype, str(path))

    # --- official checkpoints --------------------------------------------------------------------------------------

    @classmethod
    def from_official(cls, quantizer_path, vit_path=None, device=None, dtype=None, *,
                      vit_depth: int = 39, vit_heads: int = 16, qformer_heads: int = 12,
                      decoder_heads: int = 12) -> "SeedTokenizer":
        """Load the released `seed_quantizer.pt` + BLIP-2's `eva_vit_g.pth` (`.pt`/`.pth` or `.safetensors`).
        A quantizer that holds `visual_encoder.*` keys (the released one does not) needs no `vit_path`, which is
        then not read: the official code loads the quantizer after eva_vit_g.pth, overwriting it. `vit_depth`: BLIP-2
        uses the first 39 of the file's 40 blocks (a file with fewer uses all). Names and shapes are checked first."""
        parts = [(Path(quantizer_path), "", read_header(quantizer_path))]
        if not any(k.startswith("visual_encoder.") for k in parts[0][2]):
            if vit_path is None:
                raise ValueError(f"{quantizer_path} holds no visual_encoder.* weights: pass vit_path (eva_vit_g.pth)")
            parts.append((Path(vit_path), "visual_encoder.", read_header(vit_path)))  # its keys carry no prefix
        found = {prefix + k: spec for _, prefix, header in parts for k, spec in header.items()}
        model, renames = cls._check_official(
            {k: shape for k, (shape, _) in found.items()}, " + ".join(str(path) for path, _, _ in parts),
            vit_depth=vit_depth, vit_heads=vit_heads, qformer_heads=qformer_heads, decoder_heads=decoder_heads)
        device, dtype = _placement(device, dtype, found)
        state = {}
        for path, prefix, header in parts:
            tensors = read_weights(path, [k for k in header if prefix + k in renames], device, dtype)
            state.update({renames[prefix + k]: t for k, t in tensors.items()})
        return assign(model, state, device, dtype, " + ".join(str(path) for path, _, _ in parts))

    @classmethod
    def from_official_state_dict(cls, quantizer: dict, vit: dict | None = None, device=None, dtype=None, *,
                                 source: str = "official state dict", **heads) -> "SeedTokenizer":
        """`from_official` (whose keywords `heads` takes) on state dicts already in memory. With device="meta"
        (tensors on the meta device too) only names and shapes are checked, which the key-coverage test uses."""
        official = {**quantizer, **{f"visual_encoder.{k}": v for k, v in (vit or {}).items()}}
        model, renames = cls._check_official({k: tuple(v.shape) for k, v in official.items()}, source, **heads)
        device, dtype = _placement(device, dtype, {k: (None, v.dtype) for k, v in official.items()})
        return assign(model, {ours: official[key] for key, ours in renames.items()}, device, dtype)

    @classmethod
    def _check_official(cls, found: dict, source: str, **heads) -> tuple["SeedTokenizer", dict[str, str]]:
        """A meta-device model of the size the official shapes `found` describe, and official -> our name of every
        tensor to load; checks the keys as the module docstring says."""
        config = infer_config(found, source=source, **heads)
        renames = {k: official_to_ours(k) for k in found if not _is_ignored(k, config.vit_depth)}
        with torch.device("meta"):
            model = cls(config)
        expected = {ours_to_official(k): shape for k, shape in shapes(model).items()}
        kept = {k: found[k] for k in renames}
        unknown = [k for k in kept if k not in expected]
        if any(k not in kept or tuple(kept[k]) != shape for k, shape in expected.items()):
            check_keys(expected, kept, source, "the SEED tokenizer", f"architecture inferred from the shapes: {config}")
        log.info("%s: loaded %d tensors, ignored %d on purpose (training-only recon branch, text branch, position_ids,"
                 " ViT blocks >= %d), skipped %d unknown tensors%s", source, len(kept) - len(unknown),
                 len(found) - len(kept), config.vit_depth, len(unknown),
                 (": " + ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")) if unknown else "")
        return model, {k: ours for k, ours in renames.items() if k in expected}

# ---- Images --------------------------------------------------------------------------------------------------------
def load_image(image) -> Image.Image:
    """A path, bytes, PIL image or array (H, W[, C], uint8 or uint16) as an RGB PIL image; ValueError if unreadable."""
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    elif isinstance(image, (bytes, bytearray)):
        if not image:
            raise ValueError("empty image bytes")
        image = _open(io.BytesIO(image), "image bytes")
    elif isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image file not found: {image}")
        image = _open(image, str(image))
    elif not isinstance(image, Image.Image):
        raise ValueError(f"expected a path, bytes, PIL image or numpy array, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"empty image ({image.width}x{image.height})")
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        # 16-bit grey (PNG): PIL's convert("RGB") would clip to 255, so rescale 0..65535 to 0..255 first.
        image = _array_to_pil(np.asarray(image).astype(np.uint16))
    # Like the official `Image.open(p).convert('RGB')`: alpha is dropped, palette / grey / CMYK are converted.
    return image.convert("RGB")

def _open(source, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():  # past Image.MAX_IMAGE_PIXELS: refused before decoding (a decompression bomb)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            image.load()  # decode now, so a truncated file fails here with a clear error
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ValueError(f"{name} is refused: {e} Downscale it below {Image.MAX_IMAGE_PIXELS} pixels.") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read {name} as an image: {e}") from e
    return image

def _array_to_pil(a: np.ndarray) -> Image.Image:
    if a.size == 0:
        raise ValueError(f"empty image array of shape {a.shape}")
    if a.dtype == np.uint16:
        a = (a.astype(np.uint32) * 255 + 32767) // 65535  # 16-bit -> 8-bit, rounded
    elif a.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 or uint16, got {a.dtype}")
    a = a.astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ValueError(f"image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {a.shape}")
    return Image.fromarray(a)

# ---- Official checkpoint format: names, ignore list, size inference ------------------------------------------------
# Official -> our name, as key fragments ("." first: whole segments inside the key, else a prefix). Only the Q-Former
# differs: our attention and feed-forward are one module each (BERT splits them into self/output and intermediate/
# output), and query_tokens lives in the Q-Former. Each fragment is unique in its model's keys, so the table read
# backwards is the exact inverse, which names missing keys as the file holds them (tests/test_seed.py: round trip).
OFFICIAL_RENAMES = [
    ("query_tokens", "qformer.query_tokens"),
    ("Qformer.bert.embeddings.LayerNorm.", "qformer.input_norm."),
    ("Qformer.bert.encoder.layer.", "qformer.layers."),
    *((f".{a}.self.{p}.", f".{a}.{p}.") for a in ("attention", "crossattention") for p in ("query", "key", "value")),
    *((f".{a}.output.dense.", f".{a}.out.") for a in ("attention", "crossattention")),
    *((f".{a}.output.LayerNorm.", f".{a}.norm.") for a in ("attention", "crossattention")),
    (".intermediate_query.dense.", ".ffn_query.up."),
    (".output_query.dense.", ".ffn_query.down."),
    (".output_query.LayerNorm.", ".ffn_query.norm."),
]

# Official keys that are dropped on purpose (the official inference never reads them either).
OFFICIAL_IGNORED = [
    # recon_s=True builds a reconstruction branch used only by the training loss (pos_embed (1,32,768) and 4 blocks).
    r"^pos_embed$",
    r"^blocks\.\d+\.",
    # BERT's int64 position-id buffer: queries get no position embedding.
    r"^Qformer\.bert\.embeddings\.position_ids$",
    # The text branch, which the official code sets to None after construction (word/position embeddings, the text
    # feed-forward `intermediate`/`output` of each layer, the MLM head `cls`); absent from the released file.
    r"^Qformer\.bert\.embeddings\.(word|position)_embeddings\.",
    r"^Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.",
    r"^Qformer\.cls\.",
]

def _rename(key: str, pairs) -> str:
    """`key` with each (old, new) fragment replaced in turn (see OFFICIAL_RENAMES)."""
    for old, new in pairs:
        if old.startswith("."):
            key = key.replace(old, new)
        elif key.startswith(old):
            key = new + key[len(old):]
    return key

def official_to_ours(key: str) -> str:
    return _rename(key, OFFICIAL_RENAMES)

def ours_to_official(key: str) -> str:
    return _rename(key, [(ours, official) for official, ours in reversed(OFFICIAL_RENAMES)])

def _is_ignored(key: str, vit_depth: int) -> bool:
    # BLIP-2 uses EVA-CLIP-g's penultimate layer: eva_vit_g.pth's block 39 (the 40th) is unused.
    m = re.match(r"^visual_encoder\.blocks\.(\d+)\.", key)
    return bool(m and int(m.group(1)) >= vit_depth) or any(re.match(p, key) for p in OFFICIAL_IGNORED)

def infer_config(official: dict, vit_depth=39, vit_heads=16, qformer_heads=12, decoder_heads=12,
                 source="official state dict") -> SeedConfig:
    """Every size of the tokenizer from official-format shapes {name: shape} (quantizer + visual_encoder.*)."""
    def shape(key):
        if key not in official:
            raise ValueError(f"{source}: missing key {key!r}, needed to infer the model size")
        return tuple(official[key])

    def indices(pattern):
        return sorted({int(m.group(1)) for k in official if (m := re.match(pattern, k))})

    width = shape("query_tokens")[2]  # first: a file without it (eva_vit_g.pth?) is no quantizer at all
    vit_blocks = indices(r"^visual_encoder\.blocks\.(\d+)\.")
    n_layers = len(indices(r"^Qformer\.bert\.encoder\.layer\.(\d+)\."))
    cross = indices(r"^Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.")
    freq = next((f for f in range(1, n_layers + 1) if cross == list(range(0, n_layers, f))), None)
    if freq is None:
        raise ValueError(f"{source}: cross-attention in Q-Former layers {cross} of {n_layers} is not periodic")
    patch = shape("visual_encoder.patch_embed.proj.weight")[-1]
    grid = round((shape("visual_encoder.pos_embed")[1] - 1) ** 0.5)  # pos_embed covers CLS + grid x grid patches
    n_down = len(indices(r"^image_down\.(\d+)\.weight$"))
    try:
        return SeedConfig(
            image_size=grid * patch, patch_size=patch, vit_width=shape("visual_encoder.cls_token")[2],
            vit_depth=min(vit_depth, len(vit_blocks)), vit_heads=vit_heads,
            vit_mlp=shape("visual_encoder.blocks.0.mlp.fc1.weight")[0],
            qformer=QFormerConfig(
                width=width, n_layers=n_layers, n_heads=qformer_heads,
                intermediate=shape("Qformer.bert.encoder.layer.0.intermediate_query.dense.weight")[0],
                vision_width=shape(f"Qformer.bert.encoder.layer.{cross[0]}.crossattention.self.key.weight")[1],
                n_queries=shape("query_tokens")[1], cross_attention_freq=freq),
            n_codes=shape("quantize.embedding.weight")[0], code_dim=shape("quantize.embedding.weight")[1],
            decoder_depth=len(indices(r"^blocks_image\.(\d+)\.")), decoder_heads=decoder_heads,
            decoder_mlp=shape("blocks_image.0.mlp.fc1.weight")[0],
            image_down=tuple(shape(f"image_down.{2 * i}.weight")[0] for i in range(n_down)),
            embed_dim=shape("distill_image_proj.weight")[0])
    except (ValueError, IndexError) as e:
        raise ValueError(f"{source}: the tensor shapes do not describe a SEED tokenizer: {e}") from e

def _placement(device, dtype, specs) -> tuple[torch.device, torch.dtype]:
    """weights.pick_device and pick_dtype for the file's {name: (shape, dtype)} `specs`; "meta" is kept as it is:
    a dry run that checks names and shapes only."""
    device = torch.device("meta") if str(device) == "meta" else pick_device(device)
    return device, dtype or pick_dtype(device, stored_dtype(specs))
