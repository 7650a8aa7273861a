"""SEED-LLaMA, the model: a LLaMA whose vocabulary also holds SEED's 8192 image codes.

SEED-LLaMA (Ge et al., "Making LLaMA SEE and Draw with SEED Tokenizer", ICLR 2024, arXiv:2310.01218) is a plain
LLaMA (arXiv:2302.13971), fine-tuned from Vicuna-7B ("8B") or LLaMA-2-chat-13B ("14B"), with tokenizer.py's image
tokens added: one next-token model reads an image (its 32 SEED codes in the prompt) and draws one (32 in its output).

In llama2.c's order: `LlamaConfig` and `GenerationConfig`, RMSNorm, RoPE, `KVCache`, the linear layers (bf16 and
int8), attention, MLP, block, `Llama` (forward, `prefill`, the static `decode_step`, `generate`), `quantize_int8`,
sampling and the image-span options, loading.

Mirrors transformers==4.30.2 models/llama/modeling_llama.py (the version AILab-CVC/SEED pins; SEED's
models/llama_xformer.py is a copy of it with xformers attention) and generation/utils.py (the sampling warpers),
and AILab-CVC/SEED @ 93b3cf4 scripts/seed_llama_inference_{8B,14B}.py and gradio_demo/seed_llama_flask.py
(generation settings, the forced `<img>`). Deliberate deviations, all in generation:
  * prompts of different lengths are batched with left padding, each row's positions starting at its first real
    token (the official code runs one unpadded prompt at a time; its xformers path ignores padding masks);
  * constrained image spans and classifier-free guidance on image codes are additions, off by default;
  * stop ids are explicit: the 8B configs name `<s>` as eos (a Vicuna legacy), so pass the ids you want;
  * `generate` is greedy unless do_sample=True (the official scripts sample).
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from weights import (assign, atomic_write, check_config, check_keys, find_weights, pick_device, pick_dtype,
                     read_config, read_header, read_json, read_weights, shapes, write_json)

@dataclass
class LlamaConfig:
    """Architecture of SEED-LLaMA. Defaults = seed-llama-8b (Vicuna-7B with the image tokens added),
    hf:AILab-CVC/seed-llama-8b-pretrain/config.json; other models by name with `LlamaConfig.preset`."""
    vocab_size: int = 40194        # 32000 SentencePiece pieces + 8192 image codes + <img>, </img>
    dim: int = 4096                # hidden_size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = n_heads (plain multi-head attention, as both SEED-LLaMAs)
    ffn_dim: int = 11008           # intermediate_size of the SwiGLU MLP
    norm_eps: float = 1e-6         # Vicuna-7B uses 1e-6, LLaMA-2-13B 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048        # max_position_embeddings: the context length

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise ValueError(f"inconsistent LlamaConfig: dim {self.dim} must split into n_heads {self.n_heads} "
                             f"heads of even size, and n_heads into n_kv_heads {self.n_kv_heads} groups")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def preset(cls, name: str) -> LlamaConfig:
        if name not in LLAMA_PRESETS:
            raise ValueError(f"unknown LLaMA preset {name!r}; choices: {sorted(LLAMA_PRESETS)}")
        return cls(**LLAMA_PRESETS[name])

    @classmethod
    def from_hf(cls, hf: dict) -> LlamaConfig:
        """Translate a transformers `LlamaConfig` dict (an official config.json); refuse what we do not implement."""
        missing = [k for k in HF_CONFIG_NAMES if k not in hf]
        unsupported = [f"{k}={hf[k]!r}" for k, ok in (("hidden_act", "silu"), ("rope_scaling", None),
                                                      ("tie_word_embeddings", False), ("attention_bias", False),
                                                      ("mlp_bias", False)) if k in hf and hf[k] != ok]
        if missing or unsupported:
            raise ValueError(f"config.json is not a LLaMA this file implements: missing {missing}, "
                             f"unsupported {unsupported}")
        config = cls(**{ours: hf[name] for name, ours in HF_CONFIG_NAMES.items()},
                     n_kv_heads=hf.get("num_key_value_heads"), rope_theta=hf.get("rope_theta", 10000.0))
        # `pretraining_tp` (14B: 2) only slices the matmuls in transformers >= 4.31; the result is the same.
        if hf.get("head_dim", config.head_dim) != config.head_dim:
            raise ValueError(f"config.json head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
        return config

# transformers' LlamaConfig names -> ours (num_key_value_heads and rope_theta are optional there)
HF_CONFIG_NAMES = {"vocab_size": "vocab_size", "hidden_size": "dim", "num_hidden_layers": "n_layers",
                   "num_attention_heads": "n_heads", "intermediate_size": "ffn_dim", "rms_norm_eps": "norm_eps",
                   "max_position_embeddings": "max_seq_len"}
# Bounds of a config.json's values, by our names and transformers' (weights.check_config): far beyond any real LLaMA,
# tight enough that a damaged value is named before it allocates (RoPE tables for a context of 1e12 positions).
CONFIG_LIMITS = {"vocab_size": (1, 1 << 20), "dim": (2, 1 << 16), "n_layers": (1, 1024), "n_heads": (1, 1024),
                 "n_kv_heads": (1, 1024), "ffn_dim": (1, 1 << 18), "norm_eps": (1e-30, 1.0),
                 "rope_theta": (1.0, 1e12), "max_seq_len": (1, 1 << 17)}
CONFIG_LIMITS |= {hf: CONFIG_LIMITS[ours] for hf, ours in HF_CONFIG_NAMES.items()} | \
    {"num_key_value_heads": CONFIG_LIMITS["n_kv_heads"]}

# Named configs. `tiny` is the laptop model of `train.py --tiny` (about 1M parameters); its vocabulary is the
# layout of the test tokenizer (640 pieces + 128 codes + 2); train.py replaces vocab_size with its tokenizer's.
LLAMA_PRESETS = {
    "seed-llama-8b": {},
    "seed-llama-14b": dict(dim=5120, n_layers=40, n_heads=40, ffn_dim=13824, norm_eps=1e-5),
    "tiny": dict(vocab_size=730, dim=128, n_layers=4, n_heads=4, ffn_dim=344, norm_eps=1e-5, max_seq_len=256),
}

@dataclass
class GenerationConfig:
    """Decoding settings, and the one home of the official sampling values. AILab-CVC/SEED @ 93b3cf4
    scripts/seed_llama_inference_8B.py (lines 81-87) calls transformers 4.30.2 `generate` with temperature 1.0,
    num_beams 1, max_new_tokens 512, top_p 0.5, do_sample True; 4.30.2's default top_k 50 then applies too
    (generation/configuration_utils.py). The image options are all off, so the defaults decode as the official
    model does; do_sample alone differs (greedy unless asked, so that a call without a generator is repeatable)."""
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float | None = 0.5
    stop_ids: tuple[int, ...] = ()     # e.g. (tokenizer.eos_id,); empty = run to max_new_tokens
    constrain_images: bool = False     # after <img> only codes, exactly codes_per_image, then </img>
    force_image: bool = False          # append <img> to the prompt (returned as the first new token)
    guidance_scale: float = 1.0        # classifier-free guidance on the image-code logits; 1 = off

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As HF LlamaRMSNorm: the statistics in fp32 even for fp16 activations, cast back *before* the weight.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

def rope_tables(config: LlamaConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position, (max_seq_len, head_dim) in fp32, in the rotate_half layout of the HF
    checkpoints: frequency j drives dimensions j and j + head_dim/2 (Meta's layout pairs 2j and 2j+1 instead)."""
    hd = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd)  # (hs/2,)
    freqs = torch.outer(torch.arange(config.max_seq_len, device=device).float(), inv_freq)   # (S, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)                                                   # (S, hs)
    return emb.cos(), emb.sin()

def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, nh, T, hs); cos, sin (T, hs) shared by the batch, or (B, 1, T, hs) with per-row positions.
    # HF's rotate_half: the first half of each head pairs with the second, (x1, x2) -> (-x2, x1).
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin

class KVCache(nn.Module):
    """Keys and values of the positions seen so far, preallocated once (gpt-fast style) and written in place."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        # non-persistent: a cache is never part of a checkpoint
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(start, torch.Tensor):  # the static step: one slot given as a tensor, the whole cache read
            self.k.index_copy_(2, start.view(1), k)
            self.v.index_copy_(2, start.view(1), v)
            return self.k, self.v
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # views (B, nkv, end, hs): no copy

def matvec(weight: torch.Tensor, x: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """weight @ x for one row x (..., in) as a multiply-and-sum in fp32, for the CPU under torch.compile: inductor
    turns it into one reduction kernel that streams the weight once, split over every thread, and upcasts int8
    or bf16 weights inside it (scales: the per-row factors of int8 weights). MKL's gemv runs one row on one
    thread on some CPUs (under half of what two cores read); eager, this would materialise weight * x."""
    y = (weight.float() * x.reshape(1, -1).float()).sum(-1)
    return (y if scales is None else y * scales.float()).to(x.dtype).view(*x.shape[:-1], weight.shape[0])

class Linear(nn.Linear):
    """nn.Linear without bias, with a choice of kernel for one row on the CPU (decoding one token is exactly
    that): under torch.compile `matvec`; eager and in bf16 torch.mv, because oneDNN's bf16 GEMM streams the
    weights at about 2/3 of mv's rate on the AMX CPU of the README's table (torch 2.13; `python bench.py llama`)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.numel() == self.in_features:
            if torch.compiler.is_compiling():
                return matvec(self.weight, x)
            if x.dtype == torch.bfloat16:
                return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight)

# Under torch.compile an int8 one-row linear is a `matvec` only on AVX512 CPUs: on a 2-core AVX512 EPYC the compiled
# int8 step decoded 1.75x as fast as eager with it, on a 2-core AVX2 EPYC 0.49x (0.87x with the packed kernel kept
# inside the compiled step); README, speed section.
INT8_MATVEC = torch.backends.cpu.get_cpu_capability() == "AVX512"

class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights and one float scale per output channel, W ~ scales[:, None] * weight
    (weight-only quantisation as pytorch-labs/gpt-fast quantize.py WeightOnlyInt8QuantHandler). On the CPU with bf16
    activations and a few rows (decoding) the packed int8 kernel, or `matvec` under torch.compile on AVX512;
    otherwise dequantise-and-matmul, which torch.compile fuses on CUDA."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127  # (out,): the row's max -> 127
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.round(w / scales[:, None]).to(torch.int8))  # in [-127, 127]
        self.register_buffer("scales", scales.to(linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The packed kernel's time grows with the rows: past about 16 (a prompt) one dequantised bf16 GEMM is faster
        # (bench.py llama's prefill); torch 2.13's kernel also crashes on widths that are not multiples of 16.
        rows = x.numel() // self.in_features
        if x.device.type == "cpu" and rows == 1 and INT8_MATVEC and torch.compiler.is_compiling():
            return matvec(self.weight, x, self.scales)
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and self.in_features % 16 == 0 and rows <= 16:
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, self.scales)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)

class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = Linear(config.dim, self.n_heads * self.head_dim)
        self.k_proj = Linear(config.dim, self.n_kv_heads * self.head_dim)
        self.v_proj = Linear(config.dim, self.n_kv_heads * self.head_dim)
        self.o_proj = Linear(self.n_heads * self.head_dim, config.dim)
        self.cache: KVCache | None = None  # set by Llama.setup_cache

    def forward(self, x, cos, sin, mask, start_pos):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, T, C) -> (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if start_pos is not None:
            if self.cache is None:
                raise RuntimeError("a cached forward needs Llama.setup_cache(batch_size, max_seq_len) first")
            k, v = self.cache.update(start_pos, k, v)  # (B, nkv, S, hs), S = start_pos + T
        # softmax(q k^T / sqrt(hs)) v; without a mask either the plain causal case or a single query that sees
        # every cached key. enable_gqa shares each key/value head among n_heads / n_kv_heads query heads.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, nh, T, hs) -> (B, T, C)

class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = Linear(config.dim, config.ffn_dim)
        self.up_proj = Linear(config.dim, config.ffn_dim)
        self.down_proj = Linear(config.ffn_dim, config.dim)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU

class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, start_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, start_pos)  # pre-norm residual blocks
        return x + self.mlp(self.post_attention_layernorm(x))

class Llama(nn.Module):
    """LLaMA decoder. Submodules are named as in HF `LlamaForCausalLM` (`model.layers.3.self_attn.q_proj`,
    `lm_head`, ...), so the official state dicts load without a rename table."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.dim),
            layers=nn.ModuleList(Block(config) for _ in range(config.n_layers)),
            norm=RMSNorm(config.dim, config.norm_eps),
        ))
        self.lm_head = Linear(config.dim, config.vocab_size)  # untied from embed_tokens
        # computed once; rebuilt on the real device after a meta-device load (they hold no learned values)
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.compiled = False  # set by compile_decode: generate then takes the static step, on bucketed caches
        for module in self.modules():  # HF initializer_range 0.02; only matters when training from scratch
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden(self, idx: torch.Tensor, start_pos: int | None = None, pad: torch.Tensor | None = None):
        """Final-normed hidden states (B, T, C) of the tokens idx (B, T).

        start_pos: None = no cache (training, tests); an int = the cache slot of idx[:, 0]: the keys/values
            are written to the cache from there and attention reads every slot before them; a 0-d int64 tensor =
            the static decode step (one token, T = 1; see `decode_step`).
        pad: (B,) number of left-padding slots of each row. A row's first real token gets position 0 (so a
            padded prompt gives what it gives alone) and padding slots are never attended.
        """
        if isinstance(start_pos, torch.Tensor):
            cos, sin, mask = self.static_positions(start_pos, pad)
        else:
            cos, sin, mask = self.positions(idx.shape[1], start_pos, pad)
        x = self.model.embed_tokens(idx)  # (B, T, C)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # HF builds them in fp32 and casts to the activations
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, start_pos)
        return self.model.norm(x)

    def positions(self, T: int, start_pos: int | None, pad: torch.Tensor | None):
        """Rotary cos, sin and the attention mask (None: SDPA's own causal or full case) of T new tokens."""
        start, device = 0 if start_pos is None else start_pos, self.rope_cos.device
        if start + T > self.config.max_seq_len:
            raise ValueError(f"{start + T} positions exceed the context of max_seq_len={self.config.max_seq_len}")
        slots = torch.arange(start, start + T, device=device)  # the cache slot of each new token
        keys = torch.arange(start + T, device=device)  # the slots the new tokens may read
        if pad is None:
            # SDPA's is_causal covers a prompt from slot 0 and a single new token; a later chunk needs the mask
            mask = keys <= slots[:, None] if start > 0 and T > 1 else None  # (T, S), True = may attend
            return self.rope_cos[start:start + T], self.rope_sin[start:start + T], mask  # (T, hs)
        pos = (slots - pad[:, None]).clamp(min=0)  # (B, T) rotary positions
        mask = (keys <= slots[:, None]) & (keys >= pad[:, None, None])  # (B, T, S): causal, no padding keys
        # a padding query sees itself: a row with every key masked would make SDPA return NaN, and NaN
        # values would then leak into the real rows (0 * NaN) even though their weight is zero
        mask = (mask | (keys == slots[:, None]))[:, None]  # (B, 1, T, S)
        return self.rope_cos[pos][:, None], self.rope_sin[pos][:, None], mask  # (B, 1, T, hs)

    def static_positions(self, slot: torch.Tensor, pad: torch.Tensor | None):
        """`positions` of one new token at cache slot `slot` (a 0-d tensor), over every slot of the cache: the
        same shapes whatever the slot, so that one compiled graph serves every step."""
        cache = self.model.layers[0].self_attn.cache
        if cache is None:
            raise RuntimeError("the static decode step needs Llama.setup_cache(batch_size, max_seq_len) first")
        keys = torch.arange(cache.k.shape[2], device=slot.device)  # (S,) every slot; the unwritten ones masked
        if pad is None:
            pos, mask = slot.view(1), (keys <= slot).view(1, 1, 1, -1)  # (1,), (1, 1, 1, S)
            return self.rope_cos[pos], self.rope_sin[pos], mask  # (1, hs)
        pos = (slot - pad).clamp(min=0)[:, None]  # (B, 1)
        mask = ((keys <= slot) & (keys >= pad[:, None]))[:, None, None]  # (B, 1, 1, S)
        return self.rope_cos[pos][:, None], self.rope_sin[pos][:, None], mask  # (B, 1, 1, hs)

    def forward(self, idx: torch.Tensor, start_pos: int | None = None, pad: torch.Tensor | None = None,
                where: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) of every position; see `hidden` for the arguments. where: a (B, T) bool mask:
        the head only at those positions, logits (N, vocab_size) in row-major order (training: the labelled ones)."""
        h = self.hidden(idx, start_pos, pad)
        return self.lm_head(h if where is None else h[where])

    # ---- inference over the KV cache (gpt-fast style) ------------------------------------------------------

    def setup_cache(self, batch_size: int, max_seq_len: int | None = None):
        """Preallocate the KV cache of every layer; an existing cache that is large enough is reused."""
        max_seq_len = max_seq_len or self.config.max_seq_len
        w = self.lm_head.weight
        for layer in self.model.layers:
            c = layer.self_attn.cache
            # (a cache made under inference_mode, as generate's, cannot be written outside it)
            if (c is None or c.k.shape[0] != batch_size or c.k.shape[2] < max_seq_len
                    or c.k.dtype != w.dtype or c.k.device != w.device
                    or c.k.is_inference() != torch.is_inference_mode_enabled()):
                layer.self_attn.cache = KVCache(batch_size, self.config.n_kv_heads, max_seq_len,
                                                self.config.head_dim, w.dtype, w.device)

    def free_cache(self):
        """Drop the KV cache that generate keeps for reuse (its memory is freed; the next generate makes one)."""
        for layer in self.model.layers:
            layer.self_attn.cache = None

    def prefill(self, idx: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """Run the (left-padded) prompts idx (B, T) into the cache from slot 0; logits of the last slot (B, V)."""
        return self.lm_head(self.hidden(idx, 0, pad)[:, -1])  # the head only where a token is sampled

    def decode_step(self, tok: torch.Tensor, slot: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """Feed tok (B,) at cache slot `slot` (a 0-d int64 tensor); logits of the next token (B, V). Static shapes,
        as gpt-fast's decode step: the key and value are written in place and attention reads the whole cache
        through a mask, so nothing depends on a Python int that changes per token (`compile_decode`)."""
        return self.lm_head(self.hidden(tok[:, None], slot, pad)[:, 0])

    def compile_decode(self) -> Llama:
        """Wrap decode_step in torch.compile (one graph for every step; CUDA graphs on CUDA); generate uses it.
        On the CPU its one-row linears become `matvec` reductions, which stream the weights on every thread."""
        mode = "reduce-overhead" if self.lm_head.weight.device.type == "cuda" else None
        self.decode_step = torch.compile(self.decode_step, mode=mode, fullgraph=True, dynamic=False)
        self.compiled = True
        return self

    def cache_slots(self, needed: int) -> int:
        """KV cache length for a call that needs `needed` slots. The static step reads every slot, and each cache
        length is one compiled graph: a power of two (at most 4 graphs up to 2048), not the whole context, whose
        unwritten slots would be read too (at 2048 slots the bench model's fp32 cache is 134 MB per token)."""
        if not self.compiled:
            return needed
        return min(max(256, 1 << (needed - 1).bit_length()), self.config.max_seq_len)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None, *,
                 image_vocab=None, uncond_prompt: Sequence[int] | None = None,
                 generator: torch.Generator | None = None, on_token: Callable[[int, int], None] | None = None,
                 **overrides) -> list[list[int]]:
        """Continue each prompt (a list of token ids; prompts of different lengths are left-padded into one
        batch). Returns the new tokens of each prompt, up to and including its first stop id.

        config (or keyword overrides such as max_new_tokens=64): see GenerationConfig.
        image_vocab: where <img>, </img> and the codes sit (tokenizer.ImageVocab); needed by the image options.
        uncond_prompt: the unconditional prompt of classifier-free guidance (e.g. the template around an empty
            request); it runs as extra rows of the batch and is fed the tokens chosen for its conditional row.
        on_token(row, token): called for every new token as it is produced (streaming).
        """
        cfg = replace(config or GenerationConfig(), **overrides)
        n_prompts = len(prompts)
        idx, pad = batch_rows(prompts, cfg, image_vocab, uncond_prompt, self.config.max_seq_len,
                              self.lm_head.weight.device)  # (B', T): the prompts, then the unconditional rows
        span = _SpanTracker(image_vocab, self.config.vocab_size, idx[:n_prompts]) if image_vocab is not None else None
        out: list[list[int]] = [[image_vocab.boi_id] if cfg.force_image else [] for _ in range(n_prompts)]
        if on_token is not None and cfg.force_image:
            for row in range(n_prompts):
                on_token(row, image_vocab.boi_id)
        max_new = min(cfg.max_new_tokens, self.config.max_seq_len - idx.shape[1])  # stop at the context end
        if max_new == 0:
            return out
        self.setup_cache(idx.shape[0], self.cache_slots(idx.shape[1] + max_new))
        logits = self.prefill(idx, pad)
        return self.decode_loop(logits, out, cfg, span, idx.shape[1], pad, max_new, generator, on_token)

    def decode_loop(self, logits: torch.Tensor, out: list[list[int]], cfg: GenerationConfig, span, start: int,
                    pad, max_new: int, generator, on_token) -> list[list[int]]:
        """From the prefill's logits (B', V): pick a token per row and feed it back at cache slot start, start + 1,
        ..., max_new times or until every prompt has produced a stop id. `out` holds each prompt's new tokens so
        far and is returned extended; rows past len(out) are the unconditional rows of guidance."""
        n_prompts, n_rows = len(out), logits.shape[0]
        done, stop_ids = [False] * n_prompts, set(cfg.stop_ids)
        for step in range(max_new):
            logits = logits.float()  # sampling math in fp32, as HF does for fp16 models
            # the image options, (B', V) -> (B, V): guidance mixes each prompt's code logits with its
            # unconditional row's, then the span constraint masks
            if span is not None and cfg.guidance_scale != 1.0:
                logits = span.guide(logits[:n_prompts], logits[n_prompts:], cfg.guidance_scale)
            if span is not None and cfg.constrain_images:
                logits = span.constrain(logits)
            tok = sample_next(logits, cfg, generator)  # (B,)
            for row, t in enumerate(tok.tolist()):
                if not done[row]:  # a finished row runs on with the batch, but its tokens are dropped
                    out[row].append(t)
                    done[row] = t in stop_ids
                    if on_token is not None:
                        on_token(row, t)
            if span is not None:
                span.update(tok)
            if all(done) or step == max_new - 1:
                break
            feed = tok.repeat(n_rows // n_prompts)  # the unconditional rows follow their conditional row
            if self.compiled or feed.device.type != "cpu":  # the static step: compiled, or a GPU
                logits = self.decode_step(feed, torch.tensor(start + step, device=feed.device), pad)
            else:  # eager on the CPU, SDPA over the filled slots alone is faster than over the masked cache
                logits = self(feed[:, None], start + step, pad)[:, 0]
        return out

    # ---- checkpoints (the reading itself is the loading section at the end of the file) ---------------------

    def save_pretrained(self, folder: str | os.PathLike, tokenizer=None):
        """Write config.json (LlamaConfig) + model.safetensors, atomically; also the tokenizer files if given."""
        folder = Path(folder)
        write_json(folder / "config.json", asdict(self.config))
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        atomic_write(folder / "model.safetensors", lambda p: save_file(state, str(p)))
        if tokenizer is not None:
            tokenizer.save(folder)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device=None, dtype=None) -> Llama:
        """Read a folder written by save_pretrained (strict: every key and shape must match config.json)."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder / 'config.json'} not found: not written by Llama.save_pretrained")
        raw = read_config(folder / "config.json")
        check_config(raw, CONFIG_LIMITS, str(folder / "config.json"))
        unknown = sorted(set(raw) - {f.name for f in fields(LlamaConfig)})
        if unknown:
            raise ValueError(f"{folder / 'config.json'} has keys LlamaConfig does not know: {unknown} "
                             f"(an official HF folder? use Llama.from_official)")
        return _load(LlamaConfig(**raw), find_weights(folder, ("model.safetensors",)), device, dtype)

    @classmethod
    def from_official(cls, folder: str | os.PathLike, device=None, dtype=None) -> Llama:
        """Load an official HF-format SEED-LLaMA folder (config.json + pytorch_model*.bin or model*.safetensors,
        sharded with an index or single). device and dtype default to weights.pick_device and pick_dtype."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder / 'config.json'} not found: not a Hugging Face LLaMA folder")
        hf = read_json(folder / "config.json")
        check_config(hf, CONFIG_LIMITS, str(folder / "config.json"))
        # the 2023 checkpoints say `torch_dtype`, recent transformers versions write `dtype`
        name = hf.get("torch_dtype", hf.get("dtype"))
        stored = getattr(torch, name) if name in ("float32", "float16", "bfloat16") else None
        return _load(LlamaConfig.from_hf(hf), find_weights(folder, OFFICIAL_WEIGHT_FILES), device, dtype, stored)

def quantize_int8(model: Llama) -> Llama:
    """Int8 weights, in place, for the attention and MLP linears of every block (Int8Linear: per-output-channel
    scales). Embeddings, norms and lm_head keep the model's float dtype: the head's rows are the 8192 image codes
    too, and one token reads only one embedding row. The fastest CPU path wants a bf16 model."""
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child))
    return model

# ---- sampling and the image-span options ----------------------------------------------------------------
def batch_rows(prompts: Sequence[Sequence[int]], cfg: GenerationConfig, image_vocab,
               uncond_prompt, max_seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows generate() runs, left-padded into one (B', T) tensor: the prompts, then (guidance on) one copy of
    uncond_prompt per prompt, each followed by <img> when force_image; and each row's padding (B',), or None when
    no row is padded (then the cheaper plain causal path runs). The options are checked here, before any compute."""
    rows = [list(p) for p in prompts]
    if not rows or any(not p or not isinstance(p[0], int) for p in rows):
        raise ValueError("prompts must be a non-empty list of non-empty lists of token ids")
    if (cfg.constrain_images or cfg.force_image or cfg.guidance_scale != 1.0) and image_vocab is None:
        raise ValueError("constrain_images, force_image and guidance_scale need image_vocab")
    if cfg.guidance_scale != 1.0 and not uncond_prompt:
        raise ValueError("classifier-free guidance (guidance_scale != 1) needs an uncond_prompt")
    rows += [list(uncond_prompt)] * len(rows) if cfg.guidance_scale != 1.0 else []
    if cfg.force_image:  # the flask demo's force_boi: <img> ends the prompt, so an image comes next
        rows = [r + [image_vocab.boi_id] for r in rows]
    T = max(len(r) for r in rows)
    if T > max_seq_len:
        raise ValueError(f"prompt of {T} tokens is longer than the context (max_seq_len={max_seq_len}); shorten it")
    idx = torch.tensor([[0] * (T - len(r)) + r for r in rows], device=device)  # (B', T)
    pad = torch.tensor([T - len(r) for r in rows], device=device)
    return idx, (pad if pad.any() else None)

def sample_next(logits: torch.Tensor, cfg: GenerationConfig, generator=None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax, or sampling after HF's warpers in HF's order
    (temperature -> top-k -> top-p; transformers 4.30.2 generation/utils.py `_get_logits_warper`)."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    if cfg.temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {cfg.temperature}")
    logits = logits / cfg.temperature
    if cfg.top_k:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None and cfg.top_p < 1.0:
        logits = top_p_filter(logits, cfg.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]

def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th kept too, as HF TopKLogitsWarper)."""
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))

def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter as HF TopPLogitsWarper: sort ascending and drop the tokens whose cumulative probability
    is <= 1 - p, always keeping the most likely one."""
    sorted_logits, order = logits.sort(dim=-1)
    drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - p
    drop[:, -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))

class _SpanTracker:
    """Where each row stands in an image span, for constrained decoding and guidance on image codes.
    state = -1 outside a span, else the number of codes since the last <img>."""

    def __init__(self, image_vocab, vocab_size: int, prompts: torch.Tensor):
        self.boi_id, self.n = image_vocab.boi_id, image_vocab.codes_per_image
        ids = torch.arange(vocab_size, device=prompts.device)
        self.is_code = (ids >= image_vocab.code_offset) & (ids < image_vocab.code_offset + image_vocab.n_codes)  # (V,)
        self.is_eoi = ids == image_vocab.eoi_id
        self.state = torch.full((prompts.shape[0],), -1, device=prompts.device)
        for column in prompts.T:  # a prompt may end inside a span (a forced or user-written <img>)
            self.update(column)

    def update(self, tok: torch.Tensor):
        self.state = torch.where(tok == self.boi_id, 0,
                                 torch.where((self.state >= 0) & self.is_code[tok], self.state + 1, -1))

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        # inside a span: only codes until there are n of them, then only </img>; outside: no codes, no </img>
        is_code, is_eoi = self.is_code, self.is_eoi
        need_code = ((self.state >= 0) & (self.state < self.n))[:, None]
        need_eoi = (self.state >= self.n)[:, None]
        allowed = torch.where(need_code, is_code, torch.where(need_eoi, is_eoi, ~(is_code | is_eoi)))
        return logits.masked_fill(~allowed, float("-inf"))

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        # classifier-free guidance u + s (c - u) on the code logits of the rows inside a span; text untouched
        where = (self.state >= 0)[:, None] & self.is_code
        return torch.where(where, uncond + scale * (cond - uncond), cond)

# ---- loading -------------------------------------------------------------------------------------------
# Keys of the official checkpoints that are deliberately not loaded, as the official code ignores them too:
# transformers <= 4.30 saved RoPE's inverse frequencies as a persistent buffer, one per layer (both SEED-LLaMA
# checkpoints have them); they are a function of rope_theta, recomputed by `rope_tables`.
IGNORED_OFFICIAL_KEYS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# An official folder holds one of these (the first found wins): shards with their index, or a single file.
OFFICIAL_WEIGHT_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors",
                         "pytorch_model.bin")

def _load(config: LlamaConfig, files: list[Path], device, dtype, stored_dtype=None) -> Llama:
    """Build on the meta device, check every key and shape of every file against the config before any data
    is read, then fill the model file by file with load_state_dict(assign=True), casting on the way. Host RAM
    peaks near one copy of the weights in the target dtype plus one file (a fp32 .bin loaded as fp32 on the
    CPU is not even copied: the parameters keep the file's memory-mapped pages)."""
    headers = [read_header(path) for path in files]
    found = {name: shape for header in headers for name, (shape, _) in header.items()
             if not IGNORED_OFFICIAL_KEYS.fullmatch(name)}
    with torch.device("meta"):
        model = Llama(config)
    expected = shapes(model)  # our names are the file's names: no rename table
    source = f"checkpoint {files[0].parent} ({', '.join(f.name for f in files)})"
    check_keys(expected, found, source, what="config.json")

    device = pick_device(device)
    if dtype is None:
        stored_dtype = stored_dtype or next(h["lm_head.weight"][1] for h in headers if "lm_head.weight" in h)
        dtype = pick_dtype(device, stored_dtype)
    for path in files:  # one file at a time: every key is known to be present, so strict=False loses nothing
        assign(model, read_weights(path, expected, device, dtype), device, dtype, str(path), strict=False)
    model.rope_cos, model.rope_sin = rope_tables(config, device)
    return model.eval()
