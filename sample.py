"""sample.py: SEED-LLaMA end to end, from pixels to codes to words and back to pixels (examples: --help).

What runs (paper: "Making LLaMA SEE and Draw with SEED Tokenizer", arXiv:2310.01218):
  image --SeedTokenizer.encode--> 32 codes --Llama--> text and/or 32 new codes --SeedTokenizer.embed--> 1024-d
  image embedding --UnCLIPDecoder--> image.
The prompts are the official templates (AILab-CVC/SEED @ 93b3cf4 scripts/seed_llama_inference_8B.py / _14B.py,
and gradio_demo/conversation.py for multi-turn chat); an image enters a prompt as `<img>` + 32 codes + `</img>`.
`--ckpt official` fetches the released files (urllib only) into a cache laid out as on the Hugging Face hub;
`--ckpt PATH` reads train.py's `PATH/seed/`, `PATH/llama/` and `PATH/decoder/`, with the settings, prompts and demo
picture of its `generation_config.json` as defaults. Every task works with either; each CLI task is one call of

    pipe = SeedLlama.from_pretrained("out/tiny")            # or "official"; device, dtype: the best present
    pipe.caption("shape.png")                               # -> str; an image is a path, a PIL image or 32 codes
    pipe.answer("shape.png", "what colour is the shape?")   # -> str
    pipe.text_to_image("draw a large red circle on the left.", seed=1)  # -> PIL image (settings by keyword)
    pipe.edit("shape.png", "make it blue"); pipe.reconstruct("shape.png"); pipe.chat().turn("hello")

Deliberate deviations from the official scripts:
  * t2i and edit append `<img>` to the prompt (the flask demo's `force_boi`), so the answer is always an image.
  * `--constrained` restricts the 32 tokens after `<img>` to image codes, then forces `</img>`; the official code
    samples freely and may write a broken span (printed as text, nothing drawn, instead of decoding garbage).
  * The answer length is capped so that prompt + answer fit the context window; a chat forgets its oldest exchanges
    when the history leaves no room for an answer.
  * The decoder's negative image (the LLM's unconditional codes) is sampled once per run. `--llm-cfg` (off by
    default, as officially) also guides the LLM's image codes; `--sampler ddim` replaces the official PNDM sampler.
"""
import argparse
import base64
import contextlib
import errno
import hashlib
import http.client
import json
import math
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from llama import GenerationConfig, Llama, quantize_int8
from tokenizer import CODES_PER_IMAGE, Tokenizer, check_image_codes
from seed import SeedTokenizer, load_image
from unet import OFFICIAL_COMPONENTS, SAMPLERS, UnCLIPDecoder
from weights import (HALF_DTYPES, atomic_write, index_shards, inference_dtype, inside, lock, on_device,
                     pick_device, pin_to_host, read_json, run_record, write_json)

# ---- The pipeline: SEED tokenizer + SEED-LLaMA + unCLIP decoder, and the API on top of them ------------------------
@dataclass
class Settings:
    """How to generate: the official defaults (the LLM's: llama.GenerationConfig's values); a train.py run carries
    its own in GENERATION_CONFIG."""
    temperature: float = GenerationConfig.temperature  # 0 = greedy
    top_p: float = GenerationConfig.top_p
    top_k: int = GenerationConfig.top_k                # 0 = all
    max_new_tokens: int = GenerationConfig.max_new_tokens
    llm_guidance: float = GenerationConfig.guidance_scale  # classifier-free guidance on image codes; 1 = off
    constrained: bool = False      # image spans always valid: only codes after <img>, then </img>
    steps: int = 20                # denoising steps of the unCLIP decoder
    guidance: float = 10.0         # classifier-free guidance scale of the unCLIP decoder
    sampler: str = "pndm"          # the decoder's sampler: "pndm" (official) or "ddim" (unet.SAMPLERS)
    negative: bool = True          # generated images: the LLM's unconditional codes as the negative image
    seed: int = 0

# The range of every number in Settings: outside it a run means nothing or never ends (a guidance of 1e30 overflows
# the sampler into NaN; the schedule has 1000 timesteps, so at most 1000 steps).
LIMITS = {"temperature": (0, 10), "top_p": (0, 1), "top_k": (0, 1_000_000), "max_new_tokens": (1, 1_000_000),
          "llm_guidance": (0, 100), "steps": (1, 1000), "guidance": (0, 100), "seed": (0, 2 ** 63 - 1)}
FLAGS = {"llm_guidance": "--llm-cfg"}  # a field's flag is --its-name, but for these

def check_settings(settings: Settings, source: str | None = None) -> Settings:
    """`settings` when every field has its type and lies in LIMITS (top_p above 0), else a ValueError that names the
    flag, or the field and the file `source` it was read from."""
    for f in fields(Settings):
        value = getattr(settings, f.name)
        name = f"{f.name} in {source}" if source else FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        if f.type in (bool, str):
            ok, want = isinstance(value, f.type) and (f.type is bool or value in SAMPLERS), \
                f"one of {', '.join(SAMPLERS)}" if f.type is str else "true or false"
        else:
            lo, hi = LIMITS[f.name]
            ok = isinstance(value, (int, float) if f.type is float else int) and not isinstance(value, bool) \
                and math.isfinite(value) and lo <= value <= hi and (f.name != "top_p" or value > 0)
            kind, bracket = "a number" if f.type is float else "an integer", "(" if f.name == "top_p" else "["
            want = f"{kind} in {bracket}{lo}, {hi}]"
        if not ok:
            raise ValueError(f"{name} must be {want}, got {value!r}")
    return settings

# What each task asks when no prompt is given: the official script's examples, adapted to the built-in test picture.
OFFICIAL_PROMPTS = {
    "caption": "Please describe the image in one sentence.", "vqa": "What is in this picture?",
    "t2i": "Can you generate an image of a dog on the green grass?",
    "edit": "Can you make it a winter scene with snow?",
    "chat": ["What is in this picture?", "Now draw the same scene at night."]}  # a turn on the picture, then /draw
GENERATION_CONFIG = "generation_config.json"  # in a train.py run: {"settings", "prompts", "demo_image", "demo"}

def read_generation_config(folder: Path) -> dict:
    """The defaults train.py wrote for its run: SeedLlama's `settings`, `prompts` and `demo` (picture, description).
    A folder without the file (made by hand, or by an older train.py) gets the official defaults."""
    path = folder / GENERATION_CONFIG
    if not path.is_file():
        return {}
    raw = read_json(path)
    settings, prompts = raw.get("settings", {}), raw.get("prompts", {})
    if not isinstance(settings, dict) or not isinstance(prompts, dict):
        raise ValueError(f"{path}: 'settings' and 'prompts' must be JSON objects")
    unknown = sorted(set(raw) - {"settings", "prompts", "demo_image", "demo"}) + \
        sorted(set(settings) - {f.name for f in fields(Settings)}) + sorted(set(prompts) - set(OFFICIAL_PROMPTS))
    if unknown:
        raise ValueError(f"{path}: unknown fields {', '.join(unknown)}; delete them, or run train.py again")
    for task, text in prompts.items():
        if not (isinstance(text, str) if task != "chat" else
                isinstance(text, list) and len(text) == 2 and all(isinstance(t, str) for t in text)):
            raise ValueError(f"{path}: prompts.{task} must be {'two strings' if task == 'chat' else 'a string'}")
    config = {"settings": check_settings(replace(Settings(), **settings), str(path)), "prompts": prompts}
    if "demo_image" in raw:
        config["demo"] = (load_image(inside(folder, str(raw["demo_image"]), str(path))),
                          str(raw.get("demo", raw["demo_image"])))
    return config

def escape(text: str) -> str:
    """Text that holds `<image>`, `<img>`, `</img>` or `<img_k>` as letters (the model can write them) with a space
    after the `<`: re-encoded in a chat's history it must stay text, never become a placeholder or an image token."""
    return re.sub(r"<(?=/?im(?:g|age))", "< ", text)

class NoPicture(ValueError):
    """A picture was asked for and the LLM's answer holds no valid image span (an unconstrained model can break one)."""

class SeedLlama:
    """SEED-LLaMA end to end: the SEED tokenizer, the LLM with its text tokenizer, and the unCLIP decoder.

    `SeedLlama.from_pretrained("official" or a train.py folder)`, then `caption`, `answer`, `text_to_image`, `edit`,
    `reconstruct` and `chat`. An `image` is a path, a PIL image, or its 32 codes; every call takes `self.settings`
    (the checkpoint's own) with any of its fields overridden by keyword (`pipe.text_to_image("...", seed=3)`). With
    `low_vram` every model stays in pinned host memory and `running(phase)` puts only what that phase runs on
    the device, for the phase."""

    def __init__(self, seed, llm, tokenizer, decoder, device: torch.device, low_vram: bool = False,
                 template: str = "8B", settings: Settings | None = None, prompts: dict | None = None,
                 demo: tuple[Image.Image, str] | None = None):
        self.seed, self.llm, self.tokenizer, self.decoder = seed, llm, tokenizer, decoder
        self.device, self.low_vram, self.template = device, low_vram, template
        self.settings = check_settings(settings or Settings())
        self.prompts = {**OFFICIAL_PROMPTS, **(prompts or {})}
        self.demo = demo  # the picture a task shows when given none (None: the built-in test picture)
        self.image_vocab = tokenizer.image_vocab
        # The three parts were trained together: their interfaces must agree, or the outputs are garbage.
        if self.image_vocab is None:
            raise ValueError("the LLM tokenizer has no image tokens (<img_00000>.., <img>, </img>)")
        if self.image_vocab.n_codes != seed.config.n_codes:
            raise ValueError(f"the LLM knows {self.image_vocab.n_codes} image codes but the SEED tokenizer has "
                             f"{seed.config.n_codes}")
        if len(tokenizer) > llm.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the LLM only {llm.config.vocab_size}")
        if decoder.config.embed_dim != seed.config.embed_dim:
            raise ValueError(f"the decoder draws from {decoder.config.embed_dim}-d image embeddings but the SEED "
                             f"tokenizer makes {seed.config.embed_dim}-d ones")
        self._uncond_codes = None

    @classmethod
    def from_pretrained(cls, ckpt: str | os.PathLike, device=None, dtype: torch.dtype | None = None,
                        model: str = "8b", weights: str | None = None, low_vram: bool = False) -> "SeedLlama":
        """`ckpt` = "official" (the released weights, fetched into the cache once; `model` "8b" or "14b", `weights`
        a folder of your own in the hub layout) or a folder written by train.py, with its GENERATION_CONFIG.
        `device`: the best present (cuda, mps, cpu) by default; `dtype`: half on accelerators, on the CPU bf16
        where it is native and fp32 elsewhere (weights.inference_dtype)."""
        device = pick_device(device)  # an absent device is named, with the ones present
        dtype = dtype or inference_dtype(device)
        # --low-vram: the weights live in host memory; the decoder loads on the device so that its text encoder runs
        # E("") there once, then joins the others in pinned host memory (place_low_vram)
        home = torch.device("cpu") if low_vram else device
        if str(ckpt) == "official":
            parts, kw = load_official(weights_root(weights), model, home, device, dtype), {"template": model.upper()}
        else:  # train.py instruction-tunes in the official 8B chat template
            parts, kw = load_run(Path(ckpt), home, device, dtype), read_generation_config(Path(ckpt))
        if low_vram:
            place_low_vram(parts[0], parts[1], parts[3])
        return cls(*parts, device, low_vram, **kw)

    def _settings(self, overrides: dict) -> Settings:
        return check_settings(replace(self.settings, **overrides)) if overrides else self.settings

    # -- the API: plain values in, plain values out -----------------------------------------------------------
    def caption(self, image, prompt: str | None = None, **settings) -> str:
        """A description of `image`, asked in the checkpoint's own words unless `prompt` is given."""
        return self.answer(image, prompt or self.prompts["caption"], **settings)

    def answer(self, image, question: str, **settings) -> str:
        """The LLM's answer to `question` about `image` (a picture it draws instead shows as `[image]`)."""
        text, _, _ = self.respond(question, self.codes(image), self._settings(settings))
        return text.replace("<image>", "[image]").strip()

    def text_to_image(self, prompt: str, return_codes: bool = False, **settings):
        """The picture the LLM writes for `prompt` (its 32 codes, drawn by the decoder); (picture, codes) when asked."""
        return self._picture(prompt, None, self._settings(settings), return_codes)

    def edit(self, image, instruction: str, return_codes: bool = False, **settings):
        """`image` changed as `instruction` says; (picture, codes) when asked."""
        return self._picture(instruction, self.codes(image), self._settings(settings), return_codes)

    def reconstruct(self, image, return_codes: bool = False, **settings):
        """`image` -> its 32 codes -> embedding -> decoder: what the codes keep of it; (picture, codes) when asked."""
        codes = self.codes(image)
        picture = self.draw(codes, self._settings(settings))
        return (picture, codes) if return_codes else picture

    def chat(self, **settings) -> "Chat":
        """A conversation: `chat.turn(text, image=None, draw=False)` -> (answer, pictures); the history is kept."""
        return Chat(self, self._settings(settings))

    # -- the steps under it -----------------------------------------------------------------------------------
    def codes(self, image) -> list[int]:
        """The 32 codes of `image` (a path, a PIL image, or the codes themselves, checked)."""
        if isinstance(image, (list, tuple)):
            return check_image_codes(list(image), self.image_vocab.n_codes)
        return self.encode_image(image)

    def encode_image(self, image) -> list[int]:
        """Picture (or its path) -> its 32 codes (SEED resizes it to 224 x 224 with CLIP's normalisation)."""
        pixels = self.seed.preprocess(load_image(image))[None]  # (3, S, S) -> (1, 3, S, S)
        with self.running("encode"):
            return self.seed.encode(pixels.to(self.device))[0].tolist()

    def respond(self, request: str, codes: list[int] | None, settings: Settings, force_image: bool = False):
        """One official single-turn exchange, the image before the text as in the scripts: (answer with `<image>`
        where each picture is, the codes of each picture, a note on a broken span or None)."""
        message = ("<image>" if codes is not None else "") + escape(request)
        prompt = self.tokenizer.encode_chat([message], self.template, images=[codes] if codes is not None else [])
        return self.read(self.generate(prompt, settings, force_image=force_image))

    def _picture(self, request: str, codes: list[int] | None, settings: Settings, return_codes: bool):
        text, images, note = self.respond(request, codes, settings, force_image=True)
        if not images:
            raise NoPicture(f"{(note or '(no picture)').strip('()')}; the answer's text: {text.strip()!r}")
        picture = self.draw(images[0], settings, self.negative_codes(settings))
        return (picture, images[0]) if return_codes else picture

    def running(self, phase: str):
        """--low-vram: what `phase` runs (phase_parts) is on the device only for the duration of the block."""
        if not self.low_vram:
            return contextlib.nullcontext()
        return on_device(self.device, *phase_parts(self.seed, self.llm, self.decoder)[phase])

    def generate(self, prompt_ids: list[int], settings: Settings, force_image: bool = False,
                 max_new_tokens: int | None = None, on_token=None) -> list[int]:
        """Sample the LLM's continuation of `prompt_ids` until `</s>` (or `<s>`: the 8B model's generation_config.json
        names id 1 as its eos). `force_image` starts the answer with `<img>`, leaves room for the whole span (32 codes
        + `</img>`) and guides its codes by `settings.llm_guidance`. Without `on_token`, a progress bar (terminals)."""
        max_new_tokens = max_new_tokens or settings.max_new_tokens
        if force_image:
            max_new_tokens = max(max_new_tokens, CODES_PER_IMAGE + 1)
        guidance = settings.llm_guidance if force_image else 1.0
        uncond = self.tokenizer.encode_chat([""], self.template) if guidance != 1.0 else None
        generator = torch.Generator(self.device).manual_seed(settings.seed)
        with self.running("generate"), tqdm(total=max_new_tokens, desc="SEED-LLaMA", unit="token", leave=False,
                                               file=sys.stderr, disable=None if on_token is None else True) as bar:
            ids = self.llm.generate(
                [prompt_ids], do_sample=settings.temperature > 0, temperature=settings.temperature or 1.0,
                top_k=settings.top_k or None, top_p=settings.top_p, max_new_tokens=max_new_tokens,
                stop_ids=(self.tokenizer.eos_id, self.tokenizer.bos_id), constrain_images=settings.constrained,
                force_image=force_image, guidance_scale=guidance, uncond_prompt=uncond, image_vocab=self.image_vocab,
                generator=generator, on_token=on_token or (lambda row, token: bar.update()))[0]
            if self.low_vram:  # the KV cache was made on the device inside the block: it leaves with the weights
                self.llm.free_cache()
        return ids

    def read(self, new_ids: list[int]) -> tuple[str, list[list[int]], str | None]:
        """Generated ids -> (text with `<image>` where each image was, the 32 codes of each image, a note or None);
        the text's own `<image>`-like letters are escaped. A broken image span (not 32 codes, or never closed: an
        unconstrained model can write one) is not drawn: the answer is then its text without the image tokens, and
        the note says why."""
        try:
            texts, images = self.image_vocab.split(new_ids)
        except ValueError as e:
            vocab = self.image_vocab
            text = [i for i in new_ids if not vocab.is_code(i) and i not in (vocab.boi_id, vocab.eoi_id)]
            return (escape(self.tokenizer.decode(text, skip_special_tokens=True)), [],
                    f"(no picture: the model wrote a broken image span: {e}; --constrained prevents that)")
        return "<image>".join(escape(self.tokenizer.decode(t, skip_special_tokens=True)) for t in texts), images, None

    def negative_codes(self, settings: Settings) -> list[int] | None:
        """The codes the LLM draws from `<s><img>` alone when `settings.negative`: the negative image of the official
        evaluation's classifier-free guidance. Sampled once per pipeline (constrained: always a valid span)."""
        if not settings.negative:
            return None
        if self._uncond_codes is None:
            ids = self.generate(self.tokenizer.encode("<s>"), replace(settings, constrained=True, llm_guidance=1.0),
                                force_image=True, max_new_tokens=CODES_PER_IMAGE + 1)
            self._uncond_codes = self.tokenizer.decode_with_images(ids)[1][0]
        return self._uncond_codes

    def draw(self, codes: list[int], settings: Settings, negative: list[int] | None = None) -> Image.Image:
        """32 codes -> image embedding -> unCLIP decoder -> picture (768 x 768 for the official decoder), with a
        progress bar over the UNet calls on a terminal (PNDM makes one more than its steps)."""
        rows = [codes] + ([negative] if negative is not None else [])
        with self.running("embed"):
            embeds = self.seed.embed(torch.tensor(rows, device=self.device))  # (1 or 2, 32) -> (1 or 2, E)
        calls = settings.steps + (settings.sampler == "pndm")
        with self.running("draw"), tqdm(total=calls, desc="unCLIP", unit="step", leave=False, file=sys.stderr,
                                           disable=None) as bar:
            hook = self.decoder.unet.register_forward_hook(lambda *_: bar.update())
            try:
                return self.decoder(embeds[:1], embeds[1:] if negative is not None else None, steps=settings.steps,
                                    guidance_scale=settings.guidance, seed=settings.seed, sampler=settings.sampler)[0]
            finally:
                hook.remove()

def check_one_run(folder: Path) -> None:
    """A train.py folder's seed/, llama/ and decoder/ must come from one run: each config.json records its run id
    (weights.run_record); a folder that mixes runs (a --stages run of other flags into it) is refused."""
    ids = {name: (run_record(folder / name / "config.json") or {}).get("id") for name in ("seed", "llama", "decoder")}
    if len(set(ids.values())) > 1:
        raise ValueError(f"--ckpt {folder} mixes components of different train.py runs: "
                         f"{', '.join(f'{name}/ of run {i}' for name, i in ids.items())}. Train every stage into "
                         f"one folder (train.py --resume, or a new --out).")

def load_official(root: Path, model: str, home: torch.device, device: torch.device, dtype: torch.dtype) -> tuple:
    """The released SEED tokenizer, SEED-LLaMA, its text tokenizer and the unCLIP decoder, fetched under `root`;
    the decoder on `device`, the others on `home`."""
    # Half precision on an accelerator reads the fp16 unCLIP files (half the download); the others are cast as they
    # load. bf16 on the CPU reads the fp32 files, the ones a CPU user has already.
    variant = "fp16" if dtype in HALF_DTYPES and device.type != "cpu" else None
    files = resolve_official(root, model, variant)
    with tqdm(total=3, desc="loading the official weights", unit="model", file=sys.stderr, disable=None) as bar:
        seed = SeedTokenizer.from_official(files.quantizer, files.vit, device=home, dtype=dtype)
        bar.update()
        llm = Llama.from_official(files.llm, device=home, dtype=dtype)
        bar.update()
        decoder = UnCLIPDecoder.from_official(files.unclip, device=device, dtype=dtype, variant=variant)
        bar.update()
    return seed.eval(), llm.eval(), Tokenizer(files.tokenizer), decoder.eval()

def load_run(folder: Path, home: torch.device, device: torch.device, dtype: torch.dtype) -> tuple:
    """What train.py wrote into `folder`: seed/, llama/ (with its tokenizer) and decoder/; the decoder on `device`,
    the others on `home`."""
    missing = [str(folder / name) for name in ("seed", "llama", "decoder") if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"--ckpt {folder}: expected a folder written by train.py with seed/, llama/ and "
                                f"decoder/ (or 'official'); missing: {', '.join(missing)}")
    check_one_run(folder)
    seed = SeedTokenizer.from_pretrained(folder / "seed", device=home, dtype=dtype)
    llm = Llama.from_pretrained(folder / "llama", device=home, dtype=dtype)
    decoder = UnCLIPDecoder.from_pretrained(folder / "decoder", device=device, dtype=dtype)
    return seed.eval(), llm.eval(), Tokenizer(folder / "llama"), decoder.eval()

def phase_parts(seed: SeedTokenizer, llm: Llama, decoder: UnCLIPDecoder) -> dict[str, tuple]:
    """What each phase of the pipeline runs: the parts --low-vram moves to the device for it. The text encoder is
    in none: E("") was computed at load and is all the decoder reads of it."""
    encode = (seed.visual_encoder, seed.ln_vision, seed.qformer, seed.encode_task_layer, seed.quantize)
    embed = (seed.quantize, seed.decode_task_layer, seed.pos_embed_image, seed.blocks_image, seed.image_down,
             seed.distill_image_proj)
    draw = tuple(m for m in (decoder.unet, decoder.vae, decoder.noise_augmentation, decoder.empty_prompt_states)
                 if m is not None)
    return {"encode": encode, "generate": (llm,), "embed": embed, "draw": draw}

def place_low_vram(*models: torch.nn.Module) -> None:
    """--low-vram placement: every weight in pinned host memory (SeedLlama.running moves what a phase needs), and
    the GPU emptied of what loading left there."""
    for m in models:
        pin_to_host(m)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

# ---- The built-in test picture -------------------------------------------------------------------------------------
def test_picture(size: int = 448) -> Image.Image:
    """A house on a meadow under a blue sky with a sun, drawn with PIL: something every task can talk about when no
    `--image` is given (deterministic, no file needed)."""
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    scale = size / 448

    def at(*xy: float) -> list[float]:  # every coordinate below is for 448 px
        return [v * scale for v in xy]

    for y in range(int(300 * scale)):  # sky: lighter towards the horizon
        t = y / (300 * scale)
        draw.line([(0, y), (size, y)], fill=(int(70 + 110 * t), int(130 + 90 * t), 235))
    draw.rectangle([0, 300 * scale, size, size], fill=(70, 160, 60))      # meadow
    draw.ellipse(at(330, 40, 400, 110), fill=(255, 215, 40))              # sun
    draw.rectangle(at(120, 200, 280, 330), fill=(235, 225, 200))          # walls
    draw.polygon(at(100, 205, 200, 120, 300, 205), fill=(190, 50, 40))    # roof
    draw.rectangle(at(180, 260, 220, 330), fill=(110, 70, 40))            # door
    draw.rectangle(at(135, 225, 170, 255), fill=(120, 180, 230))          # windows
    draw.rectangle(at(230, 225, 265, 255), fill=(120, 180, 230))
    return image

# ---- The tasks. Each prints what it did, the 32 codes of every image, and where each picture was saved. ------------
def show_codes(label: str, codes: list[int]) -> None:
    print(f"  {label} codes ({len(codes)}): {' '.join(map(str, codes))}")

VIEW_SIZE = 256  # a smaller picture (train.py's are 32 px) is also saved enlarged to about this size, for viewing

def save(image: Image.Image, out: Path, name: str, settings: Settings, **record) -> None:
    """OUT/name.png and beside it OUT/name.json: what made it (`record`: task, prompt, input, codes) and the settings;
    a small picture also as OUT/name_xK.png, K times larger without smoothing."""
    path = out / f"{name}.png"
    image.save(path)
    write_json(out / f"{name}.json", {"image": path.name, **record, "settings": asdict(settings)})
    print(f"  saved {path} (+ {name}.json)")
    if (k := VIEW_SIZE // max(image.size)) > 1:
        image.resize((image.width * k, image.height * k), Image.NEAREST).save(out / f"{name}_x{k}.png")

def input_image(pipe: SeedLlama, args) -> tuple[Image.Image, str]:
    if args.image is not None:
        return load_image(args.image), args.image
    return pipe.demo or (test_picture(), "the built-in test picture (a house on a meadow, a sun)")

def run_reconstruct(pipe: SeedLlama, args, out: Path) -> None:
    image, name = input_image(pipe, args)
    print(f"[reconstruct] {name} -> 32 codes -> image embedding -> unCLIP decoder")
    codes = pipe.encode_image(image)
    show_codes("input", codes)
    save(pipe.reconstruct(codes), out, "reconstruct", pipe.settings, task="reconstruct", input=name, codes=codes)

def run_on_image(task: str, what: str = "prompt"):
    """caption / vqa / edit: the image first, then the text, as the official scripts ask."""
    def run(pipe: SeedLlama, args, out: Path) -> None:
        image, name = input_image(pipe, args)
        question = args.prompt or pipe.prompts[task]
        print(f"[{task}] {name}; {what}: {question}")
        codes = pipe.encode_image(image)
        show_codes("input", codes)
        if task != "edit":
            print(f"  answer: {pipe.answer(codes, question)}")
            return
        picture, new = pipe.edit(codes, question, return_codes=True)
        show_codes("answer image", new)
        save(picture, out, task, pipe.settings, task=task, prompt=question, input=name, input_codes=codes,
             codes=new, negative_codes=pipe.negative_codes(pipe.settings))
    return run

def run_t2i(pipe: SeedLlama, args, out: Path) -> None:
    request = args.prompt or pipe.prompts["t2i"]
    print(f"[t2i] {request}")
    if pipe.settings.negative:
        show_codes("unconditional (negative)", pipe.negative_codes(pipe.settings))
    picture, codes = pipe.text_to_image(request, return_codes=True)
    show_codes("answer image", codes)
    save(picture, out, "t2i", pipe.settings, task="t2i", prompt=request, codes=codes,
         negative_codes=pipe.negative_codes(pipe.settings))

class TextStream:
    """The LLM's `on_token` callback for the chat: prints the answer's text as it is generated, up to its first
    image. The shown text is the decode of all text ids so far; a piece is printed once it extends what is shown and
    ends on a whole character (byte-fallback pieces of one character arrive one at a time)."""

    def __init__(self, tokenizer, boi_id: int):
        self.tokenizer, self.boi_id = tokenizer, boi_id
        self.ids, self.shown, self.open = [], "", True

    def __call__(self, row: int, token: int) -> None:
        if not self.open or token == self.boi_id:
            self.open = False
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if text.startswith(self.shown) and not text.endswith("\ufffd"):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def finish(self, answer: str) -> None:
        """End the line with whatever the stream did not show (the text after an image, `[image]` marks)."""
        print(answer[len(self.shown):] if answer.startswith(self.shown) else f" | {answer}")

class Chat:
    """A multi-turn conversation as the official demo keeps it: the messages as text with `<image>` placeholders
    and the codes of every image in order, the user's (encoded once) and the model's (kept as generated, never
    re-encoded from pixels). Every turn re-sends the whole history in the official multi-turn template. With `out`
    every picture is saved there; `echo` prints the turn as it happens (the CLI)."""

    def __init__(self, pipe: SeedLlama, settings: Settings, out: Path | None = None, echo: bool = False):
        self.pipe, self.settings, self.out, self.echo = pipe, settings, out, echo
        self.messages, self.images, self.saved = [], [], 0

    def turn(self, text: str, image=None, draw: bool = False) -> tuple[str, list[Image.Image]]:
        """One exchange: the user's text (and picture: a path, PIL image or codes) -> (the answer with `[image]` where
        each picture is, the pictures); `draw` asks for one. The history only changes once the answer is there, so a
        failed turn leaves no trace. Text that looks like an image token is escaped: it stays text."""
        message, new_images = escape(text), []
        if image is not None:  # the official scripts put the image before the text of the turn
            new_images = [self.pipe.codes(image)]
            message = "<image>" + message
            if self.echo:
                show_codes("your image", new_images[0])
        prompt = self.prompt(message, new_images)
        stream = TextStream(self.pipe.tokenizer, self.pipe.image_vocab.boi_id) if self.echo else None
        if stream:
            print("  assistant: ", end="", flush=True)
        answer, images, note = self.pipe.read(self.pipe.generate(prompt, self.settings, force_image=draw,
                                                                 on_token=stream))
        shown = answer.replace("<image>", "[image]").strip()
        if stream:
            stream.finish(shown)
            if note:
                print(f"  {note}")
        pictures = [self.pipe.draw(codes, self.settings, self.pipe.negative_codes(self.settings)) for codes in images]
        for codes, picture in zip(images, pictures):
            self.saved += 1
            if self.echo:
                show_codes("assistant image", codes)
            if self.out is not None:
                save(picture, self.out, f"chat_{self.saved}", self.settings, task="chat", prompt=message,
                     history=self.messages, codes=codes)
        # The answer keeps its `<image>` placeholders and its codes: the next prompt re-inserts the same span.
        self.messages += [message, answer.strip()]
        self.images += new_images + images
        return shown, pictures

    def prompt(self, message: str, new_images: list[list[int]]) -> list[int]:
        """The ids of the history plus `message`; the oldest exchanges are forgotten while the prompt leaves fewer
        than 64 tokens of the context window for the answer (34 of them being one image)."""
        while True:
            ids = self.pipe.tokenizer.encode_chat(self.messages + [message], self.pipe.template,
                                                  images=self.images + new_images)
            if len(ids) + 64 <= self.pipe.llm.config.max_seq_len or not self.messages:
                return ids
            dropped = self.messages[0].count("<image>") + self.messages[1].count("<image>")
            self.messages, self.images = self.messages[2:], self.images[dropped:]
            if self.echo:
                print("  (the oldest exchange was dropped to fit the context window)")

    def reset(self) -> None:
        self.messages, self.images = [], []

    def save(self, path: Path) -> None:
        """The conversation as JSON: the messages (`<image>` where each picture is) and the codes of each picture."""
        write_json(path, {"template": self.pipe.template, "messages": self.messages, "images": self.images,
                          "settings": asdict(self.settings)})

CHAT_HELP = """  /image PATH [text]  attach a picture (quote a PATH that holds spaces) and say something about it
  /draw TEXT          ask for a picture
  /save [FILE]        write the conversation (messages, the codes of every picture) as JSON; default OUT/chat.json
  /reset              forget the conversation
  /help               this list
  /quit               leave (so do Ctrl-D and Ctrl-C at the prompt); anything else is a message to the model"""

def read_line(interactive: bool) -> str | None:
    """The next line of input, or None at its end (Ctrl-D, a closed pipe) and on Ctrl-C at the prompt."""
    try:
        return input("you> " if interactive else "")
    except (EOFError, KeyboardInterrupt):
        if interactive:
            print()
        return None

def chat_command(chat: Chat, line: str, out: Path) -> None:
    """One line of the chat: a command, answered here, or a message for the model."""
    command, _, rest = line.partition(" ")
    if not command.startswith("/"):
        chat.turn(line)
    elif command == "/reset":
        chat.reset()
        print("  (conversation cleared)")
    elif command == "/help":
        print(CHAT_HELP)
    elif command == "/save":
        path = Path(rest.strip()) if rest.strip() else out / "chat.json"
        chat.save(path)
        print(f"  saved {path}")
    elif command == "/image":
        # the path is the first word, or a quoted string when it holds spaces
        quote = rest[:1] if rest[:1] in ("'", '"') else " "
        path, _, text = rest[1:].partition(quote) if quote != " " else rest.partition(" ")
        if not path:
            raise ValueError("usage: /image PATH [text]")
        chat.turn(text.strip(), load_image(path))
    elif command == "/draw" and rest.strip():
        chat.turn(rest, draw=True)
    else:
        print(f"  unknown command {line!r}: /help lists the commands" if command != "/draw" else "  usage: /draw TEXT")

def run_chat(pipe: SeedLlama, args, out: Path) -> None:
    chat = Chat(pipe, pipe.settings, out, echo=True)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (once imported, input() has line editing and an up-arrow history)
    if hasattr(sys.stdin, "reconfigure"):  # a stray byte that is not UTF-8 becomes U+FFFD, not the end of the chat
        sys.stdin.reconfigure(errors="replace")
    print("[chat] type a message; '/image PATH [text]' attaches a picture, '/draw TEXT' asks for one, '/help' lists "
          "the commands, '/quit' leaves.")
    while (line := read_line(interactive)) is not None and line.strip() not in ("/quit", "/exit"):
        if not line.strip():
            continue
        if not interactive:
            print(f"you> {line.strip()}")
        try:
            chat_command(chat, line.strip(), out)
        except KeyboardInterrupt:
            print("\n  (interrupted: this turn is dropped, the conversation is kept)")
        except Exception as e:  # any one bad turn (a path, a picture, a span, memory) ends the turn, never the chat
            print(f"\n  error: {e} (the conversation is kept)")

def run_chat_demo(pipe: SeedLlama, args, out: Path) -> None:
    """`--task all`: a scripted two-turn chat on the input picture; the second turn asks for a new picture, so the
    history ends up holding one image of each origin."""
    image, name = input_image(pipe, args)
    first, second = pipe.prompts["chat"]
    print(f"[chat] two scripted turns on {name}")
    chat = Chat(pipe, pipe.settings, out, echo=True)
    print(f"you> [image] {first}")
    chat.turn(first, image)
    print(f"you> /draw {second}")
    chat.turn(second, draw=True)

RUNNERS = {"reconstruct": run_reconstruct, "caption": run_on_image("caption"), "vqa": run_on_image("vqa"),
           "t2i": run_t2i, "edit": run_on_image("edit", "instruction"), "chat": run_chat, "chat-demo": run_chat_demo}
# ---- The CLI -------------------------------------------------------------------------------------------------------
TASKS = ["reconstruct", "caption", "vqa", "t2i", "edit", "chat"]

def add_machine_flags(p: argparse.ArgumentParser) -> None:
    """Where and how the models run: the device, the dtype, int8 weights, a compiled decode step, --low-vram."""
    p.add_argument("--device", help="cuda, mps or cpu (default: the first available, in that order)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on cuda/mps; "
                   "on cpu bfloat16 where the CPU has it natively (AVX512-BF16), else float32; half precision on a "
                   "GPU also selects the fp16 unCLIP files, half the download")
    p.add_argument("--int8", action="store_true", help="SEED-LLaMA's attention and MLP weights in int8 with "
                   "per-channel scales (llama.quantize_int8): a quarter of the fp32 bytes per token")
    p.add_argument("--compile", action="store_true", help="torch.compile the LLM's decode step (CUDA graphs on "
                   "cuda); the first answer waits for the compilation")
    p.add_argument("--low-vram", action="store_true", help="keep every model in host memory and move only the "
                   "running one to the GPU: SEED-LLaMA 8B in fp16 then fits a 16 GB GPU")

def build_parser() -> argparse.ArgumentParser:
    """Every generation flag is a `Settings` field; given, it overrides the checkpoint's own value."""
    p = argparse.ArgumentParser(
        description="SEED-LLaMA end to end: image -> 32 codes -> LLaMA -> text / 32 codes -> unCLIP -> image.\n"
                    "The generation flags (--seed to --constrained) default to the checkpoint's own values: the\n"
                    f"official ones shown below for --ckpt official, the run's {GENERATION_CONFIG} for a train.py "
                    "folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        epilog="examples:\n"
               "  python sample.py --ckpt official                   # every task on the built-in picture\n"
               "  python sample.py --ckpt official --task vqa --image cat.jpg --prompt 'What is this animal?'\n"
               "  python sample.py --ckpt official --task chat --low-vram\n"
               "  python sample.py --ckpt out/tiny                   # every task on the run's own demo picture\n"
               "  python sample.py --ckpt out/tiny --task t2i --prompt 'draw a large red circle on the left.'\n"
               "chat commands:\n" + CHAT_HELP + "\n"
               "environment: HF_ENDPOINT (hub mirror), SEED_EVA_VIT_URL, HF_HUB_OFFLINE=1, SEED_CACHE, XDG_CACHE_HOME.")
    p.add_argument("--ckpt", required=True, help="'official' for the released weights (downloaded once into the "
                   "cache), or a folder written by train.py holding seed/, llama/ and decoder/")
    p.add_argument("--task", default="all", choices=["all"] + TASKS,
                   help="default: all = reconstruct, caption, vqa, t2i, edit and a scripted two-turn chat, one after "
                        "the other; 'chat' alone reads turns from the terminal")
    p.add_argument("--image", help="input picture for reconstruct/caption/vqa/edit (default: a built-in test picture, "
                                   "or the train.py run's demo picture)")
    p.add_argument("--prompt", help="request (caption, t2i), question (vqa) or instruction (edit); each has a default")
    p.add_argument("--model", default="8b", choices=sorted(LLM_REPOS),
                   help="the SEED-LLaMA of --ckpt official: 8b (Vicuna template) or 14b (LLaMA-2 chat)")
    p.add_argument("--weights", help="folder of the official files laid out as on the hub (missing files are "
                                     "downloaded into it); default: $SEED_CACHE or ~/.cache/seed-from-scratch")
    add_machine_flags(p)
    s = Settings()

    def setting(flag: str, help: str, **kw) -> None:
        p.add_argument(flag, default=None, help=f"{help} (default {getattr(s, kw.get('dest', flag[2:]))})", **kw)

    setting("--seed", "same seed, same outputs", type=int)
    # The LLM's decoding, then the decoder's drawing.
    setting("--temperature", "0 = greedy", type=float)
    setting("--top-p", "nucleus sampling mass", type=float, dest="top_p")
    setting("--top-k", "0 = all tokens", type=int, dest="top_k")
    setting("--max-new-tokens", "longest answer in tokens, capped by the context window, raised to 33 when an image "
            "is requested so that its span fits", type=int, dest="max_new_tokens")
    setting("--llm-cfg", "classifier-free guidance of the LLM on the image codes of t2i, edit and chat /draw, "
            "against the chat template around an empty request; 1 = off, as officially", type=float,
            metavar="SCALE", dest="llm_guidance")
    setting("--steps", "unCLIP denoising steps; PNDM makes one UNet call more", type=int)
    setting("--sampler", "the unCLIP decoder's sampler: pndm (the official scheduler) or ddim",
            choices=sorted(SAMPLERS))
    setting("--guidance", "the unCLIP decoder's classifier-free guidance scale", type=float)
    p.add_argument("--negative", choices=["uncond", "none"], help="negative image of generated images: 'uncond' = the "
                   "codes the LLM samples from '<s><img>' alone (as the official evaluation), 'none' = a zero label "
                   "(default uncond; reconstructions always use none)")
    p.add_argument("--constrained", action="store_const", const=True, help="after <img>, only image codes for 32 "
                   "tokens, then </img>: every image span is valid (the official code samples freely)")
    p.add_argument("--out", default="samples", help="folder for the pictures, each with a JSON of what made it "
                                                   "(default ./samples)")
    return p

def settings_given(args) -> dict:
    """The Settings fields whose flag was given (the rest stay the checkpoint's own)."""
    given = {f.name: getattr(args, f.name) for f in fields(Settings)
             if f.name != "negative" and getattr(args, f.name) is not None}
    if args.negative is not None:
        given["negative"] = args.negative == "uncond"
    return given

def check_arguments(args) -> None:
    """Bad arguments fail here, before minutes of loading."""
    pick_device(args.device)  # an absent device is named, with the ones present
    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"--image {args.image}: no such file")
    if args.task == "chat" and args.image is not None:
        raise ValueError("--image does not apply to --task chat: attach pictures with '/image PATH' in the chat")
    if args.image is not None:
        load_image(args.image)  # an unreadable picture or a decompression bomb, named now
    check_settings(replace(Settings(), **settings_given(args)))
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {args.out}: cannot create the folder ({e.strerror}); choose another") from None

def main(argv: list[str] | None = None) -> int:
    """Every error a user can cause (a file, an argument, a download) is one line on stderr: exit 2 for arguments,
    1 for the rest (a task whose answer held no picture too)."""
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dtype is None and pick_device(args.device).type == "cpu":  # say which, as bf16 changes the numbers
        bf16 = inference_dtype(torch.device("cpu")) == torch.bfloat16
        print(f"dtype: {'bfloat16' if bf16 else 'float32'} (this CPU {'has' if bf16 else 'lacks'} native bf16; "
              f"--dtype to choose)")
    tasks = [t for t in TASKS if t != "chat"] + ["chat-demo"] if args.task == "all" else [args.task]
    out, failed = Path(args.out), 0
    try:
        pipe = SeedLlama.from_pretrained(args.ckpt, args.device, getattr(torch, args.dtype) if args.dtype else None,
                                         model=args.model, weights=args.weights, low_vram=args.low_vram)
        if args.int8:
            quantize_int8(pipe.llm)
        if args.compile:
            pipe.llm.compile_decode()
        pipe.settings = check_settings(replace(pipe.settings, **settings_given(args)))
        torch.manual_seed(pipe.settings.seed)
        for task in tasks:
            try:
                RUNNERS[task](pipe, args, out)
            except NoPicture as e:  # the other tasks still run
                print(f"  {e}")
                failed += 1
    except (DownloadError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1 if failed else 0

# ---- The official files, laid out as on the hub (https://huggingface.co/<repo>/resolve/main/<file>) ----------------
TOKENIZER_REPO = "AILab-CVC/seed-tokenizer-2"
TOKENIZER_FILES = ["seed_quantizer.pt", "tokenizer.model", "added_tokens.json", "special_tokens_map.json",
                   "tokenizer_config.json"]
# LAVIS hosts the EVA ViT-g that SEED's quantizer reads its `visual_encoder` from; it is not on the hub, so it gets a
# fixed place in the cache (`BLIP2/eva_vit_g.pth`, beside the hub repos) and its own URL override.
EVA_VIT_PATH = "BLIP2/eva_vit_g.pth"
EVA_VIT_URL = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth"
LLM_REPOS = {"8b": "AILab-CVC/seed-llama-8b-sft", "14b": "AILab-CVC/seed-llama-14b-sft"}
LLM_FILES = ["config.json", "generation_config.json"]
# The SEED-LLaMA repos ship sharded pickles; the safetensors index is accepted too (mirrors, converted copies).
LLM_INDEX_FILES = ["pytorch_model.bin.index.json", "model.safetensors.index.json"]
UNCLIP_REPO = "stabilityai/stable-diffusion-2-1-unclip"
# SEED passes image embeddings straight to the pipeline, so `image_encoder/` and `feature_extractor/` (2.5 GB of
# OpenCLIP ViT-H) are never run and never downloaded. The weights: `resolve_official`, from unet.OFFICIAL_COMPONENTS.
UNCLIP_FILES = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
                "tokenizer/tokenizer_config.json", "image_normalizer/config.json", "scheduler/scheduler_config.json",
                "image_noising_scheduler/scheduler_config.json"]

# (size, sha256) of two files as their Git LFS pointers publish them (seed_quantizer.pt: hf:AILab-CVC/SEED
# seed_tokenizer/ @ b611080; tokenizer.model: the stock LLaMA SentencePiece model). From the official hub the hash
# always applies; from a mirror (HF_ENDPOINT) at exactly that size, the mirror's own sha256 ETag guarding the rest (a
# mirror may serve other copies under these names: the tests' reduced release).
KNOWN_FILES = {
    f"{TOKENIZER_REPO}/seed_quantizer.pt":
        (1_228_836_570, "322a9fba55cb0e97e1a633981fbbdff20577af69146a0f23fa7b14201459a13f"),
    f"{TOKENIZER_REPO}/tokenizer.model":
        (499_723, "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"),
}
OFFICIAL_ENDPOINT = "https://huggingface.co"
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".model")  # never cached without a hash that matched
TIMEOUT_S = 30  # to connect, and for each read of the socket
STALL = (1 << 16, 60)  # (bytes, seconds): a server that sends less in that time is given up on (a trickle of one
#                        byte every 20 s never trips a socket time-out)

class DownloadError(RuntimeError):
    """A weight file could not be fetched or verified; the message names it, says why and what to do."""

def weights_root(weights: str | None = None) -> Path:
    """Where the official files live: `--weights DIR`, else $SEED_CACHE, else the XDG cache folder."""
    if weights or os.environ.get("SEED_CACHE"):
        return Path(weights or os.environ["SEED_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seed-from-scratch"

def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")

def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or OFFICIAL_ENDPOINT).rstrip("/")

def hub_url(rel: str, revision: str = "main") -> str:
    """The URL of a file given by its path in the layout (`owner/repo/file`) at `revision`; EVA has its own."""
    if rel == EVA_VIT_PATH:
        return os.environ.get("SEED_EVA_VIT_URL") or EVA_VIT_URL
    owner, name, file = rel.split("/", 2)
    return f"{endpoint()}/{owner}/{name}/resolve/{revision}/{file}"

# ---- Revisions: a repository is read at one commit -----------------------------------------------------------------
# The first answer of the hub names the repository's commit (X-Repo-Commit); it is kept in ROOT/owner/repo/.revision
# and every later file of that repository is fetched at that commit, so a repository updated on the hub between two
# files (or two runs) is never mixed. A user's HF cache is read at the same commit, else at its `refs/main`.
def pinned(root: Path, repo: str) -> str:
    path = root / repo / ".revision"
    return path.read_text().strip() if path.is_file() else "main"

def pin(root: Path, repo: str, headers: dict) -> None:
    commit = headers.get("x-repo-commit", "")
    if re.fullmatch(r"[0-9a-f]{40}", commit) and pinned(root, repo) == "main":
        atomic_write(root / repo / ".revision", lambda p: p.write_text(commit + "\n"))

def _repo(rel: str) -> str:
    return "/".join(rel.split("/")[:2])

# ---- Weights the user already has: the Hugging Face hub cache and the torch hub cache (read only) ------------------
def hub_caches() -> list[Path]:
    """The Hugging Face hub caches, as huggingface_hub finds them: HF_HUB_CACHE, HF_HOME/hub, the XDG cache."""
    env, home = os.environ, Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    found = [env.get("HF_HUB_CACHE"), env.get("HF_HOME") and Path(env["HF_HOME"]) / "hub", home / "huggingface/hub"]
    return list(dict.fromkeys(Path(p).expanduser() for p in found if p))

def cached_snapshot(root: Path, repo: str, files: list[str], sharded: str | None = None) -> Path | None:
    """The snapshot folder `models--OWNER--NAME/snapshots/REV` of a hub cache that holds every file of `files` (and,
    with `sharded`, that index and its shards), each passing `check_content`; REV = our pin, else its refs/main."""
    for cache in hub_caches():
        folder = cache / f"models--{repo.replace('/', '--')}"
        ref = folder / "refs" / "main"
        revision = pinned(root, repo) if pinned(root, repo) != "main" else \
            ref.read_text().strip() if ref.is_file() else None
        if not revision or not re.fullmatch(r"[0-9a-f]{40}", revision):
            continue
        snapshot = folder / "snapshots" / revision
        try:
            wanted = [inside(snapshot, f, str(snapshot)) for f in files]
            if sharded and (snapshot / sharded).is_file():
                wanted += [inside(snapshot, s, str(snapshot / sharded)) for s in index_shards(snapshot / sharded)]
            elif sharded:
                continue
        except ValueError:
            continue
        known = [KNOWN_FILES.get(f"{repo}/{p.relative_to(snapshot)}") for p in wanted]
        # An LFS file of the cache is a link to blobs/<its sha256>: the published hash is checked by that name.
        if all(p.is_file() and check_content(p) is None and (k is None or p.stat().st_size != k[0] or
                                                             p.resolve().name == k[1])
               for p, k in zip(wanted, known)):
            return snapshot
    return None

def cached_vit() -> Path | None:
    """eva_vit_g.pth where LAVIS puts it: $TORCH_HOME/hub/checkpoints (default: the XDG cache's torch/)."""
    home = os.environ.get("TORCH_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch"
    path = Path(home).expanduser() / "hub" / "checkpoints" / Path(EVA_VIT_PATH).name
    return path if path.is_file() and check_content(path) is None else None

# ---- Checking what arrived: the file's own format (an HTML error page served with status 200 is not a file) --------
def check_content(path: Path, suffix: str | None = None) -> str | None:
    """Why `path` is not the file its name (or `suffix`) says (None when it is): JSON parses, a safetensors header and
    size agree, a torch file is a whole zip archive or a pickle, a SentencePiece model starts as a protobuf, no file
    is HTML."""
    suffix = suffix or path.suffix
    with open(path, "rb") as f:
        head = f.read(1 << 10)
    if head.lstrip()[:1] == b"<":
        return "an HTML page, not the file (a login page, a proxy or an error page?)"
    if suffix == ".json":
        try:
            return None if isinstance(json.loads(path.read_text(encoding="utf-8")), dict) else "not a JSON object"
        except (ValueError, UnicodeDecodeError) as e:
            return f"not valid JSON ({e})"
    if suffix == ".safetensors":
        try:
            n = int.from_bytes(head[:8], "little")
            with open(path, "rb") as f:
                f.seek(8)
                header = json.loads(f.read(n)) if 0 < n < 1 << 27 else None
            end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
            return None if 8 + n + end == path.stat().st_size else "a truncated safetensors file"
        except (ValueError, TypeError, KeyError, AttributeError, IndexError):
            return "not a safetensors file"
    if suffix in (".bin", ".pt", ".pth"):
        whole = zipfile.is_zipfile(path) if head[:4] == b"PK\x03\x04" else head[:1] == b"\x80"
        return None if whole else "not a whole torch checkpoint (a zip archive or a pickle)"
    if suffix == ".model" and head[:1] != b"\x0a":
        return "not a SentencePiece model"
    return None

# ---- Downloading one file: locked, resumable, verified, atomic ------------------------------------------------------
class _KeepLinkedHeaders(urllib.request.HTTPRedirectHandler):
    """The hub answers a large (LFS) file with a redirect to its CDN; the redirect, not the final answer, carries the
    file's sha256 (`X-Linked-Etag`), size (`X-Linked-Size`) and the commit. urllib drops redirect headers, so keep
    them; and the token goes to the hub only, never to the host it redirects to."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        linked = getattr(req, "linked", None)  # one dict shared by every request of the chain (see _open_resuming)
        if new is not None and linked is not None:
            linked.update({k.lower(): v for k, v in headers.items()
                           if k.lower().startswith("x-linked-") or k.lower() == "x-repo-commit"})
            new.linked = linked
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new

_OPENER = urllib.request.build_opener(_KeepLinkedHeaders())

def _request(url: str, method: str = "GET") -> urllib.request.Request:
    """A request with HF_TOKEN (when set) for the hub's own host: gated or private repositories, rate limits."""
    req = urllib.request.Request(url, headers={"User-Agent": "seed-from-scratch"}, method=method)
    token = os.environ.get("HF_TOKEN", "").strip()
    if token and url.startswith(endpoint() + "/"):
        req.add_header("Authorization", f"Bearer {token}")
    req.linked = {}  # filled by _KeepLinkedHeaders if the server redirects
    return req

def _sha256_header(headers: dict) -> str | None:
    """The sha256 the server vouches for, if any: the hub sends it as the (quoted) ETag of LFS files. A 40-hex ETag is
    a git blob id and a CDN ETag is an md5, so only a 64-hex value counts."""
    for key in ("x-linked-etag", "etag"):
        value = (headers.get(key) or "").strip().removeprefix("W/").strip('"').lower()
        if re.fullmatch(r"[0-9a-f]{64}", value):
            return value
    return None

def _md5_header(headers: dict) -> str | None:
    """Google Cloud Storage (where LAVIS keeps eva_vit_g.pth) vouches for an object by `x-goog-hash: md5=<base64>`."""
    m = re.search(r"md5=([A-Za-z0-9+/=]+)", headers.get("x-goog-hash", ""))
    return base64.b64decode(m.group(1)).hex() if m else None

def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()

def download(url: str, dest: Path, known: tuple[int, str] | None = None, retries: int = 3,
             seen: dict | None = None) -> Path:
    """Fetch `url` to `dest`: one process at a time (a lock beside it), resumable (HTTP Range + If-Range into
    `dest.incomplete`, which only the lock holder touches), then size, hash and format checked before the atomic
    rename. A dropped or stalled connection is retried `retries` times, each resuming where the last one stopped.
    A file that fails a check is moved to `dest.corrupt`, never used. `seen` receives the answer's headers."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock_path = dest.with_name(f".{dest.name}.lock")
    try:
        held = lock(lock_path, wait=False)
    except BlockingIOError:
        print(f"waiting for another process that is downloading {dest}", file=sys.stderr)
        held = lock(lock_path, wait=True)
        if dest.is_file():
            held.close()
            return dest
    with contextlib.closing(held):
        part = dest.with_name(dest.name + ".incomplete")
        for attempt in range(retries + 1):
            retry = attempt < retries
            opened = _open_resuming(url, dest, part, attempt, retry)
            if opened is None or not _receive(opened, dest, part, retry):
                continue
            _, total, _, headers = opened
            if total is not None and part.stat().st_size < total:  # the connection ended early without an error
                if retry:
                    continue
                raise DownloadError(f"{url}: the transfer stopped at {part.stat().st_size} of {total} bytes "
                                    f"{retries + 1} times; run again to resume from {part}.")
            _verify(url, dest, part, total, headers, known)
            if seen is not None:
                seen.update(headers)
            return dest
    raise DownloadError(f"{url}: gave up after {retries + 1} attempts; run again to resume from {part}.")

def _verify(url: str, dest: Path, part: Path, total: int | None, headers: dict, known) -> None:
    """Size, then the hash (the published one, else the server's sha256 ETag, else its md5; a weight file must have
    one), then the format; the file is renamed to `dest` only when all pass, else moved to `dest.corrupt`."""
    size = part.stat().st_size
    if known is not None and (size == known[0] or endpoint() == OFFICIAL_ENDPOINT):
        expected = ("sha256", known[1])
    elif _sha256_header(headers):
        expected = ("sha256", _sha256_header(headers))
    else:
        expected = ("md5", _md5_header(headers))
    problem = f"size {size} instead of {total}" if total is not None and size != total else None
    if problem is None and expected[1] is None and dest.suffix in WEIGHT_SUFFIXES:
        if url.startswith(endpoint() + "/"):  # the hub sends the sha256 of every LFS file: its absence is a fault
            problem = "no SHA-256 to check it against (neither published nor sent by the server)"
        else:  # LAVIS's bucket publishes no sha256 for eva_vit_g.pth, and may send no md5 (a composite object)
            print(f"note: {url} comes with no hash; only its size and format are checked", file=sys.stderr)
    if problem is None and expected[1] and _digest(part, expected[0]) != expected[1]:
        problem = f"{expected[0].upper().replace('SHA256', 'SHA-256')} differs from the expected {expected[1]}"
    if problem is None and (reason := check_content(part, dest.suffix)) is not None:
        problem = reason
    _validator(part).unlink(missing_ok=True)
    if problem is not None:
        corrupt = dest.with_name(dest.name + ".corrupt")
        os.replace(part, corrupt)
        raise DownloadError(f"{url} arrived corrupt ({problem}). It was moved to {corrupt} and will not be used; "
                            f"run again to download it afresh, or put the right file at {dest} yourself.")
    os.replace(part, dest)

def _validator(part: Path) -> Path:
    """Where the ETag (or Last-Modified) of the version being fetched is kept, for If-Range on a resume."""
    return part.with_name(part.name + ".etag")

def _open_resuming(url: str, dest: Path, part: Path, attempt: int, retry: bool):
    """(response, total size or None, offset the body starts at, headers) of `url` from the end of `part` on; None to
    retry (a whole or longer `part` is deleted, an unreachable server gets a growing pause), DownloadError: hopeless.
    A resume sends If-Range with the version's validator: a file changed since answers whole, never stitched."""
    offset = part.stat().st_size if part.exists() else 0
    req = _request(url)
    if offset:
        req.add_header("Range", f"bytes={offset}-")
        if _validator(part).is_file():
            req.add_header("If-Range", _validator(part).read_text().strip())
    try:
        resp = _OPENER.open(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the partial file is already whole (or longer): start over
            part.unlink()
            return None
        if e.code == 404:
            raise DownloadError(f"{url} does not exist (HTTP 404). Check the name, the mirror in HF_ENDPOINT or "
                                f"SEED_EVA_VIT_URL, or put the file at {dest} yourself.") from None
        hint = " (a gated repository? accept its terms on the hub and set HF_TOKEN)" if e.code in (401, 403) else ""
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        if retry:
            time.sleep(min(2 ** attempt, 10))
            return None
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot reach {url}: {reason} (time-out {TIMEOUT_S} s). Check the network, set "
                            f"HF_ENDPOINT to a mirror, or copy the files into {dest.parent} and set "
                            f"HF_HUB_OFFLINE=1.") from None
    headers = {**req.linked, **{k.lower(): v for k, v in resp.headers.items()}}
    if "text/html" in headers.get("content-type", "") and dest.suffix != ".html":
        resp.close()
        raise DownloadError(f"{url} answered with an HTML page instead of the file (a login page, a proxy or an "
                            f"error page?); nothing was cached. Check HF_ENDPOINT / SEED_EVA_VIT_URL and HF_TOKEN.")
    return resp, *_body_range(url, resp, headers, offset, part), headers

def _body_range(url: str, resp, headers: dict, offset: int, part: Path) -> tuple[int | None, int]:
    """(total size or None, offset the body starts at) of an answer; a whole answer (200) restarts the file."""
    if resp.status == 206:  # Content-Range: bytes START-END/TOTAL
        m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", headers.get("content-range", ""))
        if not m or int(m.group(1)) != offset:
            resp.close()
            raise DownloadError(f"{url}: the server answered the range request with a bad Content-Range "
                                f"{headers.get('content-range')!r}")
        total = int(m.group(2)) if m.group(2) != "*" else None
    else:  # 200: the server ignored the range or the file changed (If-Range): the body is the whole file
        offset = 0
        total = int(headers["content-length"]) if "content-length" in headers else None
        validator = headers.get("etag", "") if not headers.get("etag", "").startswith("W/") else ""
        if validator or headers.get("last-modified"):
            atomic_write(_validator(part), lambda p: p.write_text(validator or headers["last-modified"]))
    if total is None and "x-linked-size" in headers:
        total = int(headers["x-linked-size"])
    return total, offset

def _receive(opened, dest: Path, part: Path, retry: bool) -> bool:
    """Append the body of an open response to `part` (after checking the disk can hold the rest); False when the
    connection broke or stalled (less than STALL[0] bytes in STALL[1] s) and the attempt should be made again."""
    resp, total, offset, _ = opened
    with resp:
        if total is not None:
            _check_space(dest.parent, total - offset, dest.name)
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                   leave=False, file=sys.stderr, mininterval=0.5, disable=None)  # None: only on a terminal
        try:
            with open(part, "ab" if offset else "wb") as f, bar:
                window, since = 0, time.monotonic()
                while chunk := resp.read1(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
                    window += len(chunk)
                    if window >= STALL[0]:
                        window, since = 0, time.monotonic()
                    elif time.monotonic() - since > STALL[1]:
                        raise TimeoutError(f"less than {STALL[0]} bytes in {STALL[1]} s")
        except (OSError, http.client.IncompleteRead) as e:
            if getattr(e, "errno", None) == errno.ENOSPC:
                raise DownloadError(f"the disk is full while writing {part}. Free some space and run again: "
                                    f"the download resumes where it stopped.") from None
            if isinstance(e, (ConnectionError, TimeoutError, http.client.IncompleteRead)):
                if retry:
                    return False
                raise DownloadError(f"{resp.url}: the connection broke or stalled ({e}; time-outs: {TIMEOUT_S} s "
                                    f"per read, {STALL[0]} bytes per {STALL[1]} s). Run again to resume from {part}, "
                                    f"or set HF_ENDPOINT to a faster mirror.") from None
            raise
    return True

def _check_space(folder: Path, need: int, what: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DownloadError(f"not enough disk space for {what}: it needs {_gb(need)} more, {folder} has "
                            f"{_gb(free)} free. Free some space, or choose another folder with --weights or "
                            f"SEED_CACHE.")

def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n} B"

def _remote_size(url: str) -> int:
    """The size a HEAD request announces (the hub's X-Linked-Size for LFS files), 0 when the server says none."""
    req = _request(url, method="HEAD")
    try:
        with _OPENER.open(req, timeout=TIMEOUT_S) as resp:
            headers = {**req.linked, **{k.lower(): v for k, v in resp.headers.items()}}
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        return 0
    return int(headers.get("x-linked-size") or headers.get("content-length") or 0)

# ---- Fetching the release -----------------------------------------------------------------------------------------
def fetch_files(root: Path, rels: list[str]) -> None:
    """Make sure every file of `rels` (paths in the hub layout) is under `root`: a cached file that fails
    `check_content` is moved aside as `.corrupt` (and named); the missing ones are downloaded, the free disk space
    for all of them checked first."""
    missing = []
    for rel in rels:
        path = root / rel
        if path.is_file() and (reason := check_content(path)) is not None:
            os.replace(path, path.with_name(path.name + ".corrupt"))
            print(f"{path} is {reason}: moved aside to {path.name}.corrupt", file=sys.stderr)
        if not path.is_file():
            missing.append(rel)
    if missing and offline():
        raise DownloadError("HF_HUB_OFFLINE=1 and these files are missing under " + str(root) + ":\n  " +
                            "\n  ".join(missing))
    urls = {rel: hub_url(rel, pinned(root, _repo(rel))) for rel in missing}
    if len(missing) > 1:  # the whole download must fit before the first byte of it is written
        partial = sum((root / f"{rel}.incomplete").stat().st_size for rel in missing
                      if (root / f"{rel}.incomplete").is_file())
        need = sum(_remote_size(urls[rel]) for rel in missing) - partial
        print(f"downloading {len(missing)} files ({_gb(max(need, 0))}) into {root}", file=sys.stderr)
        _check_space(root, need, f"the {len(missing)} missing files")
    for rel in missing:
        print(f"downloading {rel}", file=sys.stderr)
        seen: dict = {}
        download(urls[rel], root / rel, known=KNOWN_FILES.get(rel), seen=seen)
        if rel != EVA_VIT_PATH:
            pin(root, _repo(rel), seen)

@dataclass
class OfficialFiles:
    """Where each part of the official release is, once `resolve_official` has made sure it is there."""
    quantizer: Path   # seed_quantizer.pt
    vit: Path         # eva_vit_g.pth
    tokenizer: Path   # the folder with tokenizer.model and the added-token files
    llm: Path         # the SEED-LLaMA folder (config.json, index, shards)
    unclip: Path      # the stable-diffusion-2-1-unclip folder

def resolve_official(root: Path, model: str = "8b", variant: str | None = None) -> OfficialFiles:
    """Make sure the official files for `model` are there and say where: a repository whose every file is in a
    Hugging Face hub cache (and the ViT in the torch hub cache) is read there, in place; the rest is downloaded
    under `root` (about 33 GB for the 8B model; the exact total is printed first). `variant="fp16"` picks the
    half-size unCLIP weights, what a fp16/bf16 run on a GPU loads."""
    if model not in LLM_REPOS:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(LLM_REPOS)}")
    llm, suffix = LLM_REPOS[model], f".{variant}" if variant else ""
    repos = {TOKENIZER_REPO: TOKENIZER_FILES, llm: LLM_FILES, UNCLIP_REPO: UNCLIP_FILES + [
        f"{c}/{stems[0]}{suffix}.safetensors" for c, stems in OFFICIAL_COMPONENTS.items()]}
    where = {repo: cached_snapshot(root, repo, files, LLM_INDEX_FILES[0] if repo == llm else None)
             for repo, files in repos.items()}
    vit = cached_vit() or root / EVA_VIT_PATH
    fixed = [f"{repo}/{f}" for repo, files in repos.items() if where[repo] is None for f in files] + \
        ([EVA_VIT_PATH] if vit == root / EVA_VIT_PATH else [])
    shards = []
    if where[llm] is None:
        # The shard list is in the index; find an index that is already here, else fetch the official one. Its
        # entries are names from a server: each must stay inside the repository's folder.
        index = next((f"{llm}/{f}" for f in LLM_INDEX_FILES if (root / llm / f).is_file()),
                     f"{llm}/{LLM_INDEX_FILES[0]}")
        if not offline():
            fetch_files(root, [index])
        if (root / index).is_file():
            shards = [str(inside(root / llm, name, str(root / index)).relative_to(root))
                      for name in index_shards(root / index)]
        fixed.append(index)
    fetch_files(root, fixed + shards)
    folder = {repo: where[repo] or root / repo for repo in repos}
    return OfficialFiles(quantizer=folder[TOKENIZER_REPO] / "seed_quantizer.pt", vit=vit,
                         tokenizer=folder[TOKENIZER_REPO], llm=folder[llm], unclip=folder[UNCLIP_REPO])

if __name__ == "__main__":
    sys.exit(main())
