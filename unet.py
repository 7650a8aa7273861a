"""The unCLIP decoder of SEED: stable-diffusion-2-1-unclip reimplemented.  (header docstring: unet helper)

(The sections below are written by two helpers at once; each edits only its own sections, with str_replace.)
"""
import torch

# ======================================================================================================
# CLIP text side: the OpenCLIP ViT-H text tower as SD-2 uses it, and the CLIP BPE tokenizer.
# (owned by the clip/sampler helper; config dataclass CLIPTextConfig lives here too)
# ======================================================================================================


# ======================================================================================================
# Noise schedules, unCLIP noise augmentation, samplers (PNDM default, DDIM alternative).
# (owned by the clip/sampler helper)
# ======================================================================================================


# ======================================================================================================
# UNet (SD-2.1-unclip), VAE decoder, UnCLIPDecoder pipeline and official loader.
# (owned by the unet helper; its config dataclasses may sit at the start of this section)
# ======================================================================================================
