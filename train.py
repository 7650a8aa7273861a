"""train.py --tiny: the whole SEED pipeline, trained from scratch on the shapes world in minutes on a laptop CPU.

SEED (Ge et al., "Making LLaMA SEE and Draw with SEED Tokenizer", ICLR 2024, arXiv:2310.01218) is trained in stages;
this script runs them in the paper's order, each with the *same classes* as the official model at tiny configs:

  0. tiny CLIP      EVA ViT (seed.EVAViT) + CLIP text tower (unet.CLIPTextEncoder), contrastive on (image, caption).
                    It plays the frozen pretrained ViT of BLIP-2 *and* the OpenCLIP ViT-H whose image-embedding
                    space the unCLIP decoder draws from.
  1. Causal Q-Former  image-text contrastive (ITC) between the last query and the text [CLS], ViT frozen.
  2. Codebook       VQ + reconstruction of the causal embeddings and of the tiny-CLIP image embedding, Q-Former frozen.
  3. Decoder        the unCLIP UNet in pixel space, conditioned on tiny-CLIP image embeddings (v-prediction, CFG, EMA).
  4. SEED-LLaMA pretraining on caption -> image and image -> caption sequences.
  5. Instruction tuning in the official chat template (LoRA, then full fine-tuning).

The data is the 1350 images of world.py; generated images are judged by its pixel heuristic, world.judge. The file
reads in the order it runs: the configs and their CLI; `Run`, the training loop all stages share (atomic checkpoints
with the optimiser state, so `--resume` continues mid-stage; data parallelism); the stages `stage_x(run, prev)`, each
below what it uses, caching the frozen features of all 1350 images once; the LLM evaluation; the reports; `main`.

Official training code this mirrors: AILab-CVC/SEED @ 93b3cf4, SEED_Tokenizer/lavis/models/blip2_models/
blip2_qformer_casual.py (stage 1) and blip2_qformer_codebook_all_image.py (stage 2). Deliberate deviations:
  * everything is tiny (the `tiny` presets of seed.py, unet.py and llama.py: a 4-layer ViT of width 128, a 2-layer
    Q-Former, a 0.59M-parameter pixel UNet, a 1M-parameter LLaMA); the frozen "pretrained" towers are trained here;
  * the unCLIP decoder is trained in pixel space, so there is no VAE; the official one is a latent model; its
    resnets take the condition as FiLM (scale and shift) where SD-2.1-unclip adds it, because a condition that only
    shifts the features did not make this small UNet draw shapes in a CPU budget;
  * the tiny text towers (the CLIP text tower, the Q-Former's text branch) read one token per word of the world,
    23 ids with bos, eos and pad, where the official ones use CLIP's BPE and BERT's WordPiece;
  * unused codes are re-seeded from encoder outputs during stage 2 (the official code has no restart; at tiny scale
    most codes would never be chosen, wasting the vocabulary the LLM learns);
  * stage 2 adds an attribute-factorisation loss (`factor_loss`): with the official loss alone each code value
    comes to name a whole (shape, colour, size, position) combination, repeated along the 32 positions, so the LLM
    cannot draw an unseen pair from codes it has written; with it, positions 0-7 carry the shape, 8-15 the colour,
    16-23 the size and 24-31 the position (code_probes.png);
  * DDP is written out as an explicit gradient all-reduce (what DistributedDataParallel does in buckets), because
    several stages train a few modules called in different orders, which DDP wrappers make hard to read.

Usage:
  python train.py --tiny                       # every stage; results table + metrics.json in out/tiny/
  python train.py --tiny --resume              # continue an interrupted run (same flags; one run per folder)
  python train.py --tiny --overwrite           # a new run in place of the one in --out
  python train.py --tiny --no-causal           # the bidirectional Q-Former ablation, all else equal
  python train.py --tiny --no-causal --out out/bidir --compare out/tiny   # ... its figures beside the default's
  python train.py --tiny --smoke               # a handful of steps per stage (tests)
  torchrun --nproc_per_node=2 train.py --tiny  # data parallel (gloo on CPU, nccl on CUDA)
  python train.py --help                       # every field of the config dataclasses is a flag
  python sample.py --ckpt out/tiny             # then every task on what was trained (its generation_config.json)
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import platform
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import llama
import seed
import unet
import vq
import weights
from world import (ATTRIBUTES, CAPTION_REQUESTS, CAPTIONS, COMBOS, IMAGE_SIZE, JITTERS, QUESTIONS, T2I_REQUESTS,
                   Combo, VALUES, World, build_world, judge, judge_accuracy, parse_caption, to_image)
from tokenizer import (BOI_TOKEN, CODES_PER_IMAGE, EOI_TOKEN, IMAGE_PLACEHOLDER, Tokenizer, chat_conversation,
                       train_tokenizer)

# === The configs, and the CLI generated from them: every field is a flag. ===========================================
@dataclass
class ClipStageConfig:
    """Stage 0; the image tower and the shared width E (128 for OpenCLIP ViT-H's 1024) are seed.py's tiny preset."""
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    text_width: int = 64   # the text tower
    text_depth: int = 2

@dataclass
class QFormerStageConfig:
    """Stage 1; the Q-Former's sizes are seed.py's tiny preset (2 layers of width 128, 32 queries)."""
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    label_smoothing: float = 0.1  # official ITC
    temperature: float = 0.07     # official initial (learnable) temperature

@dataclass
class CodebookStageConfig:
    """Stage 2; the codebook's sizes are seed.py's tiny preset."""
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    w_vq: float = 5.0      # the official loss weights
    w_cos: float = 2.0
    w_mse: float = 0.5
    restart_every: int = 25  # re-seed unused codes from encoder outputs every N steps (0: never)
    w_factor: float = 5.0  # the attribute-factorisation loss (`factor_loss`; 0: the official loss alone): the
    #                        higher, the more held-out pairs the LLM composes (README, the variants table)

@dataclass
class DecoderStageConfig:
    """Stage 3; the UNet's sizes are unet.py's `tiny` preset."""
    steps: int = 2000
    batch_size: int = 64
    lr: float = 4e-3
    ema: float = 0.995         # EMA decay (with warm-up: min(ema, (1 + step) / (10 + step)))
    cond_drop: float = 0.1     # probability of the zero class label (classifier-free guidance)
    train_noise_level: int = 100  # unCLIP noise augmentation levels drawn in [0, this] during training
    noise_level: int = 0       # the level used at sampling time (the official default)
    sample_steps: int = 25     # PNDM steps (unet.UnCLIPDecoder, as sample.py samples)
    guidance: float = 2.5
    eval_images: int = 150     # reconstructions judged for the decoder metric (test images, one per combination)
    bf16: bool = True          # the UNet's training step under bf16 autocast where weights.bf16_matrix_units (AMX,
    #                            CUDA): 1.75x a step on AMX, judged the same (README); fp32 on other devices

@dataclass
class LLMConfig:
    """Stages 4-5; the LLaMA's sizes are llama.py's `tiny` preset, its vocabulary the world's text + one per code."""
    text_vocab_size: int = 640   # at most this many SentencePiece pieces (3 special + 256 bytes + merges)
    batch_size: int = 32
    micro_batches: int = 4       # each batch sorted by length and cut into this many, each padded to its own longest
    pretrain_steps: int = 1600
    pretrain_lr: float = 3e-3
    reverse_ratio: float = 0.5   # official: half of the image-text pairs are trained image -> caption
    attribute_requests: float = 0.0  # fraction of text-to-image turns that name only some attributes (world.py)
    lora_steps: int = 60
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_lr: float = 5e-3
    lora_embeddings: bool = True  # also train embed_tokens and lm_head in the LoRA phase (PEFT's modules_to_save):
    #                               the chat template's words were never seen in pretraining
    sft_steps: int = 400
    sft_lr: float = 1e-3
    eval_edits: int = 75         # edit requests judged (text-to-image is judged on all 150 combinations)

@dataclass
class TrainConfig:
    """Everything `python train.py --tiny` does; every field is a command-line flag (nested: --clip.steps)."""
    tiny: bool = False         # the tiny preset on the shapes world (the only training preset)
    out: str = "out/tiny"
    stages: str = "0,1,2,3,4,5"
    resume: bool = False       # continue the run in --out, which must have been started with the same weight flags
    overwrite: bool = False    # start a new run in a non-empty --out (refused without this or --resume)
    smoke: bool = False        # a handful of steps per stage: the whole run in well under a minute (tests)
    seed: int = 0
    device: str = "auto"       # one of DEVICES
    threads: int = 0           # torch CPU threads per process (0: leave torch's default)
    no_causal: bool = False    # bidirectional Q-Former, all else equal (the paper's ablation; SeedConfig.causal)
    ckpt_every: int = 50       # steps between mid-stage checkpoints
    compare: str = ""          # another run's --out (e.g. the --no-causal one): its probes and code losses are drawn
    #                            beside this run's in code_probes.png and code_loss_by_position.png
    clip: ClipStageConfig = field(default_factory=ClipStageConfig)
    qformer: QFormerStageConfig = field(default_factory=QFormerStageConfig)
    codebook: CodebookStageConfig = field(default_factory=CodebookStageConfig)
    decoder: DecoderStageConfig = field(default_factory=DecoderStageConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)

DEVICES = ("auto", "cpu", "cuda", "mps")  # --device; "auto" = cuda -> mps -> cpu
# The fields that do not change a run's weights: where and how it runs, and the evaluation's sampling settings.
# Every other field shapes the weights, so a --resume that changes one is refused (`Run.identify`).
NOT_WEIGHT_FLAGS = {"out", "stages", "resume", "overwrite", "device", "threads", "ckpt_every", "decoder.sample_steps",
                    "decoder.guidance", "decoder.noise_level", "decoder.eval_images", "llm.eval_edits"}
RUN_FILE, LOCK_FILE = "run.json", ".train.lock"  # in --out: the run's id and weight flags; held while it runs
SMOKE_STEPS = 3  # steps of every stage under --smoke

def apply_smoke(cfg: TrainConfig) -> TrainConfig:
    """--smoke: every `steps` field to SMOKE_STEPS and batches small, so the whole run takes seconds."""
    def shrink(dc):
        for f in dataclasses.fields(dc):
            value = getattr(dc, f.name)
            if dataclasses.is_dataclass(value):
                shrink(value)
            elif f.name.endswith(("steps", "batch_size")):
                setattr(dc, f.name, min(value, SMOKE_STEPS if f.name.endswith("steps") else 16))
    shrink(cfg)
    cfg.decoder.sample_steps, cfg.decoder.eval_images = 2, 8  # the sampler's steps, not training steps
    cfg.ckpt_every = 2
    return cfg

def weight_flags(cfg: TrainConfig) -> dict:
    """The fields of `cfg` that shape the weights, by flag name: {"seed": 0, "clip.steps": 400, ...}."""
    flags = {}

    def walk(dc, prefix: str) -> None:
        for f in dataclasses.fields(dc):
            value, name = getattr(dc, f.name), prefix + f.name
            if dataclasses.is_dataclass(value):
                walk(value, name + ".")
            elif name not in NOT_WEIGHT_FLAGS:
                flags[name] = value
    walk(cfg, "")
    return flags

def _parse_bool(text: str) -> bool:
    if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")
    return text.lower() in ("1", "true", "yes", "on")

def field_comments(dc) -> dict[str, str]:
    """The comment after each field of a config dataclass in this file (and its `#` continuation lines): the flag's
    help, written once beside the field it explains."""
    comments, name = {}, None
    for line in inspect.getsource(type(dc)).splitlines():
        if m := re.match(r"\s+(\w+): [^#]*?(?:#\s*(.*))?$", line):
            name = m.group(1)
            comments[name] = m.group(2) or ""
        elif (m := re.match(r"\s+#\s*(.*)$", line)) and name:
            comments[name] = f"{comments[name]} {m.group(1)}".strip()
    return comments

def _add_dataclass_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, dc, prefix: str = "") -> None:
    """One flag per field, typed by its default, nested dataclasses prefixed (--clip.steps), dashes or underscores
    (--no-causal == --no_causal); a bool is a switch (`--resume`) that also takes a value (`--resume false`). The
    help is the field's comment and its default."""
    comments = field_comments(dc)
    for f in dataclasses.fields(dc):
        value, name = getattr(dc, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):  # one group per stage, headed by its config's docstring
            _add_dataclass_args(parser.add_argument_group(f"--{name}.*", type(value).__doc__), value, name + ".")
            continue
        flags = sorted({"--" + name, "--" + name.replace("_", "-")})
        default = f"(default {value})" if not isinstance(value, bool) else \
            "(switch, default on; 'false' turns it off)" if value else "(switch, default off)"
        shown = " ".join(filter(None, [comments.get(f.name, ""), default]))
        if isinstance(value, bool):
            parser.add_argument(*flags, dest=name, type=_parse_bool, nargs="?", const=True, default=value, help=shown)
        elif isinstance(value, (int, float, str)):
            parser.add_argument(*flags, dest=name, type=type(value), default=value, help=shown,
                                metavar=type(value).__name__.upper())
        else:
            raise TypeError(f"config field {name} has a type the CLI cannot parse: {type(value).__name__}")

class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help: each flag once, in its dashed spelling (the underscore one is accepted too), a switch without a value."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        flag = max(action.option_strings, key=lambda s: (s.count("-"), len(s)))
        return flag if action.nargs in ("?", 0) else f"{flag} {action.metavar}"

def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from the command line: defaults, then --smoke, then the flags that were given."""
    cfg = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     usage="python train.py --tiny [options]", formatter_class=_HelpFormatter,
                                     epilog=__doc__[__doc__.index("Usage:"):])
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

# === Run: what the stages share, and the one training loop (checkpoints, resume, data parallelism). =================
def learning_rate(step: int, steps: int, base: float) -> float:
    """Linear warm-up over the first 5 % of the steps, then cosine decay to 10 % of the base rate."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

class Run:
    """What every stage shares: config, world, device, process group, output folder, metrics and loss curves. A
    stage is `stage_x(run, prev) -> dict`: `prev` holds what earlier stages returned (trained modules, cached
    features), and the dict returned is merged into it. It builds its modules and calls `run.train(...)`, which
    trains them (resuming from the stage's checkpoint under --resume) or, for a stage not in --stages, loads its
    completed checkpoint; then it records its metrics in `run.metrics[group]`. Only rank 0 (`run.main`) writes files."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.rank, self.world_size = 0, 1
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # launched by torchrun
            dist.init_process_group("nccl" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "gloo")
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.main = self.rank == 0
        if cfg.device not in DEVICES:
            raise ValueError(f"unknown --device {cfg.device!r}: choose {', '.join(DEVICES)}")
        # under torchrun each process takes the GPU of its local rank
        self.device = weights.pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.selected = {int(s) for s in cfg.stages.split(",") if s.strip()}
        if not self.selected <= set(range(6)):
            raise ValueError(f"--stages takes stage numbers 0-5, got {cfg.stages!r}")
        self.world = build_world()
        # metrics {group: {name: value}}, loss curves {stage name: [loss per step]}, timings {name: seconds}
        self.metrics, self.curves, self.timings = {}, {}, {}
        self.lock = None
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            try:
                self.run_id = self.identify()
            except BaseException:
                self.release()  # a refused run leaves the folder as it found it, unlocked
                raise
        self.barrier()
        if not self.main:
            self.run_id = weights.read_json(self.out / RUN_FILE)["id"]
        self.record = {"id": self.run_id, "config": weight_flags(cfg)}  # in every checkpoint and component

    def identify(self) -> str:
        """Lock --out for this process, then this run's id: a new one in an empty --out or under --overwrite, the
        recorded one under --resume (whose weight flags must be the recorded ones); else refused. OUT/run.json."""
        cfg, path = self.cfg, self.out / RUN_FILE
        if cfg.resume and cfg.overwrite:
            raise SystemExit("--resume continues the run in --out, --overwrite replaces it: pass one of them")
        try:
            self.lock = weights.lock(self.out / LOCK_FILE, wait=False)
        except BlockingIOError:
            raise SystemExit(f"--out {self.out}: another train.py is writing into it; wait for it to finish or "
                             f"choose another --out") from None
        if cfg.resume and path.is_file():
            recorded = weights.read_json(path)
            changed = [f"--{k.replace('_', '-')} {recorded['config'].get(k)!r} (now {v!r})"
                       for k, v in weight_flags(cfg).items() if recorded["config"].get(k) != v]
            if changed:
                raise SystemExit(f"--resume: {self.out} holds run {recorded['id']}, trained with other weight flags: "
                                 f"{', '.join(changed)}. Resume with its flags, or start a new run (--overwrite, or "
                                 f"another --out).")
            return recorded["id"]
        files = sorted(p.name for p in self.out.iterdir() if p.name != LOCK_FILE)
        if files and not (cfg.resume or cfg.overwrite):  # a --resume without run.json: a folder of an older train.py
            raise SystemExit(f"--out {self.out} is not empty ({', '.join(files[:5])}): pass --resume to continue the "
                             f"run in it, --overwrite to replace it, or choose another --out")
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
        weights.write_json(path, {"id": run_id, "config": weight_flags(cfg)})
        return run_id

    def release(self) -> None:
        """Unlock --out (the lock also ends with the process)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

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
        for p, g, chunk in zip(params, grads, flat.split([g.numel() for g in grads])):
            p.grad = chunk.view_as(g).clone()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def train(self, stage: int, name: str, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
              steps: int, lr: float, step_fn, after_step=None) -> None:
        """The training loop of every stage: `step_fn(step, gen) -> loss` is this rank's loss of one step,
        `after_step(step, gen)` runs after the optimiser step (EMA, dead-code restarts). OUT/ckpt/<name>.pt holds
        `modules`, the optimiser state, the step and the loss curve, written atomically every --ckpt-every steps."""
        path = self.out / "ckpt" / f"{name}.pt"
        start, curve, seconds, cpu = self.resume_point(stage, name, path, modules, optimizer, steps)
        params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
        t0, c0 = time.time() - seconds, time.process_time() - cpu  # the clocks continue across resumes
        for step in tqdm(range(start, steps), desc=f"stage {stage} {name}", initial=start, total=steps,
                         disable=not self.main, mininterval=2.0, dynamic_ncols=True):
            gen = self.generator(stage, step)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps, lr)
            loss = step_fn(step, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # this rank's gradients, then averaged over the ranks and clipped to norm 1
            self.sync_grads(params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if after_step is not None:
                after_step(step, gen)
            curve.append(loss.item())
            if (step + 1) % self.cfg.ckpt_every == 0 or step + 1 == steps:
                self.save_checkpoint(path, step + 1, modules, optimizer, curve, time.time() - t0,
                                     time.process_time() - c0)
        for module in modules.values():
            module.eval()
        self.curves[name] = curve
        # Wall time of the training loop, and its CPU time (all threads): on a shared machine the CPU time is
        # close to what the loop takes alone with one thread, the wall time is what it took.
        self.timings[name] = time.time() - t0 if start < steps else seconds
        self.timings[name + "_cpu"] = time.process_time() - c0 if start < steps else cpu

    def resume_point(self, stage: int, name: str, path: Path, modules: dict[str, nn.Module],
                     optimizer: torch.optim.Optimizer, steps: int) -> tuple[int, list[float], float, float]:
        """(first step, loss curve, wall and CPU seconds so far): a fresh start, or under --resume and for a stage
        outside --stages (which must then be complete) what its checkpoint holds, `modules` and `optimizer` loaded."""
        if stage in self.selected and not self.cfg.resume or not path.exists():
            if stage not in self.selected and steps > 0:
                raise FileNotFoundError(f"stage {stage} ({name}) is not in --stages {self.cfg.stages} and {path} "
                                        f"does not exist: train it first")
            return 0, [], 0.0, 0.0
        state = torch.load(path, map_location=self.device, weights_only=True)
        owner = state.get("run", {}).get("id", self.run_id)  # a checkpoint of an older train.py has no record
        if owner != self.run_id:
            if stage not in self.selected:
                raise SystemExit(f"stage {stage} ({name}) is not in --stages {self.cfg.stages} and {path} belongs to "
                                 f"run {owner}, not to this run {self.run_id}: add stage {stage} to --stages")
            return 0, [], 0.0, 0.0  # a stage of this run trains afresh rather than continue another run's
        for key, module in modules.items():
            module.load_state_dict(state["modules"][key])
        optimizer.load_state_dict(state["optimizer"])
        if stage not in self.selected and state["step"] < steps:
            raise FileNotFoundError(f"stage {stage} ({name}) is not in --stages {self.cfg.stages} and {path} holds "
                                    f"{state['step']}/{steps} of its steps: complete it first")
        return state["step"], state["curve"], state["seconds"], state["cpu_seconds"]

    def save_checkpoint(self, path: Path, step: int, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                        curve: list[float], seconds: float, cpu_seconds: float) -> None:
        """The whole training state of a stage at `step` (rank 0 writes, atomically; every rank waits for it)."""
        if self.main:
            state = {"run": self.record, "step": step, "modules": {k: m.state_dict() for k, m in modules.items()},
                     "optimizer": optimizer.state_dict(), "curve": curve, "seconds": seconds,
                     "cpu_seconds": cpu_seconds}
            weights.atomic_write(path, lambda tmp: torch.save(state, tmp))
        self.barrier()

    def optimizer(self, params, **kwargs) -> torch.optim.AdamW:
        """The AdamW of every stage: torch's fused kernel where it has one for this device (one kernel for all the
        parameters instead of several per tensor; the same update up to float rounding)."""
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return torch.optim.AdamW(params, fused=self.device.type in _get_fused_kernels_supported_devices(), **kwargs)

    def save_pretrained(self, model: nn.Module, name: str, *extra) -> None:
        """A component in its native format (config.json, model.safetensors, the LLM's tokenizer files) in OUT/name/;
        its config.json records the run (weights.RUN_KEY), so that a folder mixing runs can be refused."""
        if self.main:
            model.save_pretrained(self.out / name, *extra)
            config = self.out / name / "config.json"
            weights.write_json(config, {**weights.read_json(config), weights.RUN_KEY: self.record})
        self.barrier()

# === Stages 0-3: the SEED tokenizer (tiny CLIP, Causal Q-Former, codebook) and the unCLIP decoder. ==================
# --- Stage 0: the tiny CLIP -----------------------------------------------------------------------------------------
# The tiny text towers read one token per word: the world's words, sorted, then bos, eos and pad. A caption is bos,
# its 7 words, eos, then padding up to TEXT_LEN positions.
TEXT_VOCAB = (*sorted({word for caption in CAPTIONS for word in caption.split()}), "<bos>", "<eos>", "<pad>")
TEXT_IDS = {token: i for i, token in enumerate(TEXT_VOCAB)}
TEXT_LEN = 10

def tokenize(texts) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> ids (N, TEXT_LEN) = bos, words, eos, padding; and the position of eos (N,), whose feature is the
    text embedding of a causal CLIP text tower (OpenAI/OpenCLIP pool at the eos token)."""
    rows = [[TEXT_IDS["<bos>"], *(TEXT_IDS[word] for word in text.split()), TEXT_IDS["<eos>"]] for text in texts]
    if max(map(len, rows)) > TEXT_LEN:
        raise ValueError(f"a text is longer than the {TEXT_LEN} positions of the tiny text towers")
    ids = torch.tensor([row + [TEXT_IDS["<pad>"]] * (TEXT_LEN - len(row)) for row in rows])
    return ids, torch.tensor([len(row) - 1 for row in rows])

class TinyCLIP(nn.Module):
    """EVA ViT image tower + CLIP text tower, each projected into the shared space E. The image embedding is the
    projected, *unnormalised* CLS feature (OpenCLIP's `image_embeds`), what the unCLIP decoder draws from."""

    def __init__(self, tower: "seed.SeedConfig", text: ClipStageConfig, vocab_size: int):
        super().__init__()
        self.visual = seed.EVAViT(tower.image_size, tower.patch_size, tower.vit_width, tower.vit_depth,
                                  tower.vit_heads, tower.vit_mlp)
        self.text = unet.CLIPTextEncoder(unet.CLIPTextConfig(
            vocab_size=vocab_size, context_length=TEXT_LEN, width=text.text_width, layers=text.text_depth,
            heads=max(1, text.text_width // 32), mlp_width=4 * text.text_width))
        self.visual_norm = nn.LayerNorm(tower.vit_width)  # the EVA ViT has no final norm; OpenCLIP's ln_post
        self.visual_proj = nn.Linear(tower.vit_width, tower.embed_dim, bias=False)
        self.text_proj = nn.Linear(text.text_width, tower.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's learnable temperature

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.visual(pixels)                              # (B, 3, 32, 32) -> (B, 1 + N, W)
        return self.visual_proj(self.visual_norm(tokens[:, 0]))  # CLS -> (B, E)

    def encode_text(self, ids: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        states = self.text(ids)                                       # (B, T) -> (B, T, D)
        return self.text_proj(states[torch.arange(len(ids)), eos])   # eos feature -> (B, E)

def tiny_seed_config(cfg: TrainConfig) -> "seed.SeedConfig":
    """seed.py's `tiny` preset (every size lives there, once), causal unless --no-causal."""
    return dataclasses.replace(seed.SeedConfig.preset("tiny"), causal=not cfg.no_causal)

def multi_positive_infonce(image_emb: torch.Tensor, caption_emb: torch.Tensor, combo: torch.Tensor,
                           scale: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric contrastive loss of a batch of images against *all* 150 captions. image -> text: a 150-way
    classification; text -> image: for every caption in the batch, a softmax over the batch's images in which all
    images of that caption are positives (log of their summed probability): many images share a caption, and plain
    InfoNCE, one positive per row, would push apart images that should match."""
    image_emb, caption_emb = F.normalize(image_emb, dim=-1), F.normalize(caption_emb, dim=-1)
    logits = scale * image_emb @ caption_emb.t()                                # (B, 150)
    i2t = F.cross_entropy(logits, combo, label_smoothing=label_smoothing)
    present = torch.unique(combo)
    t_logits = logits[:, present].t()                                           # (P, B)
    positive = combo[None, :] == present[:, None]                               # (P, B)
    t2i = -(torch.logsumexp(t_logits.masked_fill(~positive, -1e4), 1) - torch.logsumexp(t_logits, 1)).mean()
    return (i2t + t2i) / 2

@torch.no_grad()
def caption_accuracy(image_emb: torch.Tensor, caption_emb: torch.Tensor, combo: torch.Tensor) -> float:
    """Fraction of images whose most similar caption (cosine, among all 150) is their own."""
    sims = F.normalize(image_emb, dim=-1) @ F.normalize(caption_emb, dim=-1).t()
    return (sims.argmax(1) == combo).float().mean().item()

@torch.no_grad()
def batched(fn, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """fn over x in chunks (precomputing frozen features of the whole world without a memory spike)."""
    chunks = tqdm(range(0, len(x), batch_size), desc="caching features", leave=False, disable=None)  # None: a tty
    return torch.cat([fn(x[i:i + batch_size]) for i in chunks])

def stage_clip(run: Run, prev: dict) -> dict:
    """Stage 0: the tiny CLIP. Returns the model, the caption ids and the frozen features every later stage uses:
    the ViT tokens (input of the Q-Former) and the image embeddings E (target of stage 2, condition of stage 3)."""
    cfg, world, dev = run.cfg.clip, run.world, run.device
    ids, eos = (t.to(dev) for t in tokenize(CAPTIONS))
    run.seed_everything(0)
    model = TinyCLIP(tiny_seed_config(run.cfg), cfg, len(TEXT_VOCAB)).to(dev).train()
    # The ViT input: [0, 1], then CLIP's mean/std, as `seed.SeedTokenizer.preprocess` normalises any PNG.
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (seed.CLIP_MEAN, seed.CLIP_STD))
    pixels, combo = (((world.images + 1) / 2 - mean) / std).to(dev), world.combo.to(dev)
    optimizer = run.optimizer(model.parameters(), lr=cfg.lr, weight_decay=0.05)

    def step(i, gen):
        idx = run.batch(world.train_idx, cfg.batch_size, gen).to(dev)
        image_emb = model.encode_image(pixels[idx])
        caption_emb = model.encode_text(ids, eos)   # all 150 captions every step: they are the classes
        return multi_positive_infonce(image_emb, caption_emb, combo[idx], model.logit_scale.exp().clamp(max=100))

    run.train(0, "clip", {"clip": model}, optimizer, cfg.steps, cfg.lr, step)
    model.requires_grad_(False)
    vit_tokens = batched(model.visual, pixels)                # (1350, 1 + N, W): frozen input of the Q-Former
    image_embeds = batched(model.encode_image, pixels)        # (1350, E): the unCLIP image-embedding space
    test = world.test_idx.to(dev)
    acc = caption_accuracy(image_embeds[test], model.encode_text(ids, eos), combo[test])
    run.metrics["clip"] = {"caption_acc_test": acc}
    return {"clip": model, "caption_ids": ids, "caption_eos": eos, "vit_tokens": vit_tokens,
            "image_embeds": image_embeds}

# --- Stage 1: the Causal Q-Former ------------------------------------------------------------------------------------
def qformer_text_features(tokenizer: "seed.SeedTokenizer", ids: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Caption ids -> (N, proj_dim): the projected [CLS] feature of the Q-Former's text branch. [CLS] is the first
    token (here the bos id); padding after eos is masked out of the self-attention."""
    mask = torch.arange(ids.shape[1], device=ids.device)[None, :] <= eos[:, None]   # (N, T): 1 = a real token
    return tokenizer.qformer.text_proj(tokenizer.qformer.encode_text(ids, mask)[:, 0])

def last_query_features(tokenizer: "seed.SeedTokenizer", queries: torch.Tensor) -> torch.Tensor:
    """(B, 32, D) query embeddings -> (B, proj_dim): SEED's ITC uses only the last causal query, the one that has
    seen all the others (official: `image_feats[:, -1, :]` in blip2_qformer_casual.py)."""
    return tokenizer.qformer.vision_proj(queries[:, -1])

def stage_qformer(run: Run, prev: dict) -> dict:
    """Stage 1: train ln_vision + the Causal Q-Former (and its text branch) with last-query ITC, the ViT frozen.
    Returns the SeedTokenizer (ViT from stage 0) and the causal embeddings of all 1350 images."""
    cfg, world, dev = run.cfg.qformer, run.world, run.device
    ids, eos, vit_tokens, combo = prev["caption_ids"], prev["caption_eos"], prev["vit_tokens"], world.combo.to(dev)
    run.seed_everything(1)
    tokenizer = seed.SeedTokenizer(tiny_seed_config(run.cfg))
    tokenizer.visual_encoder.load_state_dict(prev["clip"].visual.state_dict())  # the frozen "pretrained" ViT
    tokenizer = tokenizer.to(dev).requires_grad_(False)
    trained = nn.ModuleDict({"ln_vision": tokenizer.ln_vision, "qformer": tokenizer.qformer}).requires_grad_(True)
    # BLIP-2's learnable ITC temperature `temp`, from 0.07, clamped to [0.001, 0.5] where it is used
    temperature = nn.ParameterDict({"temp": nn.Parameter(torch.tensor(cfg.temperature))}).to(dev)
    optimizer = run.optimizer([*trained.parameters(), *temperature.parameters()], lr=cfg.lr, weight_decay=0.05)

    def step(i, gen):
        idx = run.batch(world.train_idx, cfg.batch_size, gen).to(dev)
        queries = tokenizer.query_embeddings(tokenizer.ln_vision(vit_tokens[idx]))  # (B, 1+N, W) -> (B, 32, D)
        image = last_query_features(tokenizer, queries)
        text = qformer_text_features(tokenizer, ids, eos)                            # all 150 captions
        scale = 1 / temperature["temp"].clamp(0.001, 0.5)
        return multi_positive_infonce(image, text, combo[idx], scale, cfg.label_smoothing)

    run.train(1, "qformer", {"trained": trained, "temperature": temperature}, optimizer, cfg.steps, cfg.lr, step)
    tokenizer.requires_grad_(False)
    queries = batched(lambda v: tokenizer.query_embeddings(tokenizer.ln_vision(v)), vit_tokens)  # (1350, 32, D)
    with torch.no_grad():
        text = qformer_text_features(tokenizer, ids, eos)
        test = world.test_idx.to(dev)
        acc = caption_accuracy(last_query_features(tokenizer, queries[test]), text, combo[test])
    run.metrics["tokenizer"] = {"caption_acc_continuous": acc}
    return {"tokenizer": tokenizer, "queries": queries, "qformer_text": text}

# --- Stage 2: the codebook --------------------------------------------------------------------------------------------
class QueryReconstructor(nn.Module):
    """The training-only head that rebuilds the causal embeddings from the codes (official `recon_s`): learned
    positions + ViT blocks on top of `decode_task_layer`. Official keys `pos_embed` / `blocks.*`; the official
    loader ignores them and so does inference, so it lives here and not in seed.SeedTokenizer."""

    def __init__(self, c: "seed.SeedConfig"):
        super().__init__()
        D, Q = c.qformer.width, c.qformer.n_queries
        self.pos_embed = nn.Parameter(torch.randn(1, Q, D) * 0.02)
        self.blocks = nn.ModuleList(seed.ViTBlock(D, c.decoder_heads, c.decoder_mlp) for _ in range(c.decoder_depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x  # (B, 32, D)

@torch.no_grad()
def restart_dead_codes(quantize: "vq.VectorQuantizer", z: torch.Tensor, gen: torch.Generator) -> None:
    """Re-seed every code that no vector of `z` (N, d) chooses with a random vector of z plus a little noise (the
    official codebook, initialised in +-1/8192, has none; see the header for why it is needed here)."""
    counts = torch.bincount(quantize.nearest(z).flatten(), minlength=quantize.n_codes)
    dead = torch.nonzero(counts == 0).squeeze(1)
    if len(dead):
        pick = torch.randint(len(z), (len(dead),), generator=gen).to(z.device)
        noise = torch.randn(len(dead), z.shape[1], generator=gen).to(z.device) * 0.01 * z.std()
        quantize.embedding.weight.data[dead] = z[pick] + noise

def attribute_labels(world: World) -> torch.Tensor:
    """(1350, 4) long: the index of each image's value of every attribute (ATTRIBUTES order) in VALUES."""
    return torch.tensor([[VALUES[a].index(getattr(COMBOS[c], a)) for a in ATTRIBUTES] for c in world.combo.tolist()])

def factor_loss(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Positions split into len(ATTRIBUTES) consecutive groups; in group a, the code-space vectors z (B, 32, d)
    should depend on attribute a alone: the within-class variance of z over the batch (classes = a's values,
    labels (B, 4)) as a fraction of its total variance. 0 when every image with the same value of a has the same
    vectors there (so the same codes), whatever its other attributes."""
    groups = z.split(z.shape[1] // labels.shape[1], dim=1)
    loss = z.new_zeros(())
    for a, g in enumerate(groups):
        onehot = F.one_hot(labels[:, a]).float()                                    # (B, V)
        means = (onehot.t() @ g.flatten(1)) / onehot.sum(0).clamp(min=1)[:, None]   # (V, P*d) class means
        within = (g.flatten(1) - onehot @ means).pow(2).sum(1).mean()
        total = (g.flatten(1) - g.flatten(1).mean(0)).pow(2).sum(1).mean()
        loss = loss + within / (total + 1e-6)
    return loss / len(groups)

def code_probes(codes: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """(P, A) accuracy of each code position alone at predicting each attribute: on the `train` images, a table
    code value -> most common label (N, A) at that position; scored on the `test` images, a value never seen in
    training read as the most common label overall. Codes (N, P) long."""
    n_values, n_labels = int(codes.max()) + 1, int(labels.max()) + 1
    out = torch.zeros(codes.shape[1], labels.shape[1])
    for a in range(labels.shape[1]):
        fallback = torch.bincount(labels[train, a], minlength=n_labels).argmax()
        for p in range(codes.shape[1]):
            counts = torch.zeros(n_values, n_labels).index_put_(
                (codes[train, p], labels[train, a]), torch.ones(len(train)), accumulate=True)
            table = torch.where(counts.sum(1) > 0, counts.argmax(1), fallback)
            out[p, a] = (table[codes[test, p]] == labels[test, a]).float().mean()
    return out

def stage_codebook(run: Run, prev: dict) -> dict:
    """Stage 2: encode_task_layer + VQ + decode_task_layer, the query reconstructor and the image-embedding head,
    Q-Former frozen. Loss (official weights) 5 * VQ + 2 * (1 - cos(rebuilt queries, queries)) + 0.5 * MSE(image
    embedding from the codes, tiny-CLIP image embedding), + --codebook.w-factor * `factor_loss` of the code-space
    vectors (not official; see the header). Then every image's 32 codes and, on the test images, the
    caption accuracy of the embeddings rebuilt from them and the cosine of their image embedding to tiny CLIP's."""
    cfg, world, dev = run.cfg.codebook, run.world, run.device
    tokenizer, queries, targets = prev["tokenizer"], prev["queries"], prev["image_embeds"]
    run.seed_everything(2)
    recon = QueryReconstructor(tokenizer.config).to(dev)
    trained = nn.ModuleDict({name: getattr(tokenizer, name) for name in (
        "encode_task_layer", "quantize", "decode_task_layer", "blocks_image", "image_down", "distill_image_proj")})
    head = nn.ParameterDict({"pos_embed_image": tokenizer.pos_embed_image})
    modules = {"trained": trained, "head": head, "recon": recon}
    params = [p for m in modules.values() for p in m.requires_grad_(True).parameters()]
    optimizer = run.optimizer(params, lr=cfg.lr, weight_decay=0.0)
    train_idx, labels = world.train_idx.to(dev), attribute_labels(world).to(dev)

    def step(i, gen):
        idx = run.batch(world.train_idx, cfg.batch_size, gen).to(dev)
        q = queries[idx]
        z = tokenizer.to_code_space(q)
        z_q, codes, vq_loss = tokenizer.quantize(z)                             # (B, 32, d), straight-through
        rebuilt = tokenizer.from_code_space(z_q)                                # (B, 32, D)
        cos = 1 - F.cosine_similarity(recon(rebuilt), q, dim=-1).mean()
        mse = F.mse_loss(tokenizer.image_embedding(rebuilt), targets[idx])
        factor = factor_loss(z, labels[idx]) if cfg.w_factor else 0.0
        return cfg.w_vq * vq_loss + cfg.w_cos * cos + cfg.w_mse * mse + cfg.w_factor * factor

    def after_step(i, gen):
        # Restarts stop in the last fifth, so that the heads settle on the final codebook.
        if cfg.restart_every and (i + 1) % cfg.restart_every == 0 and i < 0.8 * cfg.steps:
            with torch.no_grad():
                restart_dead_codes(tokenizer.quantize, tokenizer.to_code_space(queries[train_idx]).flatten(0, 1), gen)

    run.train(2, "codebook", modules, optimizer, cfg.steps, cfg.lr, step, after_step)
    tokenizer.requires_grad_(False)
    recon.requires_grad_(False)
    test = world.test_idx.to(dev)
    with torch.no_grad():
        codes = tokenizer.quantize.nearest(tokenizer.to_code_space(queries))            # (1350, 32)
        rebuilt = tokenizer.from_code_space(tokenizer.quantize.lookup(codes))
        embeds = tokenizer.image_embedding(rebuilt)                                      # (1350, E)
        used, perplexity = tokenizer.quantize.usage(codes[train_idx])
        code_acc = caption_accuracy(last_query_features(tokenizer, recon(rebuilt[test])), prev["qformer_text"],
                                    world.combo.to(dev)[test])
        cosine = F.cosine_similarity(embeds[test], targets[test], dim=-1).mean().item()
    run.metrics["tokenizer"].update({"caption_acc_codes": code_acc, "codebook_usage": used,
                                     "codebook_perplexity": perplexity, "embedding_cosine": cosine,
                                     "n_codes": tokenizer.quantize.n_codes})
    run.save_pretrained(tokenizer, "seed")
    return {"codes": codes, "recon": recon}

# --- Stage 3: the unCLIP decoder in pixel space -----------------------------------------------------------------------
def decode_embeddings(decoder: "unet.UnCLIPDecoder", embeds: torch.Tensor, cfg: DecoderStageConfig,
                      noise_seed: int, batch_size: int = 50) -> list[Image.Image]:
    """Image embeddings (N, E) -> N images with the project's unCLIP pipeline (PNDM, CFG), in chunks, each chunk
    seeded from `noise_seed` so that the result does not depend on the chunking of an earlier run."""
    images = []
    for i in tqdm(range(0, len(embeds), batch_size), desc="drawing", leave=False, disable=None):
        images += decoder(embeds[i:i + batch_size].cpu(), steps=cfg.sample_steps, guidance_scale=cfg.guidance,
                          noise_level=cfg.noise_level, seed=noise_seed + i)
    return images

def decoder_loss(decoder: "unet.UnCLIPDecoder", x0: torch.Tensor, embeds: torch.Tensor, cfg: DecoderStageConfig,
                 alphas_cumprod: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The v-prediction loss of images x0 (B, 3, 32, 32) given their embeddings (B, E). The condition is the unCLIP
    class label: the embedding noised at a level drawn in [0, --decoder.train-noise-level] ++ that level's embedding
    (2E), zeroed with probability --decoder.cond-drop so that the UNet also predicts unconditionally (CFG)."""
    B, dev, T = len(x0), x0.device, len(alphas_cumprod)
    # Times in [0, T) with density proportional to 1/sqrt(T - t), about a third at t >= 0.9 T: only at high noise
    # does the image embedding decide the layout (below, x_t already shows it); drawn uniformly, too few steps
    # train the condition for this tiny UNet to learn where the object goes.
    t = (T - 1 - (T * torch.rand(B, generator=gen) ** 2).long()).to(dev)
    noise = torch.randn(B, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen).to(dev)
    level = int(torch.randint(cfg.train_noise_level + 1, (), generator=gen))
    label = decoder.noise_augmentation.noise_image_embeddings(
        embeds, level, noise=torch.randn(B, embeds.shape[1], generator=gen).to(dev))     # (B, 2E)
    keep = (torch.rand(B, 1, generator=gen) >= cfg.cond_drop).to(dev)
    with torch.autocast(dev.type, torch.bfloat16, enabled=cfg.bf16 and weights.bf16_matrix_units(dev)):
        v = decoder.unet(unet.add_noise(x0, noise, t, alphas_cumprod), t, None, label * keep)
    return F.mse_loss(v.float(), unet.v_target(x0, noise, t, alphas_cumprod))  # the weights and the loss stay fp32

def stage_decoder(run: Run, prev: dict) -> dict:
    """Stage 3: the unCLIP UNet on tiny-CLIP embeddings of the train images, as SD-2.1-unclip was trained:
    v-prediction on SD's scaled-linear schedule (the one unet.py's PNDM assumes), the condition of `decoder_loss`;
    the EMA of the weights is what gets saved and sampled. Then image -> 32 codes -> embedding -> UNet -> image on
    the first test jitter of every combination, judged by world.judge: the reconstructions [(image index, image)]."""
    cfg, world, dev = run.cfg.decoder, run.world, run.device
    embeds = prev["image_embeds"]
    train_idx = world.train_idx.to(dev)
    run.seed_everything(3)
    config = unet.DecoderConfig.preset("tiny")  # pixel space, 3 x 32 x 32, no VAE, no text
    if config.embed_dim != embeds.shape[1]:
        raise ValueError(f"unet.py's tiny decoder takes image embeddings of width {config.embed_dim} (its class label "
                         f"is 2E), the tiny CLIP makes them {embeds.shape[1]} wide")
    decoder = unet.UnCLIPDecoder(config).to(dev)
    # The unCLIP image normaliser (official image_normalizer: mean/std of the CLIP embeddings) from the train images.
    decoder.noise_augmentation.mean.data.copy_(embeds[train_idx].mean(0, keepdim=True))
    decoder.noise_augmentation.std.data.copy_(embeds[train_idx].std(0, keepdim=True))
    decoder.noise_augmentation.requires_grad_(False)
    model = decoder.unet.train()
    ema = unet.UNet(model.config).to(dev).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    alphas_cumprod = unet.scaled_linear_alphas_cumprod().to(dev)
    images = world.images.to(dev)
    optimizer = run.optimizer(model.parameters(), lr=cfg.lr, weight_decay=0.0)

    def step(i, gen):
        idx = run.batch(world.train_idx, cfg.batch_size, gen).to(dev)
        return decoder_loss(decoder, images[idx], embeds[idx], cfg, alphas_cumprod, gen)

    @torch.no_grad()
    def after_step(i, gen):
        decay = min(cfg.ema, (1 + i) / (10 + i))  # EMA warm-up: average early weights less
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)

    run.train(3, "decoder", {"unet": model, "ema": ema}, optimizer, cfg.steps, cfg.lr, step, after_step)
    decoder.unet = ema  # sample and save the averaged weights
    decoder.requires_grad_(False).eval()
    run.save_pretrained(decoder, "decoder")
    test = [int(i) for i in world.test_idx][::2][:cfg.eval_images]
    with torch.no_grad():
        rebuilt = prev["tokenizer"].embed(prev["codes"][test])
    t0 = time.time()
    recon = decode_embeddings(decoder, rebuilt, cfg, noise_seed=run.cfg.seed)
    run.timings["decoder_eval"] = time.time() - t0
    accuracy = judge_accuracy(recon, [COMBOS[int(world.combo[i])] for i in test])
    run.metrics["decoder"] = {f"recon_{k}": v for k, v in accuracy.items()} | {"n_images": len(test)}
    return {"decoder": decoder, "reconstructions": list(zip(test, recon))}

# === Stages 4-5: SEED-LLaMA pretraining and instruction tuning (LoRA, then full fine-tuning). =======================
# --- Stage 4: the LLM's sequences (pretraining pairs, instruction chats) and pretraining ----------------------------
EOS = "</s>"  # every assistant turn ends with it (Vicuna v1.1's sep2); generation stops on it
IGNORE = -100  # label of a token the loss skips (a prompt token, padding)

class SequenceBuilder:
    """Token ids and loss labels of the LLM's sequences, encoded by the project's `Tokenizer`. Text is written
    with `<image>` placeholders, and `images` gives the 32 codes of each. The text is encoded with every placeholder
    as an empty span `<img></img>`, then the codes are spliced in after each `<img>`: this equals encoding the full
    text (the split strips the same whitespace around `<img>`/`</img>` with or without codes between them; a test
    checks it), and the text part is cached, so building a batch costs almost nothing."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.image_vocab = tokenizer, tokenizer.image_vocab
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str, images) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok.encode(text.replace(IMAGE_PLACEHOLDER, BOI_TOKEN + EOI_TOKEN))
        ids, boi = self._cache[text], self.image_vocab.boi_id
        if ids.count(boi) != len(images):
            raise ValueError(f"{text!r} holds {ids.count(boi)} images but {len(images)} were given")
        out, codes = [], iter(images)
        for i in ids:
            out.append(i)
            if i == boi:
                out += [self.image_vocab.code_offset + int(c) for c in next(codes)]
        return out

    def plain(self, text: str, images) -> tuple[list[int], list[int]]:
        """A pretraining sequence `<s>...</s>`: next-token loss on every token after `<s>`."""
        ids = self.encode("<s>" + text + EOS, images)
        return ids, ids

    def chat(self, turns: list[tuple[str, str]], images) -> tuple[list[int], list[int]]:
        """A conversation [(user, assistant), ...] in the official 8B template; the loss sees only the assistant
        turns (each reply and its `</s>`), every prompt token is labelled IGNORE. Turn k's prompt is
        `chat_conversation` of the messages so far (it ends in "ASSISTANT:"); the reply follows after one space, and
        the next turn's prompt continues that text. The ids of each prefix must be a prefix of the ids of the whole,
        which holds for this tokenizer (pieces never cross a space; an added token splits the text) and is checked,
        so a mask can never be off by a token."""
        messages = [m for user, reply in turns for m in (user, reply + EOS)]
        ids, labels = [], []
        for k in range(len(turns)):
            prompt = "<s>" + chat_conversation(messages[:2 * k + 1])
            reply = prompt + " " + messages[2 * k + 1]
            prompt_ids = self.encode(prompt, images[:prompt.count(IMAGE_PLACEHOLDER)])
            reply_ids = self.encode(reply, images[:reply.count(IMAGE_PLACEHOLDER)])
            if prompt_ids[:len(ids)] != ids or reply_ids[:len(prompt_ids)] != prompt_ids:
                raise ValueError(f"the tokenization of turn {k} of {messages} does not extend the previous one")
            labels += [IGNORE] * (len(prompt_ids) - len(ids)) + reply_ids[len(prompt_ids):]
            ids = reply_ids
        return ids, labels

def collate(rows: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (ids, labels) rows into (B, T) tensors; padding is labelled IGNORE."""
    T = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [pad_id] * (T - len(r)) for r, _ in rows], device=device)
    labels = torch.tensor([l + [IGNORE] * (T - len(l)) for _, l in rows], device=device)
    return ids, labels

def llm_loss(model: llama.Llama, rows: list[tuple[list[int], list[int]]], pad_id: int, device,
             micro_batches: int = 1) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens of (ids, labels) rows. The rows are sorted by length
    and cut into `micro_batches` groups, each padded only to its own longest row (groups of one length are one
    batch), and the head runs only where a label is: the summed losses over the count of labels equal the loss of
    the whole batch padded as one, with no compute spent on padding or on prompt positions."""
    if micro_batches < 1:
        raise ValueError(f"--llm.micro-batches must be >= 1, got {micro_batches}")
    rows = sorted(rows, key=lambda r: len(r[0]))
    size, groups = -(-len(rows) // micro_batches), []
    for k in range(0, len(rows), size):
        chunk = rows[k:k + size]
        if groups and len(groups[-1][-1][0]) == len(chunk[-1][0]):  # as long as the group before: joining pads nothing
            groups[-1] += chunk
        else:
            groups.append(chunk)
    total, count = 0.0, 0
    for group in groups:
        ids, labels = collate(group, pad_id, device)
        target = labels[:, 1:]  # the logits at t predict labels[t + 1]
        where = target != IGNORE
        total = total + F.cross_entropy(model(ids[:, :-1], where=where).float(), target[where], reduction="sum")
        count += int(where.sum())
    return total / count

class LLMData:
    """The LLM's training sequences, drawn from the world's *train* images and their codes (stages 0-2). A held-out
    pair (world.HELD_OUT_PAIRS) is never an image to draw (caption -> image, a text-to-image reply, an edit target,
    in multi-turn chats too), only an input: image -> caption, captioning, VQA, and the source image of an edit."""

    def __init__(self, world: World, codes: torch.Tensor, builder: SequenceBuilder, attribute_requests: float = 0.0):
        self.world, self.builder, self.attribute_requests = world, builder, attribute_requests
        self.codes = codes.cpu().tolist()                                     # (1350, 32) as lists of ints
        self.combos = [COMBOS[c] for c in world.combo.tolist()]
        self.train = world.train_idx.tolist()
        self.is_train = set(self.train)
        self.train_drawable = [i for i in self.train if not self.combos[i].held_out]
        # (combination, jitter) -> image index, to find edit targets
        self.image_of = {(c, j): i for i, (c, j) in enumerate(zip(world.combo.tolist(), world.jitter.tolist()))}

    def pretrain(self, rng: random.Random, reverse_ratio: float) -> tuple[list[int], list[int]]:
        """caption -> image, or (with probability reverse_ratio, and always for held-out pairs) image -> caption:
        SEED-LLaMA's pretraining on image-text pairs in both directions."""
        i = rng.choice(self.train)
        caption, image = self.combos[i].caption, [self.codes[i]]
        if self.combos[i].held_out or rng.random() < reverse_ratio:
            return self.builder.plain(IMAGE_PLACEHOLDER + caption, image)
        return self.builder.plain(caption + IMAGE_PLACEHOLDER, image)

    # --- instruction turns: each returns (user, assistant, images in order) ----------------------------------------

    def caption_turn(self, rng, i):
        return IMAGE_PLACEHOLDER + rng.choice(CAPTION_REQUESTS), self.combos[i].caption, [self.codes[i]]

    def vqa_turn(self, rng, i, with_image=True):
        attribute = rng.choice(ATTRIBUTES)
        user = (IMAGE_PLACEHOLDER if with_image else "") + QUESTIONS[attribute]
        return user, self.combos[i].answer(attribute), [self.codes[i]] if with_image else []

    def t2i_turn(self, rng, i):
        """A request for image i: its caption, or (with probability --llm.attribute-requests) only one to three
        of its attributes, so that each attribute's words are tied to the codes on their own."""
        text = self.combos[i].caption
        if self.attribute_requests and rng.random() < self.attribute_requests:  # no draw when off: same stream
            text = self.combos[i].describe(rng.sample(ATTRIBUTES, rng.randint(1, len(ATTRIBUTES) - 1)))
        return rng.choice(T2I_REQUESTS).format(text), IMAGE_PLACEHOLDER, [self.codes[i]]

    def edit_turn(self, rng, i, with_image=True):
        """A random edit of image i whose target is drawable (not held out), keeping the jitter when the target
        with that jitter is a train image, else a random train jitter of it."""
        while (target := self.combos[i].random_edit(rng))[1].held_out:
            pass
        instruction, c, j = target[0], COMBOS.index(target[1]), self.world.jitter[i].item()
        t = self.image_of[c, j]
        if t not in self.is_train:
            t = self.image_of[c, rng.choice([j for j in range(len(JITTERS)) if self.image_of[c, j] in self.is_train])]
        user = (IMAGE_PLACEHOLDER if with_image else "") + instruction
        return user, IMAGE_PLACEHOLDER, ([self.codes[i]] if with_image else []) + [self.codes[t]]

    def instruct(self, rng: random.Random) -> tuple[list[int], list[int]]:
        """One instruction-tuning chat: captioning, VQA, text-to-image, an edit, or a two-turn conversation about
        one image (draw it, then edit what was drawn; or describe it, then answer a question about it)."""
        task = rng.choice(("caption", "vqa", "t2i", "edit", "chat"))
        if task != "chat":
            pool = self.train_drawable if task == "t2i" else self.train
            user, reply, images = getattr(self, task + "_turn")(rng, rng.choice(pool))
            return self.builder.chat([(user, reply)], images)
        if rng.random() < 0.5:
            i = rng.choice(self.train_drawable)
            first, second = self.t2i_turn(rng, i), self.edit_turn(rng, i, with_image=False)
        else:
            i = rng.choice(self.train)
            first, second = self.caption_turn(rng, i), self.vqa_turn(rng, i, with_image=False)
        return self.builder.chat([first[:2], second[:2]], first[2] + second[2])

def build_llm_tokenizer(folder: Path, n_codes: int, vocab_size: int) -> Tokenizer:
    """SentencePiece-format BPE (train_bpe) on every text the LLM reads or writes, in the chat template, then
    `<img_00000>`.. for every code and `<img>`, `</img>`, as SEED extends LLaMA's vocabulary; files in `folder`."""
    texts = [c.caption for c in COMBOS] + list(CAPTION_REQUESTS) + list(QUESTIONS.values())
    texts += [t.format(c.caption) for t in T2I_REQUESTS for c in COMBOS]
    texts += [c.edit(a, v)[0] for c in COMBOS[:1] for a in ATTRIBUTES for v in VALUES[a]]
    texts += [c.answer(a) for c in COMBOS for a in ATTRIBUTES]
    return train_tokenizer([chat_conversation([t, t, t]) for t in texts], folder, vocab_size, n_image_codes=n_codes)

def train_llm(run: Run, stage: int, name: str, model: llama.Llama, steps: int, lr: float, batch_size: int,
              sample, pad_id: int, step_offset: int = 0) -> None:
    """Next-token training of the trainable parameters of `model` on batches of `sample(rng) -> (ids, labels)`."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = run.optimizer(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    def step(i, gen):
        # The global batch depends on (seed, stage, step) only; each rank trains on its share of it.
        rng = random.Random(int(torch.randint(2 ** 62, (1,), generator=gen)) + step_offset)
        rows = [sample(rng) for _ in range(batch_size)][run.rank::run.world_size]
        return llm_loss(model, rows, pad_id, run.device, run.cfg.llm.micro_batches)

    model.train()
    run.train(stage, name, {"llm": model}, optimizer, steps, lr, step)

def stage_llm_pretrain(run: Run, prev: dict) -> dict:
    """Stage 4: the tokenizer (BPE on the world's text + the image tokens), then SEED-LLaMA pretraining: a tiny
    llama.Llama from scratch on caption -> image and image -> caption sequences, with the codes of stages 0-2."""
    cfg, folder = run.cfg.llm, run.out / "llama"
    tokenizer = build_llm_tokenizer(folder, prev["tokenizer"].quantize.n_codes, cfg.text_vocab_size) \
        if run.main else None
    run.barrier()
    tokenizer = tokenizer or Tokenizer(folder)
    data = LLMData(run.world, prev["codes"], SequenceBuilder(tokenizer), cfg.attribute_requests)
    run.seed_everything(4)
    config = llama.LlamaConfig.preset("tiny")  # its vocabulary is this tokenizer's: the world's text + 258 image tokens
    if config.vocab_size != len(tokenizer):
        raise ValueError(f"llama.py's tiny preset has vocab_size {config.vocab_size}, the tokenizer {len(tokenizer)} "
                         f"(--llm.text-vocab-size {cfg.text_vocab_size}): make them agree")
    model = llama.Llama(config).to(run.device)
    train_llm(run, 4, "llm_pretrain", model, cfg.pretrain_steps, cfg.pretrain_lr, cfg.batch_size,
              lambda rng: data.pretrain(rng, cfg.reverse_ratio), tokenizer.pad_id)
    model.eval()
    run.metrics["llm"] = {"params": sum(p.numel() for p in model.parameters()), "vocab_text": len(tokenizer.sp),
                          "vocab": len(tokenizer)}
    if run.main:
        spans = pretrain_spans(run, model, tokenizer, data)
        run.metrics["llm"].update(spans["metrics"], pretrain_image_code_loss_by_position=spans["per_position"])
    return {"llm": model, "llm_tokenizer": tokenizer, "llm_data": data}

# --- Stage 5: instruction tuning, LoRA then full fine-tuning -------------------------------------------------------
class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = W x + (alpha / r) * B A x (LoRA, Hu et al. 2021,
    arXiv:2106.09685). B starts at zero, so the wrapped layer starts as exactly the base layer; `merge` folds
    B A into W and returns a plain nn.Linear computing the same function."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base.requires_grad_(False), alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t()) @ self.lora_b.t() * self.scale  # (.., in) -> (.., r) -> (.., out)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        self.base.weight += self.scale * (self.lora_b @ self.lora_a)  # (out, r) @ (r, in) -> (out, in)
        return self.base

def add_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Freeze `model` and wrap every nn.Linear of its transformer blocks (attention q/k/v/o and the MLP) in
    LoRALinear; embeddings, norms and the output head stay frozen, as in the usual LLaMA LoRA recipes."""
    model.requires_grad_(False)
    for block in model.model.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha))
    return model

def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged nn.Linear: the same function, the official module layout."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merge())
    return model

def stage_llm_instruct(run: Run, prev: dict) -> dict:
    """Stage 5: instruction tuning in the official 8B chat template, prompt masked: LoRA on the pretrained model
    (merged at the end), then full fine-tuning; then the LLM metrics, and the model saved to OUT/llama."""
    cfg, model, data = run.cfg.llm, prev["llm"], prev["llm_data"]
    run.seed_everything(5)
    add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    if cfg.lora_embeddings:
        model.model.embed_tokens.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    pad_id = prev["llm_tokenizer"].pad_id
    train_llm(run, 5, "llm_lora", model, cfg.lora_steps, cfg.lora_lr, cfg.batch_size, data.instruct, pad_id)
    merge_lora(model).requires_grad_(True)
    train_llm(run, 5, "llm_sft", model, cfg.sft_steps, cfg.sft_lr, cfg.batch_size, data.instruct, pad_id,
              step_offset=cfg.lora_steps)
    model.eval().requires_grad_(False)
    run.save_pretrained(model, "llama", prev["llm_tokenizer"])
    if not run.main:  # the evaluation is deterministic: one process runs it and writes the reports
        return {"llm": model}
    t0 = time.time()
    evaluation = evaluate_llm(run, prev, model)
    run.timings["llm_eval"] = time.time() - t0
    return {"llm": model, "llm_eval": evaluation}

# === Evaluation of the LLM: captioning, VQA, text-to-image and edits, judged on the pixels of the decoded images. ===
def generate_batched(model: llama.Llama, tokenizer: Tokenizer, prompts: list[list[int]], max_new_tokens: int,
                     batch_size: int = 128) -> list[list[int]]:
    """Greedy continuations of many prompts, left-padded into batches (llama.Llama.generate); constrained
    decoding stays off, so every image span is what the model wrote on its own."""
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="evaluating", leave=False, disable=None):
        out += model.generate(prompts[i:i + batch_size], max_new_tokens=max_new_tokens, stop_ids=(tokenizer.eos_id,),
                              image_vocab=tokenizer.image_vocab)
    return out

def reply_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    return tokenizer.decode([i for i in ids if i != tokenizer.eos_id], skip_special_tokens=True).strip()

def reply_image(tokenizer: Tokenizer, ids: list[int]) -> list[int] | None:
    """The codes of the first image span of a reply, or None unless every span in it is valid (`<img>` +
    exactly 32 codes + `</img>`, the flask demo's check) and there is at least one."""
    try:
        _, images = tokenizer.image_vocab.split([i for i in ids if i != tokenizer.eos_id])
    except ValueError:
        return None
    return images[0] if images else None

@torch.no_grad()
def image_code_loss(model: llama.Llama, rows: list[tuple[list[int], list[int]]], vocab, pad_id: int,
                    device) -> tuple[float, list[float]]:
    """Teacher-forced cross-entropy on the image tokens (32 codes + `</img>`) of sequences that each hold one real
    image, overall and per position in the span (33 values): the quantity behind the paper's causal vs
    bidirectional comparison, and where along the 1-D order the codes are hard to predict."""
    total, count = torch.zeros(CODES_PER_IMAGE + 1), torch.zeros(CODES_PER_IMAGE + 1)
    for k in range(0, len(rows), 64):
        ids, labels = collate(rows[k:k + 64], pad_id, device)
        target = labels[:, 1:]
        losses = F.cross_entropy(model(ids[:, :-1]).float().transpose(1, 2), target.clamp(min=0),
                                 reduction="none")                                        # (B, T-1)
        start = (target == vocab.boi_id).float().argmax(1) + 1                             # first code of the span
        where = start[:, None] + torch.arange(CODES_PER_IMAGE + 1, device=device)          # (B, 33)
        picked = losses.gather(1, where.clamp(max=target.shape[1] - 1)).cpu()
        ok = (where < target.shape[1]).cpu() & (target.gather(1, where.clamp(max=target.shape[1] - 1)) >= 0).cpu()
        total += (picked * ok).sum(0)
        count += ok.sum(0)
    per_position = (total / count.clamp(min=1)).tolist()
    return float(total.sum() / count.sum().clamp(min=1)), per_position

def t2i_rows(data: LLMData, images: list[int]) -> list[tuple[list[int], list[int]]]:
    """Text-to-image chats (the evaluation's request) whose replies are the codes of real images."""
    return [data.builder.chat([(T2I_REQUESTS[0].format(data.combos[i].caption), IMAGE_PLACEHOLDER)],
                              [data.codes[i]]) for i in images]

@torch.no_grad()
def pretrain_spans(run: Run, model: llama.Llama, tok: Tokenizer, data: LLMData, samples: int = 4) -> dict:
    """The paper's valid-span measure where the two tokenizers can differ at this scale: the LLM after pretraining
    only, asked `<s>{caption}` for every combination, `samples` continuations each by plain sampling (T 1, no
    top-k/top-p, constrained decoding off); a span is valid when it is `<img>` + exactly 32 codes + `</img>`. Also
    the per-position image-code loss there, on the test images, in the pretraining format."""
    prompts = [data.builder.encode("<s>" + c.caption, []) for c in COMBOS for _ in range(samples)]
    prompts = prompts[:8 if run.cfg.smoke else None]
    gen = torch.Generator(device=run.device).manual_seed(run.cfg.seed)
    out = []
    for i in range(0, len(prompts), 150):
        out += model.generate(prompts[i:i + 150], max_new_tokens=CODES_PER_IMAGE + 4, stop_ids=(tok.eos_id,),
                              image_vocab=tok.image_vocab, do_sample=True, top_k=None, top_p=None, generator=gen)
    valid = sum(reply_image(tok, o) is not None for o in out)
    test = run.world.test_idx.tolist()[:8 if run.cfg.smoke else None]
    rows = [data.builder.plain(data.combos[i].caption + IMAGE_PLACEHOLDER, [data.codes[i]]) for i in test]
    loss, per_position = image_code_loss(model, rows, tok.image_vocab, tok.pad_id, run.device)
    return {"metrics": {"pretrain_valid_spans": f"{valid}/{len(out)}", "pretrain_valid_span_rate": valid / len(out),
                        "pretrain_image_code_loss": loss}, "per_position": per_position}

def ask(builder: SequenceBuilder, user: str, images=()) -> list[int]:
    """The ids of a one-turn chat prompt (it ends in "ASSISTANT:"), the images spliced in."""
    return builder.encode("<s>" + chat_conversation([user]), list(images))

def evaluate_text(model: llama.Llama, tok: Tokenizer, data: LLMData, test: list[int]) -> tuple[dict, list[str]]:
    """Captioning (exact, and per attribute by parse_caption) and VQA on the test images: (metrics, captions)."""
    out = generate_batched(model, tok, [ask(data.builder, IMAGE_PLACEHOLDER + CAPTION_REQUESTS[0], [data.codes[i]])
                                        for i in test], 16)
    captions = [reply_text(tok, o) for o in out]
    metrics = {"caption_exact": sum(c == data.combos[i].caption for c, i in zip(captions, test)) / len(test)}
    for a in ATTRIBUTES:
        metrics[f"caption_{a}"] = sum(parse_caption(c)[a] == getattr(data.combos[i], a)
                                      for c, i in zip(captions, test)) / len(test)
    questions = [(i, a) for i in test for a in ATTRIBUTES]
    out = generate_batched(model, tok, [ask(data.builder, IMAGE_PLACEHOLDER + QUESTIONS[a], [data.codes[i]])
                                        for i, a in questions], 8)
    metrics["vqa_acc"] = sum(reply_text(tok, o) == data.combos[i].answer(a) for o, (i, a) in zip(out, questions)) \
        / len(questions)
    return metrics, captions

def image_requests(run: Run, data: LLMData, limit: int | None) -> list[dict]:
    """Records {"task", "target", "prompt", "images" (input codes), "source" (edits)} of what the LLM is asked to draw:
    text-to-image for every combination (held out too), then edits of test images of evenly spread combinations."""
    records = [{"task": "t2i", "target": COMBOS[c], "images": [],
                "prompt": T2I_REQUESTS[0].format(COMBOS[c].caption)} for c in range(len(COMBOS))][:limit]
    one_per_combo = [data.image_of[c, c % len(JITTERS)] for c in range(len(COMBOS))][:limit]  # a test image each
    rng = random.Random(run.cfg.seed)
    n_edits = min(run.cfg.llm.eval_edits, len(one_per_combo))
    for i in one_per_combo[::len(one_per_combo) // n_edits][:n_edits]:
        instruction, target = data.combos[i].random_edit(rng)
        records.append({"task": "edit", "target": target, "prompt": instruction, "source": i,
                        "images": [data.codes[i]]})
    return records

def draw_requests(run: Run, prev: dict, model: llama.Llama, records: list[dict]) -> None:
    """Generate every request's reply and add to its record its image span's "codes" (None unless valid), the decoded
    "image", the judge's verdict ("judged", "correct") and the combination of the real image "nearest" to it."""
    tok, data = prev["llm_tokenizer"], prev["llm_data"]
    out = generate_batched(model, tok, [ask(data.builder, (IMAGE_PLACEHOLDER if r["images"] else "") + r["prompt"],
                                            r["images"]) for r in records], CODES_PER_IMAGE + 8)
    for r, o in zip(records, out):
        r["codes"] = reply_image(tok, o)
    valid = [r for r in records if r["codes"] is not None]
    if valid:
        embeds = prev["tokenizer"].embed(torch.tensor([r["codes"] for r in valid], device=run.device))
        # A decoder-free diagnostic of the LLM alone: the combination of the real image whose embedding (from its
        # own codes) is nearest in cosine to the generated one. Not the metric (that is the judged image below).
        real = F.normalize(prev["tokenizer"].embed(prev["codes"]), dim=-1)                # (1350, E)
        nearest = (F.normalize(embeds, dim=-1) @ real.t()).argmax(1).tolist()
        images = decode_embeddings(prev["decoder"], embeds, run.cfg.decoder, noise_seed=run.cfg.seed)
        for r, n, image in zip(valid, nearest, images):
            r["nearest"], r["image"] = data.combos[n], image
    for r in records:
        r["judged"] = judge(r["image"]) if "image" in r else None
        r["correct"] = r["judged"] is not None and all(r["judged"][a] == getattr(r["target"], a) for a in ATTRIBUTES)

def image_scores(records: list[dict]) -> dict:
    """The rate of valid image spans, and per task (t2i, edit) and part (held-in, held-out) the judged accuracy,
    per attribute and of all four, and the decoder-free accuracy of the nearest real image."""
    valid = sum(r["codes"] is not None for r in records)
    metrics = {"valid_spans": f"{valid}/{len(records)}", "valid_span_rate": valid / len(records)}
    for task in ("t2i", "edit"):
        for part, held_out in (("heldin", False), ("heldout", True)):
            chosen = [r for r in records if r["task"] == task and r["target"].held_out == held_out]
            n, prefix = max(len(chosen), 1), f"{task}_{part}"
            for a in ATTRIBUTES:
                metrics[f"{prefix}_{a}"] = sum(r["judged"] is not None and r["judged"][a] == getattr(r["target"], a)
                                               for r in chosen) / n
            metrics[f"{prefix}_all"] = sum(r["correct"] for r in chosen) / n
            metrics[f"{prefix}_n"] = len(chosen)
            metrics[f"{prefix}_nearest_all"] = sum(r.get("nearest") == r["target"] for r in chosen) / n
    return metrics

def evaluate_llm(run: Run, prev: dict, model: llama.Llama) -> dict:
    """The LLM metrics on the test images and all 150 prompts, images drawn by the trained pipeline (codes ->
    SeedTokenizer.embed -> UnCLIPDecoder) and judged by world.judge; the records and captions, for the reports."""
    data, limit = prev["llm_data"], 8 if run.cfg.smoke else None
    test = run.world.test_idx.tolist()[:limit]  # every combination, two jitters each
    metrics, captions = evaluate_text(model, prev["llm_tokenizer"], data, test)
    records = image_requests(run, data, limit)
    draw_requests(run, prev, model, records)
    metrics.update(image_scores(records))
    held_in_test = [i for i in test if not data.combos[i].held_out]
    tok = prev["llm_tokenizer"]
    metrics["image_code_loss"], per_position = image_code_loss(model, t2i_rows(data, held_in_test), tok.image_vocab,
                                                               tok.pad_id, run.device)
    run.metrics["llm"]["image_code_loss_by_position"] = per_position
    run.metrics.setdefault("llm", {}).update(metrics)
    return {"records": records, "captions": dict(zip(test, captions))}

# --- What each code carries: prefix decodes, probes, the Q-Former's attention --------------------------------------
def prefix_codes(codes: torch.Tensor, k: int, fill: torch.Tensor) -> torch.Tensor:
    """The first k of each row of codes (N, 32), the rest taken from `fill` (32,): the code each later position
    holds most often over the train images, so a prefix is completed by the "typical image" and not by noise."""
    out = fill.to(codes.device).expand_as(codes).clone()
    out[:, :k] = codes[:, :k]
    return out

def most_common_codes(codes: torch.Tensor) -> torch.Tensor:
    """(N, P) codes -> (P,) the most frequent code at each position."""
    return torch.stack([torch.bincount(codes[:, p]).argmax() for p in range(codes.shape[1])])

def evaluate_prefixes(run: Run, outputs: dict) -> dict:
    """Decode test images from their first k codes for every k in PREFIX_KS (`prefix_codes`), judge each result
    against the image's own attributes: per k the decoded images, the verdicts and each attribute's accuracy."""
    world, codes, tokenizer = run.world, outputs["codes"], outputs["tokenizer"]
    indices = [int(i) for i in world.test_idx][::14][:4 if run.cfg.smoke else 20]
    fill, targets = most_common_codes(codes[world.train_idx.to(codes.device)]), [COMBOS[int(world.combo[i])]
                                                                                 for i in indices]
    result = {"ks": list(PREFIX_KS), "indices": indices, "images": {}, "right": {},
              "accuracy": {a: [] for a in ATTRIBUTES}}
    with torch.no_grad():  # every k in one decoder call: (len(PREFIX_KS) * N, E)
        embeds = tokenizer.embed(torch.cat([prefix_codes(codes[indices], k, fill) for k in PREFIX_KS]))
    images = decode_embeddings(outputs["decoder"], embeds, run.cfg.decoder, noise_seed=run.cfg.seed)
    for n, k in enumerate(PREFIX_KS):
        result["images"][k] = images[n * len(indices):(n + 1) * len(indices)]
        verdicts = [judge(image) for image in result["images"][k]]
        result["right"][k] = [all(v[a] == getattr(t, a) for a in ATTRIBUTES) for v, t in zip(verdicts, targets)]
        for a in ATTRIBUTES:
            result["accuracy"][a].append(sum(v[a] == getattr(t, a) for v, t in zip(verdicts, targets)) / len(targets))
    return result

@torch.no_grad()
def cross_attention_maps(tokenizer: "seed.SeedTokenizer", vit_tokens: torch.Tensor) -> torch.Tensor:
    """(B, 1+N, W) ViT tokens -> (B, 32, 1+N): the weights of the Q-Former's first cross-attention (mean over its
    heads), recomputed from that layer's input by a forward hook, so the model itself stays one SDPA call."""
    layer = next(l.crossattention for l in tokenizer.qformer.layers if l.crossattention is not None)
    seen = {}
    hook = layer.register_forward_hook(lambda module, args, kwargs, out: seen.update(x=args[0], ctx=kwargs["context"]),
                                       with_kwargs=True)
    try:
        tokenizer.query_embeddings(tokenizer.ln_vision(vit_tokens))
    finally:
        hook.remove()
    (B, T, _), S, h = seen["x"].shape, seen["ctx"].shape[1], layer.n_heads
    q = layer.query(seen["x"]).view(B, T, h, -1).transpose(1, 2)
    k = layer.key(seen["ctx"]).view(B, S, h, -1).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1).mean(1)

# === Reports: metrics.json, the results table, samples.png, curves.png, codes.png, the evaluation images. ===========
# The level at which a stage has learned its task, checked by the results table: (group, metric) -> minimum.
TARGETS = {("clip", "caption_acc_test"): 0.95, ("tokenizer", "caption_acc_continuous"): 0.95,
           ("tokenizer", "caption_acc_codes"): 0.90, ("tokenizer", "codebook_usage"): 0.50,
           ("decoder", "recon_all"): 0.85, ("llm", "caption_exact"): 0.90, ("llm", "vqa_acc"): 0.90,
           ("llm", "t2i_heldin_all"): 0.80, ("llm", "t2i_heldout_all"): 0.50, ("llm", "valid_span_rate"): 0.98}
CELL = 96  # pixels of one 32x32 image in the report figures (3x, nearest neighbour)
FIGURES = ("samples.png", "curves.png", "codes.png", "code_probes.png", "attention.png", "prefix_decodes.png",
           "code_loss_by_position.png")  # what every complete run writes into --out
PREFIX_KS = (1, 2, 4, 8, 16, 32)  # prefix_decodes.png: images decoded from the first k codes
RIGHT, WRONG = (20, 140, 40), (200, 30, 30)  # the frame of a judged cell
# What each stage's curve is (curves.png, curves.json): the loss `step_fn` returns.
LOSS_NAMES = {"clip": "multi-positive InfoNCE", "qformer": "last-query ITC (InfoNCE)",
              "codebook": "5 VQ + 2 (1-cos) + 0.5 MSE + factor", "decoder": "v-prediction MSE",
              "llm_pretrain": "next-token CE", "llm_lora": "next-token CE, replies",
              "llm_sft": "next-token CE, replies"}

def machine_info(run: Run) -> dict:
    """Where the run ran: the numbers that make its timings meaningful (a busy machine is slower)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "device": str(run.device),
            "torch_threads": torch.get_num_threads(), "world_size": run.world_size,
            "load_average_1_5_15min": [round(x, 2) for x in load] if load else None}

def font(size: int = 13) -> "ImageFont.FreeTypeFont":
    """Pillow's scalable default font (legible at README scale, unlike the 6-px bitmap one)."""
    return ImageFont.load_default(size=size)

def _big(image: Image.Image, size: int = CELL) -> Image.Image:
    return image.resize((size, size), Image.NEAREST)

def _text_cell(text: str, width: int = CELL, height: int = CELL, size: int = 12, fill=(0, 0, 0)) -> Image.Image:
    """A white cell with `text` wrapped to its width."""
    cell, f = Image.new("RGB", (width, height), (255, 255, 255)), font(size)
    draw, lines = ImageDraw.Draw(cell), []
    for word in text.split():
        if lines and draw.textlength(lines[-1] + " " + word, font=f) <= width - 6:
            lines[-1] += " " + word
        else:
            lines.append(word)
    for k, line in enumerate(lines):
        draw.text((3, 2 + (size + 2) * k), line, fill=fill, font=f)
    return cell

def _verdict(judged: dict | None, target) -> tuple[str, tuple]:
    """The judge's verdict on a generated image as a short text and its colour."""
    if judged is None:
        return "no valid image", WRONG
    wrong = [a for a in ATTRIBUTES if judged[a] != getattr(target, a)]
    if not wrong:
        return "judged right", RIGHT
    return "wrong " + ", ".join(f"{a}: {judged[a]}" for a in wrong), WRONG

def _framed(image: Image.Image, colour: tuple) -> Image.Image:
    framed = _big(image).copy()
    ImageDraw.Draw(framed).rectangle((0, 0, CELL - 1, CELL - 1), outline=colour, width=4)
    return framed

def save_eval_images(run: Run, records: list[dict]) -> None:
    """Every generated evaluation image as OUT/eval/<task>_<k>.png, and OUT/eval/index.json with each one's prompt,
    the attributes it requests, held-out flag, 32 codes, the judge's verdict and the decoder-free diagnostic, so
    that anyone can re-judge the images. A generation without a valid image span has no file (file: null)."""
    folder = run.out / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    index = []
    for k, r in enumerate(records):
        name = f"{r['task']}_{k:04d}.png" if "image" in r else None
        if name:
            r["image"].save(folder / name)
        index.append({"file": name, "task": r["task"], "prompt": r["prompt"], "source_image": r.get("source"),
                      "target": dataclasses.asdict(r["target"]), "held_out": r["target"].held_out,
                      "codes": r["codes"], "judged": r["judged"], "correct": r["correct"],
                      "nearest_real": dataclasses.asdict(r["nearest"]) if "nearest" in r else None})
    weights.write_json(folder / "index.json", index)

def _sample_row(run: Run, i: int, k: int, outputs: dict, pools: list[list[dict]]) -> list[tuple]:
    """(image cell, label, colour of the label) of one row of samples.png, every generated cell judged."""
    recon, captions = dict(outputs["reconstructions"]), outputs["llm_eval"]["captions"]
    combo = COMBOS[int(run.world.combo[i])]
    text, colour = _verdict(judge(recon[i]), combo)
    right = captions[i] == combo.caption
    cells = [(_big(to_image(run.world.images[i])), combo.caption, (0, 0, 0)), (_framed(recon[i], colour), text, colour),
             (_text_cell(captions[i], size=13), f"caption {'right' if right else 'wrong'}", RIGHT if right else WRONG)]
    for n, pool in enumerate(pools):
        r = pool[(k * 7 + n) % len(pool)] if pool else None
        if r is None:
            cells.append((_text_cell(""), "", (0, 0, 0)))
            continue
        text, colour = _verdict(r["judged"], r["target"])
        image = _framed(r["image"], colour) if "image" in r else _text_cell("(no valid image span)")
        if r["task"] == "edit":
            cells.append((_big(to_image(run.world.images[r["source"]])), r["prompt"], (0, 0, 0)))
        cells.append((image, (r["target"].caption + ": " if r["task"] == "t2i" else "") + text, colour))
    return cells

def draw_samples(run: Run, outputs: dict) -> Image.Image:
    """samples.png: rows of input | reconstruction from its codes | generated caption | text-to-image (held-in) |
    text-to-image (held-out) | an edit (its input and instruction, then the result); every generated cell framed
    green (judged right) or red (wrong, with what the judge read)."""
    records, captions = outputs["llm_eval"]["records"], outputs["llm_eval"]["captions"]
    rows = [i for i in dict(outputs["reconstructions"]) if i in captions]
    rows = rows[::max(1, len(rows) // 4)][:4]  # spread over the combinations
    pools = [[r for r in records if r["task"] == "t2i" and r["target"].held_out == h] for h in (False, True)]
    pools.append([r for r in records if r["task"] == "edit"])
    header = ["input", "from its 32 codes", "LLM caption", "t2i held-in", "t2i held-out", "edit input", "edit result"]
    W, label_h = CELL + 40, 58
    sheet = Image.new("RGB", (W * len(header), 24 + (CELL + label_h) * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(header):
        draw.text((c * W + 3, 4), title, fill=(0, 0, 0), font=font(14))
    for k, i in enumerate(rows):
        y = 24 + k * (CELL + label_h)
        for c, (cell, label, colour) in enumerate(_sample_row(run, i, k, outputs, pools)):
            sheet.paste(cell, (c * W + 20 * (cell.width == CELL), y))
            sheet.paste(_text_cell(label, W - 4, label_h - 4, size=11, fill=colour), (c * W, y + CELL + 2))
    return sheet

def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values of a log axis from lo to hi: the powers of ten inside, and 2x, 5x when there are few."""
    ticks = [m * 10 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in (1, 2, 5)]
    inside = [t for t in ticks if lo <= t <= hi]
    return inside if len(inside) >= 2 else [lo, hi]

def draw_curves(curves: dict[str, list[float]]) -> Image.Image:
    """curves.png: one panel per stage, its loss (named in LOSS_NAMES) against the step on a log scale, the raw
    loss in grey and a 10-step moving average in blue, with ticks on both axes."""
    W, H, left, pad = 420, 260, 56, 34
    names = list(curves)
    sheet = Image.new("RGB", (W * max(1, min(3, len(names))), H * max(1, math.ceil(len(names) / 3))), "white")
    draw, f = ImageDraw.Draw(sheet), font(12)
    for k, name in enumerate(names):
        x0, y0 = (k % 3) * W, (k // 3) * H
        values = [max(v, 1e-6) for v in curves[name] if math.isfinite(v)]
        box = (x0 + left, y0 + pad, x0 + W - 24, y0 + H - pad)
        draw.rectangle(box, outline=(0, 0, 0))
        draw.text((x0 + left, y0 + 4), f"{name}: {LOSS_NAMES.get(name, 'loss')}", fill=(0, 0, 0), font=font(13))
        if len(values) < 2:
            continue
        lo, hi = math.log10(min(values)), math.log10(max(values))
        smooth = [sum(values[max(0, i - 9):i + 1]) / len(values[max(0, i - 9):i + 1]) for i in range(len(values))]

        def xy(i, v):
            return (box[0] + (box[2] - box[0]) * i / (len(values) - 1),
                    box[3] - (box[3] - box[1]) * (math.log10(v) - lo) / max(hi - lo, 1e-9))

        draw.line([xy(i, v) for i, v in enumerate(values)], fill=(200, 200, 200))
        draw.line([xy(i, v) for i, v in enumerate(smooth)], fill=(30, 80, 200), width=2)
        for t in _log_ticks(10 ** lo, 10 ** hi):
            y = xy(0, t)[1]
            draw.line((box[0] - 4, y, box[0], y), fill=(0, 0, 0))
            draw.text((box[0] - 6 - draw.textlength(f"{t:.3g}", font=f), y - 7), f"{t:.3g}", fill=(0, 0, 0), font=f)
        for step in (0, len(values) // 2, len(values) - 1):
            x = xy(step, values[0])[0]
            draw.line((x, box[3], x, box[3] + 4), fill=(0, 0, 0))
            draw.text((x - 10, box[3] + 5), str(step + 1), fill=(0, 0, 0), font=f)
        draw.text((box[2] - 150, box[3] + 18), f"step (log loss; final {smooth[-1]:.3g})", fill=(0, 0, 0), font=f)
    return sheet

def _heatmap(matrix: list[list[float]], rows: list[str], cols: list[str], title: str, cell=(26, 22)) -> Image.Image:
    """A table of values in [0, 1] as shades of blue, each with its value (two digits)."""
    cw, ch = cell
    left, top = 90, 40
    sheet = Image.new("RGB", (left + cw * len(cols) + 10, top + ch * len(rows) + 10), "white")
    draw, f = ImageDraw.Draw(sheet), font(11)
    draw.text((4, 4), title, fill=(0, 0, 0), font=font(13))
    for c, name in enumerate(cols):
        draw.text((left + c * cw + 3, top - 16), name, fill=(0, 0, 0), font=f)
    for r, name in enumerate(rows):
        draw.text((4, top + r * ch + 4), name, fill=(0, 0, 0), font=f)
        for c, v in enumerate(matrix[r]):
            shade = int(255 - 200 * max(0.0, min(1.0, v)))
            box = (left + c * cw, top + r * ch, left + (c + 1) * cw - 1, top + (r + 1) * ch - 1)
            draw.rectangle(box, fill=(shade, shade, 255))
            text = f"{v:.2f}"  # ".87"; a value that rounds to 1.00 reads "1.0"
            draw.text((box[0] + 2, box[1] + 5), text[1:] if text[0] == "0" else "1.0",
                      fill=(255, 255, 255) if v > 0.6 else (0, 0, 0), font=f)
    return sheet

def draw_probes(probes: dict[str, list[list[float]]]) -> Image.Image:
    """code_probes.png: per run (causal, bidirectional), how well each code position alone predicts each attribute
    (`code_probes`, test images), positions along the x axis, chance next to each attribute."""
    rows = [f"{a} (1/{len(VALUES[a])})" for a in ATTRIBUTES]  # chance: the labels are balanced
    panels = [_heatmap([list(col) for col in zip(*matrix)], rows, [str(p) for p in range(len(matrix))],
                       f"{name}: accuracy of one code position alone (test images)") for name, matrix in probes.items()]
    sheet = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
    for k, panel in enumerate(panels):
        sheet.paste(panel, (0, sum(p.height for p in panels[:k])))
    return sheet

def draw_codes(run: Run, codes: torch.Tensor, n_codes: int) -> Image.Image:
    """codes.png: how often each code is used over all 1350 images (codes sorted by frequency), the entropy of
    the code at each of the 32 positions, and for the most used codes the images that use them."""
    counts = torch.bincount(codes.flatten().cpu(), minlength=n_codes)
    order = counts.argsort(descending=True)
    W, H, f = 40 + 2 * n_codes if n_codes <= 512 else 1064, 150, font(12)
    examples = order[:6].tolist()
    sheet = Image.new("RGB", (max(W, 700), 2 * H + 40 + len(examples) * (CELL // 2 + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), f"code usage over all {codes.shape[0]} images: {int((counts > 0).sum())}/{n_codes} codes "
                      f"used, sorted by frequency (max {int(counts[order[0]])})", fill=(0, 0, 0), font=font(13))
    bar = (W - 40) / n_codes
    for k, c in enumerate(counts[order].tolist()):
        h = (H - 40) * c / max(int(counts[order[0]]), 1)
        draw.rectangle((20 + k * bar, H - 4 - h, 20 + (k + 1) * bar, H - 4), fill=(30, 80, 200))
    entropy = [float(-(p * p.log2()).sum()) for p in
               (torch.bincount(codes[:, q].cpu(), minlength=n_codes).float().div(len(codes)).clamp(min=1e-12)
                for q in range(codes.shape[1]))]
    draw.text((4, H + 4), f"entropy of the code at each position (bits; max {max(entropy):.2f}, log2 150 = 7.23)",
              fill=(0, 0, 0), font=font(13))
    for q, e in enumerate(entropy):
        h = (H - 44) * e / max(max(entropy), 1e-9)
        draw.rectangle((20 + q * 20, 2 * H - 16 - h, 20 + q * 20 + 16, 2 * H - 16), fill=(200, 110, 30))
        draw.text((20 + q * 20, 2 * H - 14), str(q), fill=(0, 0, 0), font=font(9))
    for row, code in enumerate(examples):
        y = 2 * H + 10 + row * (CELL // 2 + 8)
        users = torch.nonzero((codes == code).any(1)).squeeze(1)
        positions = sorted(set(torch.nonzero(codes == code)[:, 1].tolist()))
        draw.text((4, y + 4), f"code {code}: {len(users)} images", fill=(0, 0, 0), font=f)
        draw.text((4, y + 20), f"at {len(positions)} positions", fill=(0, 0, 0), font=f)
        for n, i in enumerate(users[torch.linspace(0, len(users) - 1, min(10, len(users))).long()].tolist()):
            sheet.paste(to_image(run.world.images[i]).resize((CELL // 2, CELL // 2), Image.NEAREST),
                        (130 + n * (CELL // 2 + 4), y))
    return sheet

def draw_prefixes(run: Run, prefixes: dict) -> Image.Image:
    """prefix_decodes.png: a few test images decoded from their first k codes (the rest filled as
    `prefix_codes` says), and the judged accuracy of each attribute over all the inputs as k grows."""
    ks, shown = prefixes["ks"], prefixes["indices"][:5]
    W = 110 + CELL * len(ks)
    sheet = Image.new("RGB", (W, 30 + (CELL + 4) * len(shown) + 30 + 18 * len(ATTRIBUTES)), "white")
    draw, f = ImageDraw.Draw(sheet), font(12)
    draw.text((4, 4), "decoded from the first k of the 32 codes", fill=(0, 0, 0), font=font(13))
    for c, k in enumerate(ks):
        draw.text((110 + c * CELL + 30, 20), f"k = {k}", fill=(0, 0, 0), font=f)
    for r, i in enumerate(shown):
        y = 36 + r * (CELL + 4)
        sheet.paste(to_image(run.world.images[i]).resize((CELL - 10, CELL - 10), Image.NEAREST), (4, y))
        for c, k in enumerate(ks):
            image = prefixes["images"][k][r]
            sheet.paste(_framed(image, RIGHT if prefixes["right"][k][r] else WRONG), (110 + c * CELL, y))
    y = 40 + (CELL + 4) * len(shown)
    draw.text((4, y), f"judged accuracy over {len(prefixes['indices'])} test images:", fill=(0, 0, 0), font=f)
    for a_k, a in enumerate(ATTRIBUTES):
        draw.text((4, y + 18 * (a_k + 1)), a, fill=(0, 0, 0), font=f)
        for c, k in enumerate(ks):
            draw.text((110 + c * CELL + 30, y + 18 * (a_k + 1)), f"{prefixes['accuracy'][a][c]:.2f}",
                      fill=(0, 0, 0), font=f)
    return sheet

def draw_attention(run: Run, maps: torch.Tensor, indices: list[int], queries: tuple[int, ...]) -> Image.Image:
    """attention.png: the Causal Q-Former's cross-attention (layer 0, mean over heads) of a few queries over the
    image patches, each map (patch grid, CLS left out and renormalised) laid over the image."""
    grid = int(round((maps.shape[-1] - 1) ** 0.5))
    sheet = Image.new("RGB", (CELL * (len(queries) + 1) + 10, 40 + (CELL + 6) * len(indices)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), "cross-attention of query q over the 8x8-pixel patches (darker = more; min-max per map)",
              fill=(0, 0, 0), font=font(13))
    for c, q in enumerate(queries):
        draw.text((CELL * (c + 1) + 30, 22), f"q = {q}", fill=(0, 0, 0), font=font(12))
    for r, i in enumerate(indices):
        y, image = 40 + r * (CELL + 6), _big(to_image(run.world.images[i]))
        sheet.paste(image, (0, y))
        for c, q in enumerate(queries):
            w = maps[r, q, 1:].reshape(grid, grid).cpu()
            w = (w - w.min()) / (w.max() - w.min()).clamp(min=1e-12)   # this query's most and least attended patch
            heat = Image.fromarray((w * 180).byte().numpy(), "L").resize((CELL, CELL), Image.NEAREST)
            sheet.paste(Image.composite(Image.new("RGB", (CELL, CELL), (0, 0, 0)), image, heat), (CELL * (c + 1), y))
    return sheet

def draw_code_loss(by_position: dict[str, list[float]]) -> Image.Image:
    """code_loss_by_position.png: the LLM's teacher-forced loss on each of the 32 codes (and `</img>`) of real
    images, one line per LLM (causal / bidirectional tokenizer; after pretraining / after instruction tuning)."""
    W, H, left, pad = 720, 300, 50, 30
    sheet = Image.new("RGB", (W, H + 20 * len(by_position)), "white")
    draw, f = ImageDraw.Draw(sheet), font(12)
    draw.text((left, 6), "image-code loss (nats) at each position of the span, test images", fill=(0, 0, 0),
              font=font(13))
    box = (left, pad, W - 10, H - pad)
    draw.rectangle(box, outline=(0, 0, 0))
    hi = max(max(v) for v in by_position.values()) * 1.05 or 1.0
    palette = [(30, 80, 200), (200, 60, 30), (30, 150, 60), (150, 60, 190)]
    for n, (name, values) in enumerate(by_position.items()):
        pts = [(box[0] + (box[2] - box[0]) * q / (len(values) - 1), box[3] - (box[3] - box[1]) * v / hi)
               for q, v in enumerate(values)]
        draw.line(pts, fill=palette[n % 4], width=2)
        draw.text((left, H + 20 * n), f"{name}: mean {sum(values) / len(values):.3f} over the span "
                  "(metrics.json's image_code_loss)", fill=palette[n % 4], font=f)
    for t in range(5):
        y = box[3] - (box[3] - box[1]) * t / 4
        draw.text((4, y - 7), f"{hi * t / 4:.2f}", fill=(0, 0, 0), font=f)
    for q in range(0, 33, 4):
        x = box[0] + (box[2] - box[0]) * q / 32
        draw.text((x - (36 if q == 32 else 4), box[3] + 4), "</img>" if q == 32 else str(q), fill=(0, 0, 0), font=f)
    return sheet

def results_table(run: Run) -> str:
    """The table printed at the end: every metric, with its target where there is one (TARGETS)."""
    lines = [f"{'metric':<34} {'value':>10}  target", "-" * 56]
    for group, values in run.metrics.items():
        for name, value in values.items():
            if isinstance(value, (list, dict)):  # per-position tables: in metrics.json and the figures
                continue
            target = TARGETS.get((group, name))
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            check = "" if target is None else f">= {target:.2f} {'ok' if value >= target else 'MISSED'}"
            lines.append(f"{group + '/' + name:<34} {shown:>10}  {check}")
    lines += ["-" * 56] + [f"{'time/' + name:<34} {seconds:>9.1f}s" for name, seconds in run.timings.items()]
    m = machine_info(run)
    lines.append(f"machine: {m['cpu_count']} cores, {m['device']}, {m['torch_threads']} torch threads, "
                 f"{m['world_size']} process(es), load average {m['load_average_1_5_15min']}, {m['platform']}")
    return "\n".join(lines)

# What sample.py shows on this run when given no picture or prompt: a test image of a held-in combination, edits of
# it to other held-in ones (the edit task; the chat's second turn, on the picture in its history) and a held-in
# text-to-image request. Chosen so that every task is judged right on the default run; edits in general are right
# about a third of the time (metrics.json), so another picture may show a wrong one.
DEMO = {"image": Combo("square", "green", "large", "right"), "edit": ("colour", "red"), "chat": ("shape", "circle"),
        "t2i": Combo("circle", "blue", "small", "top")}

def write_generation_config(run: Run) -> list[str]:
    """OUT/generation_config.json, the defaults sample.py takes for this run: the settings its evaluation measured
    with (greedy decoding, unconstrained, the decoder's steps and guidance, no negative image), the requests phrased
    as the LLM was taught them (world.py's first of each), and OUT/demo.png (DEMO's image). The names written."""
    image = DEMO["image"]
    index = COMBOS.index(image) * len(JITTERS) + COMBOS.index(image) % len(JITTERS)  # its first test jitter
    to_image(run.world.images[index]).save(run.out / "demo.png")
    settings = {"temperature": 0.0, "max_new_tokens": CODES_PER_IMAGE + 8, "constrained": False, "negative": False,
                "steps": run.cfg.decoder.sample_steps, "guidance": run.cfg.decoder.guidance, "sampler": "pndm",
                "seed": run.cfg.seed}
    prompts = {"caption": CAPTION_REQUESTS[0], "vqa": QUESTIONS["shape"],
               "t2i": T2I_REQUESTS[0].format(DEMO["t2i"].caption), "edit": image.edit(*DEMO["edit"])[0],
               "chat": [CAPTION_REQUESTS[0], image.edit(*DEMO["chat"])[0]]}
    weights.write_json(run.out / "generation_config.json", {"settings": settings, "prompts": prompts,
                                                            "demo_image": "demo.png", "demo": image.caption})
    return ["generation_config.json", "demo.png"]

def compared_run(run: Run) -> dict:
    """The metrics of the run named by --compare ({} without one), and its name: causal or bidirectional."""
    if not run.cfg.compare:
        return {}
    report = json.loads((Path(run.cfg.compare) / "metrics.json").read_text())  # main checked that it exists
    return {"name": "bidirectional" if report["config"]["no_causal"] else "causal", "metrics": report["metrics"]}

def write_code_figures(run: Run, outputs: dict, other: dict) -> None:
    """code_probes.png, codes.png, attention.png (and the probes in the metrics) from the tokenizer's codes."""
    name, world, codes = "bidirectional" if run.cfg.no_causal else "causal", run.world, outputs["codes"].cpu()
    probes = code_probes(codes, attribute_labels(world), world.train_idx, world.test_idx)
    run.metrics["tokenizer"]["code_probes"] = probes.tolist()  # (32 positions, ATTRIBUTES)
    run.metrics["tokenizer"].update({f"probe_best_{a}": probes[:, k].max().item() for k, a in enumerate(ATTRIBUTES)})
    run.metrics["tokenizer"]["distinct_codes_per_image"] = sum(len(set(row)) for row in codes.tolist()) / len(codes)
    both = {name: probes.tolist()}
    if other.get("metrics", {}).get("tokenizer", {}).get("code_probes"):
        both[other["name"] + " (--compare)"] = other["metrics"]["tokenizer"]["code_probes"]
    draw_probes(both).save(run.out / "code_probes.png")
    draw_codes(run, codes, outputs["tokenizer"].quantize.n_codes).save(run.out / "codes.png")
    shown = [int(i) for i in world.test_idx][::62][:5]
    maps = cross_attention_maps(outputs["tokenizer"], outputs["vit_tokens"][shown])
    draw_attention(run, maps, shown, (0, 1, 8, 16, 24, 31)).save(run.out / "attention.png")

def write_llm_figures(run: Run, outputs: dict, other: dict) -> None:
    """eval/ with index.json, samples.png and code_loss_by_position.png."""
    save_eval_images(run, outputs["llm_eval"]["records"])
    if "reconstructions" in outputs:
        draw_samples(run, outputs).save(run.out / "samples.png")
    lines = {}
    for label, metrics in (("bidirectional" if run.cfg.no_causal else "causal", run.metrics["llm"]),
                           (other.get("name", "") + " (--compare)", other.get("metrics", {}).get("llm", {}))):
        for key, stage in (("pretrain_image_code_loss_by_position", "after pretraining"),
                           ("image_code_loss_by_position", "after instruction tuning")):
            if metrics.get(key):
                lines[f"{label}, {stage}"] = metrics[key]
    draw_code_loss(lines).save(run.out / "code_loss_by_position.png")

def write_reports(run: Run, outputs: dict) -> None:
    """metrics.json, the evaluation images with index.json, every figure, curves.json, and the table."""
    if not run.main:
        return
    if "judge" not in run.metrics:  # how far the judge itself can be trusted: its accuracy on the clean renders
        truth = [COMBOS[int(c)] for c in run.world.combo]
        run.metrics["judge"] = {f"clean_{k}": v for k, v in judge_accuracy(run.world.images, truth).items()}
    other = compared_run(run)
    if "codes" in outputs:
        write_code_figures(run, outputs, other)
    if "decoder" in outputs and "codes" in outputs:
        t0 = time.time()
        prefixes = evaluate_prefixes(run, outputs)
        run.timings["prefix_decodes"] = time.time() - t0
        run.metrics["decoder"].update({f"prefix_{a}": v for a, v in prefixes["accuracy"].items()},
                                      prefix_ks=prefixes["ks"])
        draw_prefixes(run, prefixes).save(run.out / "prefix_decodes.png")
    if "llm_eval" in outputs:
        write_llm_figures(run, outputs, other)
    if run.curves:
        draw_curves(run.curves).save(run.out / "curves.png")
        weights.write_json(run.out / "curves.json", {name: {"loss": LOSS_NAMES.get(name, "loss"), "values": values}
                                                     for name, values in run.curves.items()})
    report = {"metrics": run.metrics, "timings_s": run.timings, "machine": machine_info(run),
              "config": dataclasses.asdict(run.cfg)}
    weights.write_json(run.out / "metrics.json", report)
    write_generation_config(run)
    print(results_table(run))
    print(summary(run))

def summary(run: Run) -> str:
    """The last lines of a run: how many targets it met, what it wrote, and what to run next."""
    checked = [(group, name) for group, name in TARGETS if name in run.metrics.get(group, {})]
    met = sum(run.metrics[group][name] >= TARGETS[group, name] for group, name in checked)
    written = sorted(p.name + "/" * p.is_dir() for p in run.out.iterdir() if not p.name.startswith("."))
    ready = all((run.out / part).is_dir() for part in ("seed", "llama", "decoder"))
    return (f"{met} of {len(checked)} targets met\nwritten in {run.out}: {', '.join(written)}\nnext: " +
            (f"python sample.py --ckpt {run.out}" if ready else f"python train.py --tiny --out {run.out} --stages "
             f"0,1,2,3,4,5 (this run did not write seed/, llama/ and decoder/)"))

# The stages in the paper's order: each a plain function `stage_x(run, prev) -> dict` (see `Run`).
STAGES = ((0, stage_clip), (1, stage_qformer), (2, stage_codebook), (3, stage_decoder),
          (4, stage_llm_pretrain), (5, stage_llm_instruct))

def main(argv: list[str] | None = None) -> Run:
    cfg = parse_config(argv)
    if not cfg.tiny:
        raise SystemExit("train.py has one training preset, the tiny SEED on the shapes world: "
                         "run `python train.py --tiny` (see --help for every option)")
    if cfg.compare and not (Path(cfg.compare) / "metrics.json").exists():  # named now, not after the whole run
        raise SystemExit(f"--compare {cfg.compare}: no metrics.json there; give the --out of a finished run")
    run = Run(cfg)
    outputs: dict = {}
    t0, c0 = time.time(), time.process_time()
    try:
        for stage, fn in STAGES:
            if stage <= max(run.selected):  # earlier stages outside --stages are loaded from their checkpoints
                outputs.update(fn(run, outputs))
        run.timings["total"], run.timings["total_cpu"] = time.time() - t0, time.process_time() - c0
        write_reports(run, outputs)
    finally:
        run.release()
    if run.world_size > 1:
        dist.destroy_process_group()
    return run

if __name__ == "__main__":
    main()
