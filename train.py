"""train.py --tiny: the whole SEED pipeline on the shapes world.  (header docstring: train-core helper)

(Two helpers write this file at once; each edits only its own sections, with str_replace.)
"""

# ======================================================================================================
# Config dataclasses and the CLI generated from them.  (train-core helper; train-llm adds its own dataclass here)
# ======================================================================================================


# ======================================================================================================
# The shapes world (SHAPES_WORLD.md) and the judge.  (train-core helper)
# ======================================================================================================


# ======================================================================================================
# Stages 0-3: tiny CLIP, Causal Q-Former, codebook, decoder; their metrics.  (train-core helper)
# ======================================================================================================


# ======================================================================================================
# Stages 4-5: SEED-LLaMA pretraining and instruction tuning (LoRA, then full); LLM metrics.  (train-llm helper)
# ======================================================================================================


# ======================================================================================================
# Reports: metrics.json, results table, samples.png, curves.png, codes.png, eval images.  (train-llm helper)
# ======================================================================================================


# ======================================================================================================
# Orchestration: checkpoints, resume, DDP, main().  (train-core helper)
# ======================================================================================================
