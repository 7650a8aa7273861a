"""train.py --tiny: the whole SEED pipeline, trained from scratch on the shapes world in minutes on a laptop CPU.

SEED (Ge et al., "Making LLaMA SEE and Draw with SEED Tokenizer", ICLR 2024, arXiv:2310.01218) is trained in stages;
this script runs them in the paper's order, each with the *same classes* as the official model at tiny configs:

  0. tiny CLIP      EVA ViT (seed.EVAViT) + CLIP text tower (unet.CLIPTextEncoder), contrastive on (image, caption).
                    It plays the frozen pretrained ViT of BLIP-2 *and* the OpenCLIP ViT-H whose image-embedding
                    space the unCLIP decoder draws from.
  1. Causal Q-Former  image-text contrastive (ITC) between the last query and the text [CLS], ViT frozen.
  2. Codebook       VQ + cosine reconstruction of the causal embeddings + MSE to the tiny-CLIP image embedding,
                    Q-Former frozen (official weights 5 * VQ + 2 * cos + 0.5 * MSE).
  3. Decoder        the unCLIP UNet in pixel space (32x32, no VAE), v-prediction, conditioned on tiny-CLIP image
                    embeddings through the unCLIP noise-augmentation class label, condition dropout for CFG, EMA.
  4. SEED-LLaMA pretraining on caption -> image and image -> caption sequences.
  5. Instruction tuning in the official chat template (LoRA, then full fine-tuning).

The data is the shapes world (docs: SHAPES_WORLD.md): 150 attribute combinations x 9 jitters = 1350 images of 32x32,
generated on the fly and deterministically. Generated images are judged by a pixel-heuristic `judge` that is not a
model under test. Every stage is a plain function `stage_x(run, prev) -> dict`; its training loop (`Run.train`)
writes an atomic checkpoint with the optimiser state, so `--resume` continues mid-stage or after the last completed
stage; each stage also caches its frozen features of all 1350 images once instead of re-running frozen encoders.

Official training code this mirrors: AILab-CVC/SEED (SEED_Tokenizer/lavis/models/blip2_models/
blip2_qformer_causual.py for stage 1, blip2_qformer_codebook_all_image.py for stage 2). Deliberate deviations:
  * everything is tiny (a 4-layer ViT on 4x4 patches of a 32x32 image, a 4-layer Q-Former of width 128, a codebook of
    256 x 32, a 0.6M-parameter pixel UNet) and the frozen "pretrained" towers are trained here first (stage 0);
  * the unCLIP decoder is trained in pixel space, so there is no VAE; the official one is a latent model;
  * dead codes are restarted from recent encoder outputs during stage 2 (the official code has no restart; a
    256-code book on a 150-concept world collapses without it);
  * DDP is written out as an explicit gradient all-reduce (what DistributedDataParallel does in buckets), because
    several stages train a few modules called in different orders, which DDP wrappers make hard to read.

Usage:
  python train.py --tiny                       # every stage; results table + metrics.json in out/tiny/
  python train.py --tiny --resume              # continue an interrupted run
  python train.py --tiny --no-causal           # the bidirectional Q-Former ablation, all else equal
  python train.py --tiny --smoke               # a handful of steps per stage (tests)
  torchrun --nproc_per_node=2 train.py --tiny  # data parallel (gloo on CPU, nccl on CUDA)
  python train.py --help                       # every field of the config dataclasses is a flag
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

# ======================================================================================================
# Config dataclasses and the CLI generated from them.  (train-core helper; train-llm adds its own dataclass here)
# ======================================================================================================

@dataclass
class ClipStageConfig:
    """Stage 0: the tiny CLIP (EVA ViT image tower + CLIP text tower), trained contrastively."""
    steps: int = 250
    batch_size: int = 128
    lr: float = 2e-3
    width: int = 128       # ViT width; 4 layers of 4 heads on 4x4 patches -> 64 patch tokens + CLS
    depth: int = 4
    heads: int = 4
    patch_size: int = 4
    text_width: int = 64   # text tower; 2 layers
    text_depth: int = 2
    embed_dim: int = 64    # E: the shared image/text embedding space (plays OpenCLIP ViT-H's 1024)


@dataclass
class QFormerStageConfig:
    """Stage 1: the Causal Q-Former, ITC between the last query and the text [CLS] (ViT frozen)."""
    steps: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    width: int = 128
    depth: int = 4         # cross-attention in every 2nd layer, as the official (l % 2 == 0)
    heads: int = 4
    num_queries: int = 32  # the paper's 32 causal codes per image
    label_smoothing: float = 0.1  # official ITC
    temperature: float = 0.07     # official initial (learnable) temperature


@dataclass
class CodebookStageConfig:
    """Stage 2: VQ codebook + reconstruction heads (Q-Former frozen)."""
    steps: int = 400
    batch_size: int = 128
    lr: float = 2e-3
    n_embed: int = 256     # codebook size (official 8192)
    code_dim: int = 32     # official 32
    decoder_depth: int = 2 # ViT blocks of the embedding decoder (official 4)
    w_vq: float = 5.0      # official loss weights: 5 * VQ + 2 * cos + 0.5 * MSE
    w_cos: float = 2.0
    w_mse: float = 0.5
    restart_every: int = 25  # re-seed unused codes from encoder outputs every N steps (0: never)


@dataclass
class DecoderStageConfig:
    """Stage 3: the unCLIP UNet in pixel space, v-prediction, EMA, condition dropout for CFG."""
    steps: int = 900
    batch_size: int = 64
    lr: float = 2e-3
    ema: float = 0.995         # EMA decay (with warm-up: min(ema, (1 + step) / (10 + step)))
    cond_drop: float = 0.1     # probability of the zero class label (classifier-free guidance)
    noise_level: int = 0       # unCLIP noise augmentation level used at sampling time
    sample_steps: int = 25
    guidance: float = 2.5
    sampler: str = "ddim"      # "ddim" or "pndm" (unet.py's samplers)
    eval_images: int = 150     # reconstructions judged for the decoder metric (test images, one per combination)


@dataclass
class LLMConfig:
    """Stages 4-5: SEED-LLaMA pretraining and instruction tuning.  (train-llm helper fills this in)"""


@dataclass
class TrainConfig:
    """Everything `python train.py --tiny` does; every field is a command-line flag (nested: --clip.steps)."""
    tiny: bool = False         # the tiny preset on the shapes world (the only training preset)
    out: str = "out/tiny"
    stages: str = "0,1,2,3,4,5"
    resume: bool = False
    smoke: bool = False        # a handful of steps per stage: the whole run in well under a minute (tests)
    seed: int = 0
    device: str = "auto"       # auto = cuda -> mps -> cpu
    threads: int = 0           # torch CPU threads per process (0: leave torch's default)
    no_causal: bool = False    # bidirectional Q-Former, all else equal (the paper's ablation)
    ckpt_every: int = 50       # steps between mid-stage checkpoints
    clip: ClipStageConfig = field(default_factory=ClipStageConfig)
    qformer: QFormerStageConfig = field(default_factory=QFormerStageConfig)
    codebook: CodebookStageConfig = field(default_factory=CodebookStageConfig)
    decoder: DecoderStageConfig = field(default_factory=DecoderStageConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)


SMOKE_STEPS = 3  # steps of every stage under --smoke


def apply_smoke(cfg: TrainConfig) -> TrainConfig:
    """--smoke: every `steps` field to SMOKE_STEPS and batches small, so the whole run takes seconds."""
    def shrink(dc):
        for f in dataclasses.fields(dc):
            value = getattr(dc, f.name)
            if dataclasses.is_dataclass(value):
                shrink(value)
            elif f.name.endswith("steps") and f.name != "sample_steps" and isinstance(value, int):
                setattr(dc, f.name, min(value, SMOKE_STEPS))
            elif f.name.endswith("batch_size") and isinstance(value, int):
                setattr(dc, f.name, min(value, 16))
    shrink(cfg)
    cfg.decoder.sample_steps, cfg.decoder.eval_images = 2, 8
    cfg.ckpt_every = 2
    return cfg


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _add_dataclass_args(parser: argparse.ArgumentParser, dc, prefix: str = "") -> None:
    """One flag per field, recursing into nested dataclasses: `steps` of `clip` becomes --clip.steps.

    Underscores may be written as dashes (--no-causal == --no_causal). A bool field is a switch (`--resume`) that
    also takes an explicit value (`--resume false`). The type of each flag is the type of its default value.
    """
    for f in dataclasses.fields(dc):
        value, name = getattr(dc, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            _add_dataclass_args(parser, value, name + ".")
            continue
        flags = sorted({"--" + name, "--" + name.replace("_", "-")})
        comment = f"(default: {value!r})"
        if isinstance(value, bool):
            parser.add_argument(*flags, dest=name, type=_parse_bool, nargs="?", const=True, default=value,
                                help=comment)
        elif isinstance(value, (int, float, str)):
            parser.add_argument(*flags, dest=name, type=type(value), default=value, help=comment)
        else:
            raise TypeError(f"config field {name} has a type the CLI cannot parse: {type(value).__name__}")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from the command line: defaults, then --smoke, then the flags that were given."""
    cfg = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_dataclass_args(parser, cfg)
    args = vars(parser.parse_args(argv))
    if args["smoke"]:
        apply_smoke(cfg)
    defaults = TrainConfig()  # a flag only overrides --smoke when it differs from the plain default
    for name, value in args.items():
        obj, default = cfg, defaults
        *parents, leaf = name.split(".")
        for parent in parents:
            obj, default = getattr(obj, parent), getattr(default, parent)
        if value != getattr(default, leaf):
            setattr(obj, leaf, value)
    return cfg


# ======================================================================================================
# The shapes world (SHAPES_WORLD.md) and the judge.  (train-core helper)
# ======================================================================================================

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40),
           "purple": (150, 60, 190)}
SIZES = {"small": 8, "large": 14}  # side of the shape's box in pixels
POSITIONS = {"center": (16, 16), "left": (10, 16), "right": (22, 16), "top": (16, 10), "bottom": (16, 22)}
PLACES = {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right",
          "center": "in the center"}
JITTERS = tuple((dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1))  # 9 offsets of the box centre
HELD_OUT_PAIRS = (("triangle", "blue"), ("circle", "yellow"), ("square", "purple"))  # never drawn by the LLM in training
QUESTIONS = {"colour": "what colour is the shape?", "shape": "what shape is it?", "size": "is it large or small?",
             "position": "where is the shape?"}
IMAGE_SIZE, SUPERSAMPLE = 32, 4


@dataclass(frozen=True)
class Combo:
    """One of the 150 attribute combinations of the shapes world."""
    shape: str
    colour: str
    size: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {PLACES[self.position]}"

    @property
    def held_out(self) -> bool:
        return (self.shape, self.colour) in HELD_OUT_PAIRS

    def answer(self, attribute: str) -> str:
        """The VQA answer for one of QUESTIONS' attributes: one word, or the place phrase for the position."""
        return PLACES[self.position] if attribute == "position" else getattr(self, attribute)

    def edit(self, attribute: str, value: str) -> tuple[str, "Combo"]:
        """The instruction that changes exactly `attribute` to `value`, and the target combination."""
        instruction = {"colour": f"make it {value}", "shape": f"turn it into a {value}", "size": f"make it {value}",
                       "position": f"move it {PLACES.get(value, '')}"}[attribute]
        return instruction, dataclasses.replace(self, **{attribute: value})


# Fixed enumeration order (shape, colour, size, position): the index of a combination is stable across versions.
COMBOS = tuple(Combo(s, c, z, p) for s in SHAPES for c in COLOURS for z in SIZES for p in POSITIONS)
CAPTIONS = tuple(c.caption for c in COMBOS)


def render(combo: Combo, jitter: tuple[int, int] = (0, 0)) -> Image.Image:
    """Draw one 32x32 image exactly as SHAPES_WORLD.md specifies (4x supersampling, then a box filter)."""
    k, s = SUPERSAMPLE, SIZES[combo.size]
    cx, cy = POSITIONS[combo.position][0] + jitter[0], POSITIONS[combo.position][1] + jitter[1]
    big = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), (255, 255, 255))
    draw = ImageDraw.Draw(big)
    # The box spans [c - s/2, c + s/2) in continuous coordinates; at 4x these are whole supersampled pixels
    # x0 .. x1 - 1, and PIL's boxes are inclusive of both ends.
    x0, y0, x1, y1 = k * (cx - s / 2), k * (cy - s / 2), k * (cx + s / 2), k * (cy + s / 2)
    colour = COLOURS[combo.colour]
    if combo.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
    elif combo.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=colour)
    else:  # apex at the top middle of the box, base on its bottom edge
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=colour)
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


@dataclass
class World:
    """All 1350 images of the shapes world as one tensor, with their combination index and the train/test split.

    Split (used by every stage): for combination i, the jitters i % 9 and (i + 4) % 9 are *test* images, the other
    7 are *train* images. So the 300 test images cover every combination twice and every jitter equally, and no
    stage ever trains on them. The tokenizer's caption classification is measured on the test images.
    """
    images: torch.Tensor   # (1350, 3, 32, 32) float in [-1, 1]
    combo: torch.Tensor    # (1350,) long: index into COMBOS
    jitter: torch.Tensor   # (1350,) long: index into JITTERS
    test: torch.Tensor     # (1350,) bool

    @property
    def train_idx(self) -> torch.Tensor:
        return torch.nonzero(~self.test).squeeze(1)

    @property
    def test_idx(self) -> torch.Tensor:
        return torch.nonzero(self.test).squeeze(1)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]: the pixel space of every tiny model."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def to_image(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB."""
    array = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def build_world() -> World:
    """Render the whole world (deterministic: no randomness at all; takes about a second)."""
    images, combos, jitters, test = [], [], [], []
    for i, combo in enumerate(COMBOS):
        for j, jitter in enumerate(JITTERS):
            images.append(to_tensor(render(combo, jitter)))
            combos.append(i)
            jitters.append(j)
            test.append(j in (i % 9, (i + 4) % 9))
    return World(torch.stack(images), torch.tensor(combos), torch.tensor(jitters), torch.tensor(test))


# --- The judge: a pixel heuristic, so that generated images are scored by something that is not a model under test.
_PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # (5, 3)


def judge(image: Image.Image | torch.Tensor) -> dict[str, str | None]:
    """Read (shape, colour, size, position) off a 32x32 image by pixel heuristics; None where nothing is drawn.

    1. colour: the mean of the most strongly coloured pixels (>= 60 % of the largest distance from white), snapped to
       the nearest palette colour;
    2. coverage a in [0, 1] per pixel: how far the pixel went from white towards that colour (the anti-aliasing
       weight), below 0.2 treated as background noise;
    3. size: the box side is the longest row or column of coverage (8 vs 14 px: threshold 11);
    4. position: the centre of the box spanned by pixels with coverage >= 0.5, snapped to the nearest of the 5 centres
       (they are 6 px apart; jitter moves them 1 px);
    5. shape: the fill ratio, total coverage / (width x height): square 1, circle pi/4 = 0.79, triangle 0.5.
    """
    x = to_tensor(image) if isinstance(image, Image.Image) else image.detach().float().cpu()
    rgb = ((x.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0)           # (3, H, W) -> (H, W, 3) in [0, 255]
    away = 255.0 - rgb                                               # distance from white per channel
    strength = away.norm(dim=-1)                                     # (H, W)
    if strength.max() < 40:                                          # a blank canvas
        return {"shape": None, "colour": None, "size": None, "position": None}
    strong = strength >= 0.6 * strength.max()
    mean_colour = rgb[strong].mean(0)
    c = int(((_PALETTE - mean_colour) ** 2).sum(1).argmin())
    colour_away = 255.0 - _PALETTE[c]
    cover = (away @ colour_away / colour_away.dot(colour_away)).clamp(0, 1)  # projection onto white -> colour
    cover = torch.where(cover < 0.2, torch.zeros_like(cover), cover)
    width, height = float(cover.sum(1).max()), float(cover.sum(0).max())
    size = "large" if max(width, height) > 11 else "small"
    ys, xs = torch.nonzero(cover >= 0.5, as_tuple=True)
    if len(xs) == 0:
        return {"shape": None, "colour": list(COLOURS)[c], "size": size, "position": None}
    centre = torch.tensor([(xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2], dtype=torch.float32)
    centres = torch.tensor(list(POSITIONS.values()), dtype=torch.float32)
    position = list(POSITIONS)[int(((centres - centre) ** 2).sum(1).argmin())]
    fill = float(cover.sum()) / max(width * height, 1.0)
    shape = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
    return {"shape": shape, "colour": list(COLOURS)[c], "size": size, "position": position}


def judge_accuracy(images, combos) -> dict[str, float]:
    """Per-attribute and all-attributes accuracy of `judge` on images against their intended combinations."""
    hits = {a: 0 for a in ("shape", "colour", "size", "position", "all")}
    for image, combo in zip(images, combos):
        verdict = judge(image)
        right = [verdict[a] == getattr(combo, a) for a in ("shape", "colour", "size", "position")]
        for a, ok in zip(("shape", "colour", "size", "position"), right):
            hits[a] += ok
        hits["all"] += all(right)
    return {a: h / max(len(combos), 1) for a, h in hits.items()}


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

def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" = cuda -> mps -> cpu; under torchrun each process takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    if name not in ("cpu", "mps"):
        raise ValueError(f"unknown --device {name!r}: choose auto, cuda, mps or cpu")
    return torch.device(name)


def lr_at(step: int, steps: int, base: float) -> float:
    """Linear warm-up over the first 5 % of the steps, then cosine decay to 10 % of the base rate."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to a temporary file, then os.replace: a checkpoint on disk is always whole, even after a kill."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Run:
    """What every stage shares: config, world, device, process group, output folder, metrics and loss curves.

    The stage protocol: a stage is `stage_x(run, prev) -> dict`; `prev` holds what earlier stages returned (trained
    modules, cached features) and the returned dict is merged into it. A stage builds its modules, then calls
    `run.train(...)`, which either trains them (resuming from the stage's checkpoint under --resume), or, when the
    stage is not in --stages, loads its completed checkpoint. Afterwards the stage records its metrics in
    `run.metrics[stage]`. Only rank 0 writes files.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.rank, self.world_size = 0, 1
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # launched by torchrun
            backend = "nccl" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = pick_device(cfg.device, local_rank)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.selected = {int(s) for s in cfg.stages.split(",") if s.strip()}
        if not self.selected <= set(range(6)):
            raise ValueError(f"--stages takes stage numbers 0-5, got {cfg.stages!r}")
        self.world = build_world()
        self.metrics: dict[str, dict] = {}
        self.curves: dict[str, list[float]] = {}
        self.timings: dict[str, float] = {}
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def seed_everything(self, stage: int) -> None:
        """Same initial weights for a stage whatever ran before it, on every rank."""
        torch.manual_seed(self.cfg.seed * 1000 + stage)

    def generator(self, stage: int, step: int) -> torch.Generator:
        """The randomness of one training step (batch, noise, dropout masks) depends only on (seed, stage, step),
        identically on every rank. This is what makes a resumed run bit-identical to an uninterrupted one."""
        return torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + stage) * 1_000_003 + step)

    def batch(self, pool: torch.Tensor, batch_size: int, gen: torch.Generator) -> torch.Tensor:
        """This rank's share of a global batch drawn (with replacement) from the index pool."""
        idx = pool[torch.randint(len(pool), (batch_size,), generator=gen)]
        return idx[self.rank::self.world_size]

    def sync_grads(self, params: list[nn.Parameter]) -> None:
        """Data parallelism: average gradients over the ranks (what DDP's bucketed all-reduce computes)."""
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def ckpt_path(self, name: str) -> Path:
        return self.out / "ckpt" / f"{name}.pt"

    def train(self, stage: int, name: str, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None,
              steps: int, lr: float, step_fn, after_step=None) -> None:
        """The training loop of every stage, with checkpoints and resume.

        `step_fn(step, gen) -> loss` computes this rank's loss of one step; `after_step(step, gen)` runs after the
        optimiser step (EMA, dead-code restarts). The checkpoint `OUT/ckpt/<name>.pt` holds every module in
        `modules`, the optimiser state, the step and the loss curve; it is written every `--ckpt-every` steps and at
        the end, atomically. A stage outside --stages is loaded from its completed checkpoint instead of trained.
        """
        path, start, curve, seconds = self.ckpt_path(name), 0, [], 0.0
        if stage not in self.selected or self.cfg.resume:
            if path.exists():
                state = torch.load(path, map_location=self.device, weights_only=True)
                for key, module in modules.items():
                    module.load_state_dict(state["modules"][key])
                if optimizer is not None and state["optimizer"] is not None:
                    optimizer.load_state_dict(state["optimizer"])
                start, curve, seconds = state["step"], state["curve"], state["seconds"]
            if stage not in self.selected and start < steps:
                raise FileNotFoundError(f"stage {stage} ({name}) is not in --stages {self.cfg.stages} and {path} "
                                        f"does not hold a completed run of it ({start}/{steps} steps): train it first")
        crash = os.environ.get("SEED_TRAIN_CRASH", "")  # test hook "name:step": die after that step, as a kill would
        crash_step = int(crash.split(":")[1]) if crash.split(":")[0] == name else -1
        params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
        t0 = time.time() - seconds
        for step in tqdm(range(start, steps), desc=f"stage {stage} {name}", initial=start, total=steps,
                         disable=not self.main, mininterval=2.0, dynamic_ncols=True):
            gen = self.generator(stage, step)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, lr)
            loss = step_fn(step, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.sync_grads(params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if after_step is not None:
                after_step(step, gen)
            curve.append(float(loss))
            if (step + 1) % self.cfg.ckpt_every == 0 or step + 1 == steps:
                self.save_checkpoint(path, step + 1, modules, optimizer, curve, time.time() - t0)
            if step + 1 == crash_step:
                raise RuntimeError(f"SEED_TRAIN_CRASH: simulated crash after step {crash_step} of stage {name}")
        for module in modules.values():
            module.eval()
        self.curves[name] = curve
        self.timings[name] = time.time() - t0 if start < steps else seconds

    def save_checkpoint(self, path: Path, step: int, modules: dict[str, nn.Module], optimizer, curve: list[float],
                        seconds: float) -> None:
        if self.main:
            atomic_torch_save({"step": step, "modules": {k: m.state_dict() for k, m in modules.items()},
                               "optimizer": optimizer.state_dict() if optimizer is not None else None,
                               "curve": curve, "seconds": seconds}, path)
        self.barrier()

    def save_pretrained(self, model: nn.Module, name: str) -> None:
        """A component in the native checkpoint format (config.json + model.safetensors) under OUT/<name>/."""
        if self.main:
            model.save_pretrained(self.out / name)
        self.barrier()


# The stages in paper order. Stages 4-5 and `write_reports(run, outputs)` are defined in the sections above by the
# train-llm part; they are looked up by name so that a checkout with only stages 0-3 still runs them.
STAGES = ((0, "stage_clip"), (1, "stage_qformer"), (2, "stage_codebook"), (3, "stage_decoder"),
          (4, "stage_llm_pretrain"), (5, "stage_llm_instruct"))


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    if not cfg.tiny:
        raise SystemExit("train.py has one training preset, the tiny SEED on the shapes world: "
                         "run `python train.py --tiny` (see --help for every option)")
    run = Run(cfg)
    outputs: dict = {}
    t0 = time.time()
    for stage, fn_name in STAGES:
        if stage > max(run.selected):
            break
        if fn_name not in globals():
            raise NotImplementedError(f"stage {stage} ({fn_name}) is not defined in train.py")
        outputs.update(globals()[fn_name](run, outputs))
    run.timings["total"] = time.time() - t0
    if "write_reports" in globals():
        globals()["write_reports"](run, outputs)
    if run.world_size > 1:
        dist.destroy_process_group()
    return outputs


if __name__ == "__main__":
    main()
