"""The SEED codebook: a vector quantizer with a straight-through gradient.

SEED (Ge et al., "Making LLaMA SEE and Draw with SEED Tokenizer", ICLR 2024, arXiv:2310.01218) quantizes each of the
32 causal Q-Former embeddings, projected to 32 dims, to its nearest entry of an 8192-entry codebook (VQ-VAE,
arXiv:1711.00937). The code index is the image token that SEED-LLaMA reads and writes.

Mirrors `VectorQuantizer2` as SEED builds it (AILab-CVC/SEED @ 93b3cf4, `models/seed_qformer/vq.py`, with
`n_e=8192, e_dim=32, beta=0.25, remap=None, sane_index_shape=False, legacy=True`):
  * nearest code by squared L2 distance `|z|^2 + |e|^2 - 2 z.e`, no l2-normalisation (the official `l2norm` call
    is commented out);
  * the forward value is the code, the backward pass copies the gradient straight through to z;
  * the loss uses the official "legacy" weighting, which swaps the roles of beta in the VQ-VAE paper:
        loss = 1.0 * |sg[z_q] - z|^2   (commitment: pulls the encoder towards its code)
             + 0.25 * |z_q - sg[z]|^2  (codebook: pulls the code towards the encoder output)
    where sg is stop-gradient and |.|^2 a mean over all elements.

`VectorQuantizer(n_codes=8192, dim=32, beta=0.25)`: z (..., dim) -> (z_q straight-through, codes, loss); `nearest`,
`lookup`, and `usage` (fraction of codes used, perplexity) for training logs. Its codebook is `embedding`, so the
official key `quantize.embedding.weight` loads unchanged.

Deviations: no index remapping and no (B, C, H, W) layout handling, which SEED never uses.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

class VectorQuantizer(nn.Module):
    def __init__(self, n_codes: int = 8192, dim: int = 32, beta: float = 0.25):
        super().__init__()
        self.n_codes, self.dim, self.beta = n_codes, dim, beta
        self.embedding = nn.Embedding(n_codes, dim)
        # The official init: uniform in +-1/n_codes (tiny, so early codes sit near the origin).
        nn.init.uniform_(self.embedding.weight, -1.0 / n_codes, 1.0 / n_codes)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook row for every vector of z: (..., dim) -> (...) long."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of size {self.dim}, got shape {tuple(z.shape)}")
        flat = z.reshape(-1, self.dim)  # (..., D) -> (M, D)
        codebook = self.embedding.weight
        # Squared distances written as the official code writes them, so ties break the same way.
        distances = (
            flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        )  # (M, n_codes)
        return distances.argmin(1).view(z.shape[:-1])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook rows of integer codes: (...) -> (..., dim). The official `get_codebook_entry`."""
        if codes.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.n_codes):
            raise ValueError(f"codes must lie in [0, {self.n_codes}), got [{codes.min()}, {codes.max()}]")
        return self.embedding(codes)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes = self.nearest(z)
        z_q = self.embedding(codes)
        # The "legacy" weighting of VectorQuantizer2 (see the header): commitment 1.0, codebook beta.
        loss = F.mse_loss(z, z_q.detach()) + self.beta * F.mse_loss(z_q, z.detach())
        # Straight-through estimator: the value of z_q, the gradient of z.
        z_q = z + (z_q - z).detach()
        return z_q, codes, loss

    @torch.no_grad()
    def usage(self, codes: torch.Tensor) -> tuple[float, float]:
        """(fraction of the codebook used, perplexity) of a batch of codes.

        Perplexity is exp(entropy) of the code histogram: the number of equally likely codes that would have
        the same entropy. It ranges from 1 (collapse onto one code) to n_codes (uniform use).
        """
        # float32, not float64: MPS has no float64, and 24 bits are plenty for a histogram's entropy.
        counts = torch.bincount(codes.flatten().long(), minlength=self.n_codes).float()
        p = counts / counts.sum().clamp(min=1)
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        return (counts > 0).float().mean().item(), math.exp(entropy)
