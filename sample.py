"""sample.py: SEED-LLaMA end to end, from pixels to codes to words and back to pixels (examples: --help).

What runs (paper: "Making LLaMA SEE and Draw with SEED Tokenizer", arXiv:2310.01218):
  image --SeedTokenizer.encode--> 32 codes --Llama--> text and/or 32 new codes --SeedTokenizer.embed--> 1024-d
  image embedding --UnCLIPDecoder--> image.
The prompts are the official templates (AILab-CVC/SEED @ 93b3cf4 scripts/seed_llama_inference_8B.py / _14B.py,
and gradio_demo/conversation.py for multi-turn chat); an image enters a prompt as `<img>` + 32 codes + `</img>`.
`--ckpt official` fetches the released files (urllib only) into a cache laid out as on the Hugging Face hub;
`--ckpt PATH` reads train.py's `PATH/seed/`, `PATH/llama/` and `PATH/decoder/`. Every task works with either.

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
import contextlib
import errno
import hashlib
import http.client
import os
import re
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from llama import GenerationConfig, Llama, quantize_int8
from tokenizer import CODES_PER_IMAGE, Tokenizer
from seed import SeedTokenizer, load_image
from unet import OFFICIAL_COMPONENTS, SAMPLERS, UnCLIPDecoder
from weights import index_shards, inference_dtype, on_device, pick_device, pin_to_host

# ---- The pipeline: SEED tokenizer + SEED-LLaMA + unCLIP decoder behind four calls ----------------------------------
@dataclass
class Settings:
    """How to generate; the CLI's defaults are these fields (the LLM's: llama.GenerationConfig's official values)."""
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

class SeedLlama:
    """The SEED tokenizer, SEED-LLaMA with its text tokenizer and the unCLIP decoder. With `low_vram` every model
    stays in pinned host memory and `running(phase)` puts only what that phase runs on the device, for the phase."""

    def __init__(self, seed, llm, tokenizer, decoder, device: torch.device, low_vram: bool = False,
                 template: str = "8B"):
        self.seed, self.llm, self.tokenizer, self.decoder = seed, llm, tokenizer, decoder
        self.device, self.low_vram, self.template = device, low_vram, template
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

    def running(self, phase: str):
        """--low-vram: what `phase` runs (phase_parts) is on the device only for the duration of the block."""
        if not self.low_vram:
            return contextlib.nullcontext()
        return on_device(self.device, *phase_parts(self.seed, self.llm, self.decoder)[phase])

    def encode_image(self, image: Image.Image) -> list[int]:
        """Picture -> its 32 codes (SEED resizes it to 224 x 224 with CLIP's normalisation)."""
        pixels = self.seed.preprocess(image)[None]  # (3, S, S) -> (1, 3, S, S)
        with self.running("encode"):
            return self.seed.encode(pixels.to(self.device))[0].tolist()

    def generate(self, prompt_ids: list[int], settings: Settings, force_image: bool = False,
                 max_new_tokens: int | None = None, on_token=None) -> list[int]:
        """Sample the LLM's continuation of `prompt_ids` until `</s>` (or `<s>`: the 8B model's generation_config.json
        names id 1 as its eos). `force_image` starts the answer with `<img>`, leaves room for the whole span (32 codes
        + `</img>`) and guides its codes by `settings.llm_guidance`."""
        max_new_tokens = max_new_tokens or settings.max_new_tokens
        if force_image:
            max_new_tokens = max(max_new_tokens, CODES_PER_IMAGE + 1)
        guidance = settings.llm_guidance if force_image else 1.0
        uncond = self.tokenizer.encode_chat([""], self.template) if guidance != 1.0 else None
        generator = torch.Generator(self.device).manual_seed(settings.seed)
        with self.running("generate"):
            ids = self.llm.generate(
                [prompt_ids], do_sample=settings.temperature > 0, temperature=settings.temperature or 1.0,
                top_k=settings.top_k or None, top_p=settings.top_p, max_new_tokens=max_new_tokens,
                stop_ids=(self.tokenizer.eos_id, self.tokenizer.bos_id), constrain_images=settings.constrained,
                force_image=force_image, guidance_scale=guidance, uncond_prompt=uncond, image_vocab=self.image_vocab,
                generator=generator, on_token=on_token)[0]
            if self.low_vram:  # the KV cache was made on the device inside the block: it leaves with the weights
                self.llm.free_cache()
        return ids

    def read(self, new_ids: list[int]) -> tuple[str, list[list[int]], str | None]:
        """Generated ids -> (text with `<image>` where each image was, the 32 codes of each image, a note or None).
        A broken image span (not 32 codes, or never closed: an unconstrained model can write one) is not drawn: the
        answer is then the raw decoded text, and the note says why."""
        try:
            return *self.tokenizer.decode_with_images(new_ids), None
        except ValueError as e:
            return (self.tokenizer.decode(new_ids, skip_special_tokens=True), [],
                    f"(no picture: the model wrote a broken image span: {e}; --constrained prevents that)")

    def unconditional_codes(self, settings: Settings) -> list[int]:
        """The codes the LLM draws from `<s><img>` alone: the negative image of the official evaluation's
        classifier-free guidance. Sampled once per run (constrained, so it is always a valid span)."""
        if self._uncond_codes is None:
            ids = self.generate(self.tokenizer.encode("<s>"), replace(settings, constrained=True, llm_guidance=1.0),
                                force_image=True, max_new_tokens=CODES_PER_IMAGE + 1)
            self._uncond_codes = self.tokenizer.decode_with_images(ids)[1][0]
        return self._uncond_codes

    def draw(self, codes: list[int], settings: Settings, negative: list[int] | None = None) -> Image.Image:
        """32 codes -> image embedding -> unCLIP decoder -> picture (768 x 768 for the official decoder)."""
        rows = [codes] + ([negative] if negative is not None else [])
        with self.running("embed"):
            embeds = self.seed.embed(torch.tensor(rows, device=self.device))  # (1 or 2, 32) -> (1 or 2, E)
        with self.running("draw"):
            return self.decoder(embeds[:1], embeds[1:] if negative is not None else None, steps=settings.steps,
                                guidance_scale=settings.guidance, seed=settings.seed, sampler=settings.sampler)[0]

def load_pipeline(ckpt: str, device: torch.device, dtype: torch.dtype, model: str = "8b", weights: str | None = None,
                  low_vram: bool = False) -> SeedLlama:
    """`ckpt` = "official" (the released weights, fetched into the cache) or a folder written by train.py."""
    # --low-vram: the weights live in host memory; the decoder loads on the device so that its text encoder runs
    # E("") there once, then joins the others (place_low_vram)
    home = torch.device("cpu") if low_vram else device
    if ckpt == "official":
        # Half precision reads the fp16 unCLIP files (half the download); the others are cast as they load.
        variant = "fp16" if dtype in (torch.float16, torch.bfloat16) else None
        files = resolve_official(weights_root(weights), model, variant)
        seed = SeedTokenizer.from_official(files.quantizer, files.vit, device=home, dtype=dtype)
        llm = Llama.from_official(files.llm, device=home, dtype=dtype)
        tokenizer = Tokenizer(files.tokenizer)
        decoder = UnCLIPDecoder.from_official(files.unclip, device=device, dtype=dtype, variant=variant)
        template = model.upper()
    else:
        folder = Path(ckpt)
        missing = [str(folder / name) for name in ("seed", "llama", "decoder") if not (folder / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"--ckpt {ckpt}: expected a folder written by train.py with seed/, llama/ and "
                                    f"decoder/ (or 'official'); missing: {', '.join(missing)}")
        seed = SeedTokenizer.from_pretrained(folder / "seed", device=home, dtype=dtype)
        llm = Llama.from_pretrained(folder / "llama", device=home, dtype=dtype)
        tokenizer = Tokenizer(folder / "llama")
        decoder = UnCLIPDecoder.from_pretrained(folder / "decoder", device=device, dtype=dtype)
        template = "8B"  # train.py instruction-tunes in the official 8B chat template
    if low_vram:
        place_low_vram(seed, llm, decoder)
    return SeedLlama(seed.eval(), llm.eval(), tokenizer, decoder.eval(), device, low_vram, template)

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

def save(image: Image.Image, out: Path, name: str) -> None:
    path = out / f"{name}.png"
    image.save(path)
    print(f"  saved {path}")

def input_image(args) -> tuple[Image.Image, str]:
    if args.image is None:
        return test_picture(), "the built-in test picture (a house on a meadow, a sun)"
    return load_image(args.image), args.image

def run_reconstruct(pipe: SeedLlama, settings: Settings, args, out: Path) -> None:
    image, name = input_image(args)
    print(f"[reconstruct] {name} -> 32 codes -> image embedding -> unCLIP decoder")
    codes = pipe.encode_image(image)
    show_codes("input", codes)
    save(pipe.draw(codes, settings), out, "reconstruct")

def ask(pipe: SeedLlama, settings: Settings, out: Path, task: str, question: str, codes: list[int] | None,
        force_image: bool = False) -> None:
    """One official single-turn prompt (image first, then the text, as the scripts) -> printed answer, with each
    image the answer holds drawn and saved."""
    message = ("<image>" if codes is not None else "") + question
    prompt = pipe.tokenizer.encode_chat([message], pipe.template, images=[codes] if codes is not None else [])
    text, images, note = pipe.read(pipe.generate(prompt, settings, force_image=force_image))
    print(f"  answer: {text.replace('<image>', '[image]').strip()}")
    if note:
        print(f"  {note}")
    for k, image_codes in enumerate(images):
        show_codes(f"answer image {k}", image_codes)
        negative = pipe.unconditional_codes(settings) if settings.negative else None
        save(pipe.draw(image_codes, settings, negative), out, task if k == 0 else f"{task}_{k}")

def run_on_image(task: str, what: str = "prompt", force_image: bool = False):
    """caption / vqa / edit: the image first, then the text, as the official scripts ask."""
    def run(pipe: SeedLlama, settings: Settings, args, out: Path) -> None:
        image, name = input_image(args)
        question = args.prompt or DEFAULT_PROMPTS[task]
        print(f"[{task}] {name}; {what}: {question}")
        codes = pipe.encode_image(image)
        show_codes("input", codes)
        ask(pipe, settings, out, task, question, codes, force_image)
    return run

def run_t2i(pipe: SeedLlama, settings: Settings, args, out: Path) -> None:
    request = args.prompt or DEFAULT_PROMPTS["t2i"]
    print(f"[t2i] {request}")
    if settings.negative:
        show_codes("unconditional (negative)", pipe.unconditional_codes(settings))
    ask(pipe, settings, out, "t2i", request, None, force_image=True)

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
    re-encoded from pixels). Every turn re-sends the whole history in the official multi-turn template."""

    def __init__(self, pipe: SeedLlama, settings: Settings, out: Path):
        self.pipe, self.settings, self.out = pipe, settings, out
        self.messages, self.images, self.saved = [], [], 0

    def turn(self, text: str, image: Image.Image | None = None, draw: bool = False) -> None:
        """One exchange: the user's text (and picture), the model's answer (and pictures, when `draw` or when the
        model chooses to draw). The history only changes once the answer is there, so a failed turn leaves no trace."""
        message, new_images = text, []
        if image is not None:  # the official scripts put the image before the text of the turn
            new_images = [self.pipe.encode_image(image)]
            show_codes("your image", new_images[0])
            message = "<image>" + text
        prompt = self.prompt(message, new_images)
        print("  assistant: ", end="", flush=True)
        stream = TextStream(self.pipe.tokenizer, self.pipe.image_vocab.boi_id)
        answer, images, note = self.pipe.read(self.pipe.generate(prompt, self.settings, force_image=draw,
                                                                 on_token=stream))
        stream.finish(answer.replace("<image>", "[image]").strip())
        if note:
            print(f"  {note}")
        for codes in images:
            show_codes("assistant image", codes)
            negative = self.pipe.unconditional_codes(self.settings) if self.settings.negative else None
            self.saved += 1
            save(self.pipe.draw(codes, self.settings, negative), self.out, f"chat_{self.saved}")
        # The answer keeps its `<image>` placeholders and its codes: the next prompt re-inserts the same span.
        self.messages += [message, answer.strip()]
        self.images += new_images + images

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
            print("  (the oldest exchange was dropped to fit the context window)")

    def reset(self) -> None:
        self.messages, self.images = [], []

def run_chat(pipe: SeedLlama, settings: Settings, args, out: Path) -> None:
    chat = Chat(pipe, settings, out)
    interactive = sys.stdin.isatty()
    print("[chat] type a message; '/image PATH [text]' attaches a picture, '/draw TEXT' asks for one, "
          "'/reset' starts over, '/quit' leaves.")
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            break
        line = line.strip()
        if not line:
            continue
        if not interactive:
            print(f"you> {line}")
        command, _, rest = line.partition(" ")
        try:
            if command == "/reset":
                chat.reset()
                print("  (conversation cleared)")
            elif command == "/image":
                # the path is the first word, or a quoted string when it holds spaces
                quote = rest[:1] if rest[:1] in ("'", '"') else " "
                path, _, text = rest[1:].partition(quote) if quote != " " else rest.partition(" ")
                if not path:
                    raise ValueError("usage: /image PATH [text]")
                chat.turn(text.strip(), load_image(path))
            elif command == "/draw":
                chat.turn(rest, draw=True)
            else:
                chat.turn(line)
        except (FileNotFoundError, ValueError) as e:  # a bad path or a broken span ends the turn, not the chat
            print(f"  error: {e}")

def run_chat_demo(pipe: SeedLlama, settings: Settings, args, out: Path) -> None:
    """`--task all`: a scripted two-turn chat on the input picture; the second turn asks for a new picture, so the
    history ends up holding one image of each origin."""
    image, name = input_image(args)
    print(f"[chat] two scripted turns on {name}")
    chat = Chat(pipe, settings, out)
    print("you> [image] What is in this picture?")
    chat.turn("What is in this picture?", image)
    print("you> /draw Now draw the same scene at night.")
    chat.turn("Now draw the same scene at night.", draw=True)

RUNNERS = {"reconstruct": run_reconstruct, "caption": run_on_image("caption"), "vqa": run_on_image("vqa"),
           "t2i": run_t2i, "edit": run_on_image("edit", "instruction", force_image=True), "chat": run_chat,
           "chat-demo": run_chat_demo}

# ---- The CLI -------------------------------------------------------------------------------------------------------
TASKS = ["reconstruct", "caption", "vqa", "t2i", "edit", "chat"]
DEFAULT_PROMPTS = {  # the vqa/t2i/edit questions are the official script's examples, adapted to the test picture
    "caption": "Please describe the image in one sentence.", "vqa": "What is in this picture?",
    "t2i": "Can you generate an image of a dog on the green grass?",
    "edit": "Can you make it a winter scene with snow?"}

def build_parser() -> argparse.ArgumentParser:
    """Every default is a `Settings` field."""
    p = argparse.ArgumentParser(
        description="SEED-LLaMA end to end: image -> 32 codes -> LLaMA -> text / 32 codes -> unCLIP -> image.",
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        epilog="examples:\n"
               "  python sample.py --ckpt official                   # every task on the built-in picture\n"
               "  python sample.py --ckpt official --task vqa --image cat.jpg --prompt 'What is this animal?'\n"
               "  python sample.py --ckpt official --task chat --low-vram\n"
               "  python sample.py --ckpt out/tiny --task t2i --prompt 'draw a large red circle on the left'\n"
               "chat commands: '/image PATH [text]' attaches a picture, '/draw TEXT' asks for a picture,\n"
               "  '/reset' forgets the conversation, '/quit' (or end of input) leaves.\n"
               "environment: HF_ENDPOINT (hub mirror), SEED_EVA_VIT_URL, HF_HUB_OFFLINE=1, SEED_CACHE, XDG_CACHE_HOME.")
    p.add_argument("--ckpt", required=True, help="'official' for the released weights (downloaded once into the "
                   "cache), or a folder written by train.py holding seed/, llama/ and decoder/")
    p.add_argument("--task", default="all", choices=["all"] + TASKS,
                   help="default: all = reconstruct, caption, vqa, t2i, edit and a scripted two-turn chat, one after "
                        "the other; 'chat' alone reads turns from the terminal")
    p.add_argument("--image", help="input picture for reconstruct/caption/vqa/edit (default: a built-in test picture)")
    p.add_argument("--prompt", help="request (caption, t2i), question (vqa) or instruction (edit); each has a default")
    p.add_argument("--model", default="8b", choices=sorted(LLM_REPOS),
                   help="the SEED-LLaMA of --ckpt official: 8b (Vicuna template) or 14b (LLaMA-2 chat)")
    p.add_argument("--weights", help="folder of the official files laid out as on the hub (missing files are "
                                     "downloaded into it); default: $SEED_CACHE or ~/.cache/seed-from-scratch")
    p.add_argument("--device", help="cuda, mps or cpu (default: the first available, in that order)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on cuda/mps; "
                   "on cpu bfloat16 where the CPU has it natively (AVX512-BF16), else float32; half precision also "
                   "selects the fp16 unCLIP files, half the download")
    p.add_argument("--int8", action="store_true", help="SEED-LLaMA's attention and MLP weights in int8 with "
                   "per-channel scales (llama.quantize_int8): a quarter of the fp32 bytes per token")
    p.add_argument("--compile", action="store_true", help="torch.compile the LLM's decode step (CUDA graphs on "
                   "cuda); the first answer waits for the compilation")
    p.add_argument("--seed", type=int, default=Settings.seed, help="same seed, same outputs (default %(default)s)")
    # The LLM's decoding (defaults: the official values of llama.GenerationConfig), then the decoder's drawing.
    p.add_argument("--temperature", type=float, default=Settings.temperature, help="0 = greedy (default %(default)s)")
    p.add_argument("--top-p", type=float, default=Settings.top_p, help="nucleus sampling mass (default %(default)s)")
    p.add_argument("--top-k", type=int, default=Settings.top_k, help="0 = all tokens (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=Settings.max_new_tokens,
                   help="longest answer in tokens (default %(default)s); capped by the context window, raised to 33 "
                        "when an image is requested so that its span fits")
    p.add_argument("--llm-cfg", type=float, default=Settings.llm_guidance, metavar="SCALE", dest="llm_guidance",
                   help="classifier-free guidance of the LLM on the image codes of t2i, edit and chat /draw, against "
                        "the chat template around an empty request; 1 = off (default %(default)s, as officially)")
    p.add_argument("--steps", type=int, default=Settings.steps,
                   help="unCLIP denoising steps (default %(default)s; PNDM makes one UNet call more)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=Settings.sampler,
                   help="the unCLIP decoder's sampler: pndm (the official scheduler) or ddim (default %(default)s)")
    p.add_argument("--guidance", type=float, default=Settings.guidance,
                   help="the unCLIP decoder's classifier-free guidance scale (default %(default)s)")
    p.add_argument("--negative", choices=["uncond", "none"], default="uncond",
                   help="negative image of generated images: 'uncond' = the codes the LLM samples from '<s><img>' "
                        "alone (as the official evaluation), 'none' = a zero label (default uncond; reconstructions "
                        "always use none)")
    p.add_argument("--constrained", action="store_true", help="after <img>, only image codes for 32 tokens, then "
                   "</img>: every image span is valid (the official code samples freely)")
    p.add_argument("--low-vram", action="store_true", help="keep every model in host memory and move only the "
                   "running one to the GPU: SEED-LLaMA 8B in fp16 then fits a 16 GB GPU")
    p.add_argument("--out", default="samples", help="folder for the PNG files (default ./samples)")
    return p

def settings_from(args) -> Settings:
    """Every `Settings` field is the flag of its name; --negative alone is a word."""
    return Settings(**{f.name: getattr(args, f.name) for f in fields(Settings) if f.name != "negative"},
                    negative=args.negative == "uncond")

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # fail on bad arguments before minutes of loading
        device = pick_device(args.device)  # an absent device is named, with the ones present
        if args.image is not None and not Path(args.image).is_file():
            raise FileNotFoundError(f"--image {args.image}: no such file")
        if args.task == "chat" and args.image is not None:
            raise ValueError("--image does not apply to --task chat: attach pictures with '/image PATH' in the chat")
        for ok, what in [(args.temperature >= 0, "--temperature must be >= 0"),
                         (args.top_k >= 0, "--top-k must be >= 0"), (0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
                         (args.steps >= 1, "--steps must be >= 1"),
                         (args.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
                         (args.llm_guidance >= 0, "--llm-cfg must be >= 0"),
                         (args.guidance >= 0, "--guidance must be >= 0")]:
            if not ok:
                raise ValueError(what)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Half precision on accelerators, as the official code; on the CPU bf16 only where it is native.
    dtype = getattr(torch, args.dtype) if args.dtype else inference_dtype(device)
    if args.dtype is None and device.type == "cpu":
        print(f"dtype: {str(dtype).removeprefix('torch.')} (this CPU "
              f"{'has' if dtype == torch.bfloat16 else 'lacks'} native bf16; --dtype to choose)")
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in TASKS if t != "chat"] + ["chat-demo"] if args.task == "all" else [args.task]
    try:
        pipe = load_pipeline(args.ckpt, device, dtype, model=args.model, weights=args.weights, low_vram=args.low_vram)
        if args.int8:
            quantize_int8(pipe.llm)
        if args.compile:
            pipe.llm.compile_decode()
        settings = settings_from(args)
        for task in tasks:  # a bad picture or a broken span ends the run with the error, not a traceback
            RUNNERS[task](pipe, settings, args, out)
    except (DownloadError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

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
# seed_tokenizer/ @ b611080; tokenizer.model: the stock LLaMA SentencePiece model). Checked only at exactly that size:
# a file of another size is not the official one (a mirror's reduced copy, as in the tests), which the server's size
# and sha256 ETag still guard.
KNOWN_FILES = {
    f"{TOKENIZER_REPO}/seed_quantizer.pt":
        (1_228_836_570, "322a9fba55cb0e97e1a633981fbbdff20577af69146a0f23fa7b14201459a13f"),
    f"{TOKENIZER_REPO}/tokenizer.model":
        (499_723, "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"),
}

class DownloadError(RuntimeError):
    """A weight file could not be fetched or verified; the message says why and what to do."""

def weights_root(weights: str | None = None) -> Path:
    """Where the official files live: `--weights DIR`, else $SEED_CACHE, else the XDG cache folder."""
    if weights or os.environ.get("SEED_CACHE"):
        return Path(weights or os.environ["SEED_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seed-from-scratch"

def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")

def hub_url(rel: str) -> str:
    """The URL of a file given by its path in the layout (`owner/repo/file`); EVA has its own."""
    if rel == EVA_VIT_PATH:
        return os.environ.get("SEED_EVA_VIT_URL") or EVA_VIT_URL
    owner, name, file = rel.split("/", 2)
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{owner}/{name}/resolve/main/{file}"

def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n} B"

class _KeepLinkedHeaders(urllib.request.HTTPRedirectHandler):
    """The hub answers a large (LFS) file with a redirect to its CDN; the redirect, not the final answer, carries the
    file's sha256 (`X-Linked-Etag`) and size (`X-Linked-Size`). urllib drops redirect headers, so keep them."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        linked = getattr(req, "linked", None)  # one dict shared by every request of the chain (see _open_resuming)
        if new is not None and linked is not None:
            linked.update({k.lower(): v for k, v in headers.items() if k.lower().startswith("x-linked-")})
            new.linked = linked
        return new

_OPENER = urllib.request.build_opener(_KeepLinkedHeaders())

def _sha256_header(headers: dict) -> str | None:
    """The sha256 the server vouches for, if any: the hub sends it as the (quoted) ETag of LFS files. A 40-hex ETag is
    a git blob id and a CDN ETag is an md5, so only a 64-hex value counts."""
    for key in ("x-linked-etag", "etag"):
        value = (headers.get(key) or "").strip().removeprefix("W/").strip('"').lower()
        if re.fullmatch(r"[0-9a-f]{64}", value):
            return value
    return None

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()

def download(url: str, dest: Path, known: tuple[int, str] | None = None, retries: int = 3) -> Path:
    """Fetch `url` to `dest`: resumable (HTTP Range into `dest.incomplete`), size- and sha256-checked, atomic. A
    dropped connection is retried `retries` times, each resuming where the last one stopped; an interrupted run also
    resumes from the `.incomplete` file. A file whose hash does not match is moved to `dest.corrupt`, never used."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".incomplete")
    for attempt in range(retries + 1):
        retry = attempt < retries
        opened = _open_resuming(url, dest, part, attempt, retry)
        if opened is None or not _receive(opened, dest, part, retry):
            continue
        _, total, _, headers = opened
        size = part.stat().st_size
        if total is not None and size < total:  # the connection ended early without an error: resume
            if retry:
                continue
            raise DownloadError(f"{url}: the transfer stopped at {size} of {total} bytes {retries + 1} times; run "
                                f"again to resume from {part}.")
        # The published hash when the file has the official size (see KNOWN_FILES), else the server's.
        expected = known[1] if known is not None and size == known[0] else _sha256_header(headers)
        if (total is not None and size != total) or (expected and _sha256(part) != expected):
            corrupt = dest.with_name(dest.name + ".corrupt")
            os.replace(part, corrupt)
            what = f"size {size} instead of {total}" if total is not None and size != total else \
                f"SHA-256 differs from the expected {expected}"
            raise DownloadError(f"{url} arrived corrupt ({what}). It was moved to {corrupt} and will not be used; "
                                f"run again to download it afresh.")
        os.replace(part, dest)
        return dest
    raise DownloadError(f"{url}: gave up after {retries + 1} attempts; run again to resume from {part}.")

def _open_resuming(url: str, dest: Path, part: Path, attempt: int, retry: bool):
    """(response, total size or None, offset the body starts at, headers) of `url` from the end of `part` on; None to
    retry (a whole or longer `part` is deleted, an unreachable server gets a growing pause), DownloadError: hopeless."""
    offset = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "seed-from-scratch"})
    req.linked = {}  # filled by _KeepLinkedHeaders if the server redirects
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = _OPENER.open(req, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the partial file is already whole (or longer): start over
            part.unlink()
            return None
        if e.code == 404:
            raise DownloadError(f"{url} does not exist (HTTP 404). Check the name, the mirror in HF_ENDPOINT or "
                                f"SEED_EVA_VIT_URL, or put the file at {dest} yourself.") from None
        hint = " (a gated repository? log in on the hub and accept its terms)" if e.code in (401, 403) else ""
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError) as e:
        if retry:
            time.sleep(min(2 ** attempt, 10))
            return None
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot reach {url}: {reason}. Check the network, set HF_ENDPOINT to a mirror, or "
                            f"copy the files into {dest.parent} and set HF_HUB_OFFLINE=1.") from None
    headers = {**req.linked, **{k.lower(): v for k, v in resp.headers.items()}}
    if resp.status == 206:  # Content-Range: bytes START-END/TOTAL
        m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", headers.get("content-range", ""))
        if not m or int(m.group(1)) != offset:
            resp.close()
            raise DownloadError(f"{url}: the server answered the range request with a bad Content-Range "
                                f"{headers.get('content-range')!r}")
        total = int(m.group(2)) if m.group(2) != "*" else None
    else:  # 200: the server ignored the range, the body is the whole file
        offset = 0
        total = int(headers["content-length"]) if "content-length" in headers else None
    if total is None and "x-linked-size" in headers:
        total = int(headers["x-linked-size"])
    return resp, total, offset, headers

def _receive(opened, dest: Path, part: Path, retry: bool) -> bool:
    """Append the body of an open response to `part` (after checking the disk can hold the rest); False when the
    connection broke and the attempt should be made again."""
    resp, total, offset, _ = opened
    with resp:
        if total is not None:
            need = total - offset
            free = shutil.disk_usage(dest.parent).free
            if need > free:
                raise DownloadError(f"not enough disk space for {dest.name}: it needs {_gb(need)} more, "
                                    f"{dest.parent} has {_gb(free)} free. Free some space, or choose another "
                                    f"folder with --weights or SEED_CACHE.")
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                   leave=False, file=sys.stderr, mininterval=0.5, disable=None)  # None: only on a terminal
        try:
            with open(part, "ab" if offset else "wb") as f, bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.IncompleteRead) as e:
            if getattr(e, "errno", None) == errno.ENOSPC:
                raise DownloadError(f"the disk is full while writing {part}. Free some space and run again: "
                                    f"the download resumes where it stopped.") from None
            if retry and isinstance(e, (ConnectionError, socket.timeout, http.client.IncompleteRead)):
                return False
            raise
    return True

def fetch_files(root: Path, rels: list[str]) -> None:
    """Make sure every file of `rels` (paths in the hub layout) is under `root`: download only the missing ones."""
    missing = [rel for rel in rels if not (root / rel).is_file()]
    if missing and offline():
        raise DownloadError("HF_HUB_OFFLINE=1 and these files are missing under " + str(root) + ":\n  " +
                            "\n  ".join(missing))
    for rel in missing:
        print(f"downloading {rel}", file=sys.stderr)
        download(hub_url(rel), root / rel, known=KNOWN_FILES.get(rel))

@dataclass
class OfficialFiles:
    """Where each part of the official release is, once `resolve_official` has made sure it is there."""
    quantizer: Path   # seed_quantizer.pt
    vit: Path         # eva_vit_g.pth
    tokenizer: Path   # the folder with tokenizer.model and the added-token files
    llm: Path         # the SEED-LLaMA folder (config.json, index, shards)
    unclip: Path      # the stable-diffusion-2-1-unclip folder

def resolve_official(root: Path, model: str = "8b", variant: str | None = None) -> OfficialFiles:
    """Make sure the official files for `model` are under `root` (downloading what is missing) and say where.
    `variant="fp16"` picks the half-size unCLIP weights (what a fp16/bf16 run on a GPU loads)."""
    if model not in LLM_REPOS:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(LLM_REPOS)}")
    llm = LLM_REPOS[model]
    suffix = f".{variant}" if variant else ""
    fixed = ([f"{TOKENIZER_REPO}/{f}" for f in TOKENIZER_FILES] + [EVA_VIT_PATH] +
             [f"{llm}/{f}" for f in LLM_FILES] + [f"{UNCLIP_REPO}/{f}" for f in UNCLIP_FILES] +
             [f"{UNCLIP_REPO}/{c}/{stems[0]}{suffix}.safetensors" for c, stems in OFFICIAL_COMPONENTS.items()])
    # The shard list is in the index; find an index that is already here, else fetch the official one.
    index = next((f"{llm}/{f}" for f in LLM_INDEX_FILES if (root / llm / f).is_file()), f"{llm}/{LLM_INDEX_FILES[0]}")
    if not offline():
        fetch_files(root, [index])
    shards = [f"{llm}/{name}" for name in index_shards(root / index)] if (root / index).is_file() else []
    fetch_files(root, fixed + ([] if offline() else [index]) + shards)
    return OfficialFiles(quantizer=root / TOKENIZER_REPO / "seed_quantizer.pt", vit=root / EVA_VIT_PATH,
                         tokenizer=root / TOKENIZER_REPO, llm=root / llm, unclip=root / UNCLIP_REPO)

if __name__ == "__main__":
    sys.exit(main())
