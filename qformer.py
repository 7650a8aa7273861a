"""The Causal Q-Former of SEED: 32 learned queries that read a ViT's features, each query seeing only earlier ones.

BLIP-2 (arXiv:2301.12597) introduced the Q-Former: a BERT whose inputs are learned query vectors that cross-attend to
frozen image features. SEED (arXiv:2310.01218, Sec. 3.1) makes its self-attention causal, so query i depends only on
queries 0..i; the 32 outputs then form a left-to-right sequence, the order in which an autoregressive LLM reads
and writes them.

Mirrors (AILab-CVC/SEED @ 93b3cf4) `models/seed_qformer/qformer_causual.py` (a fork of LAVIS's BERT) as built by
`Blip2Base.init_Qformer` with bert-base-uncased: 12 post-LN BERT layers, width 768, 12 heads of 64,
LayerNorm eps 1e-12, exact (erf) GELU; cross-attention to the image in every 2nd layer (l % 2 == 0); queries have
no position embedding, only the embedding LayerNorm. Inference sequence of one layer:
    h = LN(x + SelfAttn(x, causal))            # attention.self / attention.output
    h = LN(h + CrossAttn(h, image))            # crossattention.*, only when l % cross_attention_freq == 0
    x = LN(h + W2 gelu(W1 h))                  # intermediate_query / output_query

`CausalQFormer(config, causal=True)`: image features (B, N, vision_width) -> (B, n_queries, width); with a text
branch (`text_vocab_size > 0`), `encode_text(ids, attention_mask)` and the contrastive projections `vision_proj` /
`text_proj`. Submodules are named after the official keys, simplified where BERT splits one concept over two
modules (seed.py's rename table maps them): `layers.N.attention.{query,key,value,out,norm}`,
`layers.N.ffn_query.{up,down,norm}`, `input_norm`, and `query_tokens` (a top-level tensor of the official file).

The text branch (word and position embeddings, each layer's text feed-forward `ffn_text`, the projections) exists only
for training the tiny model (BLIP-2 style: text tokens run through the same self-attention weights, with a padding
mask and no cross-attention, and their own feed-forward). The official code deletes it after construction; here it
is simply not built for the official weights.

Deviations: no dropout (SEED only runs inference; the tiny run trains without it); the official mask is additive
-10000, ours is SDPA's boolean causal mask, which gives the same softmax (see `QFormerAttention.forward`).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

@dataclass
class QFormerConfig:
    width: int = 768  # bert-base-uncased hidden size
    n_layers: int = 12
    n_heads: int = 12
    intermediate: int = 3072  # feed-forward hidden size
    vision_width: int = 1408  # width of the image features (EVA ViT-g), the cross-attention key/value input
    n_queries: int = 32
    cross_attention_freq: int = 2  # cross-attention in layers l with l % freq == 0
    eps: float = 1e-12  # BERT LayerNorm eps
    text_vocab_size: int = 0  # > 0 builds the text branch (training only); the official weights have none
    max_text_len: int = 512  # text position embeddings (BERT has 512)
    proj_dim: int = 256  # contrastive projection size (BLIP-2 `embed_dim`)

    def __post_init__(self):
        if self.width % self.n_heads:
            raise ValueError(f"Q-Former width {self.width} is not divisible by n_heads {self.n_heads}")

class QFormerAttention(nn.Module):
    """BERT attention + its output block (post-LN): LN(x + out(softmax(q k^T / sqrt(hs)) v))."""

    def __init__(self, width: int, n_heads: int, kv_width: int, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)  # kv_width = vision_width for cross-attention
        self.value = nn.Linear(kv_width, width)
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x, context=None, causal=False, key_mask=None):
        context = x if context is None else context
        B, T, C = x.shape
        S = context.shape[1]
        # (B, T, C) -> (B, nh, T, hs); keys and values (B, S, C) -> (B, nh, S, hs)
        q = self.query(x).view(B, T, self.n_heads, -1).transpose(1, 2)
        k = self.key(context).view(B, S, self.n_heads, -1).transpose(1, 2)
        v = self.value(context).view(B, S, self.n_heads, -1).transpose(1, 2)
        # The official code adds -10000 to the scores of masked positions (query i, key j > i, or padding).
        # After the softmax those weights are exp(-10000 + O(scores)), which is exactly 0 in fp32 and fp16, so the
        # boolean mask of SDPA (weight exactly 0) computes the same attention, and lets SDPA pick a fused kernel.
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, S) -> (B, 1, 1, S), True = attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.norm(x + self.out(y))

class QFormerFFN(nn.Module):
    """BERT feed-forward + output block (post-LN): LN(x + down(gelu(up(x)))), exact GELU."""

    def __init__(self, width: int, hidden: int, eps: float):
        super().__init__()
        self.up = nn.Linear(width, hidden)  # official: intermediate(_query).dense
        self.down = nn.Linear(hidden, width)  # official: output(_query).dense
        self.norm = nn.LayerNorm(width, eps=eps)  # official: output(_query).LayerNorm

    def forward(self, x):
        return self.norm(x + self.down(F.gelu(self.up(x))))

class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, has_cross_attention: bool):
        super().__init__()
        c = config
        self.attention = QFormerAttention(c.width, c.n_heads, c.width, c.eps)
        self.crossattention = (QFormerAttention(c.width, c.n_heads, c.vision_width, c.eps) if has_cross_attention
                               else None)
        self.ffn_query = QFormerFFN(c.width, c.intermediate, c.eps)
        self.ffn_text = QFormerFFN(c.width, c.intermediate, c.eps) if c.text_vocab_size > 0 else None

    def forward(self, queries, image_feats, causal: bool):
        h = self.attention(queries, causal=causal)
        if self.crossattention is not None:
            h = self.crossattention(h, context=image_feats)  # no mask: every query sees every image token
        return self.ffn_query(h)

    def forward_text(self, x, key_mask):
        # Text tokens share the self-attention weights with the queries, but not the feed-forward (BLIP-2).
        return self.ffn_text(self.attention(x, key_mask=key_mask))

class CausalQFormer(nn.Module):
    def __init__(self, config: QFormerConfig | None = None, causal: bool = True):
        super().__init__()
        c = self.config = config or QFormerConfig()
        self.causal = causal
        # The official key is the quantizer's top-level `query_tokens`; BLIP-2 initialises it N(0, 0.02).
        self.query_tokens = nn.Parameter(torch.randn(1, c.n_queries, c.width) * 0.02)
        self.input_norm = nn.LayerNorm(c.width, eps=c.eps)  # official: bert.embeddings.LayerNorm
        self.layers = nn.ModuleList(
            QFormerLayer(c, has_cross_attention=(i % c.cross_attention_freq == 0)) for i in range(c.n_layers)
        )
        if c.text_vocab_size > 0:
            self.word_embeddings = nn.Embedding(c.text_vocab_size, c.width)
            self.position_embeddings = nn.Embedding(c.max_text_len, c.width)
            self.vision_proj = nn.Linear(c.width, c.proj_dim)
            self.text_proj = nn.Linear(c.width, c.proj_dim)

    def forward(self, image_feats: torch.Tensor) -> torch.Tensor:
        """(B, N, vision_width) image features -> (B, n_queries, width) query embeddings."""
        if image_feats.ndim != 3 or image_feats.shape[-1] != self.config.vision_width:
            raise ValueError(
                f"expected image features (B, N, {self.config.vision_width}), got {tuple(image_feats.shape)}"
            )
        # BertEmbeddings with no input ids returns LayerNorm(query_tokens): queries get no position embedding.
        x = self.input_norm(self.query_tokens.expand(image_feats.shape[0], -1, -1))
        for layer in self.layers:
            x = layer(x, image_feats, self.causal)
        return x  # no final norm, no pooler

    def encode_text(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids, (B, T) 1 = token / 0 = padding -> (B, T, width); [CLS] (position 0) is out[:, 0]."""
        if self.config.text_vocab_size == 0:
            raise ValueError("this Q-Former has no text branch: build it with QFormerConfig(text_vocab_size > 0)")
        T = ids.shape[1]
        if T > self.config.max_text_len:
            raise ValueError(f"text of {T} tokens exceeds max_text_len {self.config.max_text_len}")
        positions = torch.arange(T, device=ids.device)
        x = self.input_norm(self.word_embeddings(ids) + self.position_embeddings(positions))
        key_mask = None if attention_mask is None else attention_mask.bool()
        for layer in self.layers:
            x = layer.forward_text(x, key_mask)
        return x
