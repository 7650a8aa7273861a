"""SEED-LLaMA: a LLaMA whose vocabulary also holds SEED's 8192 image codes.  (header docstring: llama-model helper)

(The two sections below are written by two helpers at once; each edits only its own section, with str_replace.)
"""
import torch

# ======================================================================================================
# Tokenizer: SentencePiece BPE read from tokenizer.model, plus SEED's added image tokens.
# (owned by the tokenizer helper; everything between this banner and the next one)
# ======================================================================================================


# ======================================================================================================
# Model: config, RMSNorm, RoPE, attention with KV cache, SwiGLU, blocks, generation, official loader.
# (owned by the llama-model helper; everything below this banner)
# ======================================================================================================
