"""qformer.py: the causal property, equivalence with the official additive -10000 mask, the text branch, sizes."""
import math

import pytest
import torch
import torch.nn.functional as F

from qformer import CausalQFormer, QFormerAttention, QFormerConfig

SMALL = QFormerConfig(width=24, n_layers=3, n_heads=3, intermediate=48, vision_width=16, n_queries=8)

def small_qformer(causal=True, **overrides):
    torch.manual_seed(0)
    config = QFormerConfig(**{**SMALL.__dict__, **overrides})
    return CausalQFormer(config, causal=causal).eval()

@pytest.mark.parametrize("j", [0, 3, 7])
def test_perturbing_query_j_never_changes_earlier_outputs(j):
    model = small_qformer(causal=True)
    feats = torch.randn(2, 10, 16)
    with torch.no_grad():
        before = model(feats)
        model.query_tokens[0, j] += torch.randn(24)
        after = model(feats)
    assert torch.equal(before[:, :j], after[:, :j])  # masked keys get weight exactly 0
    assert not torch.allclose(before[:, j:], after[:, j:])

def test_without_causal_mask_earlier_outputs_change():
    model = small_qformer(causal=False)
    feats = torch.randn(2, 10, 16)
    with torch.no_grad():
        before = model(feats)
        model.query_tokens[0, 7] += torch.randn(24)
        after = model(feats)
    assert (before[:, :7] - after[:, :7]).abs().max() > 1e-3

def test_boolean_causal_mask_equals_the_official_additive_minus_10000():
    torch.manual_seed(0)
    attn = QFormerAttention(width=24, n_heads=3, kv_width=24, eps=1e-12)
    x = torch.randn(2, 8, 24) * 3
    # The official BertSelfAttention: scores + (1 - causal) * -10000, softmax, then dense + residual + LayerNorm.
    q, k, v = (lin(x).view(2, 8, 3, 8).transpose(1, 2) for lin in (attn.query, attn.key, attn.value))
    causal = torch.tril(torch.ones(8, 8))
    scores = q @ k.transpose(-1, -2) / math.sqrt(8) + (1.0 - causal) * -10000.0
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 8, 24)
    official = attn.norm(attn.out(ctx) + x)
    torch.testing.assert_close(attn(x, causal=True), official, rtol=0, atol=1e-6)

def test_cross_attention_every_second_layer_and_shapes():
    model = small_qformer()
    assert [layer.crossattention is not None for layer in model.layers] == [True, False, True]
    assert model(torch.randn(2, 5, 16)).shape == (2, 8, 24)
    with pytest.raises(ValueError, match=r"\(B, N, 16\)"):
        model(torch.randn(2, 5, 17))

def test_official_size_without_text_branch():
    with torch.device("meta"):
        model = CausalQFormer(QFormerConfig())
    assert not hasattr(model, "word_embeddings")
    assert all(layer.ffn_text is None for layer in model.layers)
    # query_tokens is a top-level tensor of the official quantizer, outside `Qformer.bert`.
    n = sum(p.numel() for name, p in model.named_parameters() if name != "query_tokens")
    assert n == 105_137_664
    with pytest.raises(ValueError, match="no text branch"):
        model.encode_text(torch.zeros(1, 3, dtype=torch.long))

def test_text_branch_shares_self_attention_and_ignores_padding():
    model = small_qformer(text_vocab_size=50, max_text_len=16, proj_dim=12)
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        out = model.encode_text(ids, mask)
        padded = model.encode_text(F.pad(ids, (0, 4)), F.pad(mask, (0, 4)))
    assert out.shape == (2, 6, 24)
    torch.testing.assert_close(padded[:, :6], out, rtol=0, atol=1e-5)
    assert model.text_proj(out[:, 0]).shape == (2, 12)
    assert model.vision_proj(out[:, -1]).shape == (2, 12)
    # Text reuses the queries' self-attention weights: its gradient reaches them, but never the cross-attention.
    model.encode_text(ids, mask).sum().backward()
    assert model.layers[0].attention.query.weight.grad is not None
    assert model.layers[0].crossattention.query.weight.grad is None
    assert model.layers[0].ffn_query.up.weight.grad is None and model.layers[0].ffn_text.up.weight.grad is not None
    with pytest.raises(ValueError, match="max_text_len"):
        model.encode_text(torch.zeros(1, 17, dtype=torch.long))

def test_config_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        QFormerConfig(width=36, n_heads=5)
