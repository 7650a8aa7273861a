"""The shapes world: the synthetic image-text world every stage of `train.py --tiny` learns from, and the judge of
its images. This docstring is the world's specification; keep it exactly, so that results stay comparable.

Images. A 32x32 RGB canvas, white (255, 255, 255), holding exactly one shape:
  shape     circle (the ellipse inscribed in its box), square (the box filled) or triangle (pointing up: apex at the
            top middle of the box, base on its bottom edge);
  colour    red (220, 40, 40), green (40, 170, 60), blue (40, 80, 220), yellow (230, 200, 40), purple (150, 60, 190);
  size      small (an 8x8 box) or large (14x14);
  position  the box centre: center (16, 16), left (10, 16), right (22, 16), top (16, 10), bottom (16, 22), moved by
            a jitter of -1, 0 or +1 px on each axis (9 jitters).
The box spans [c - s/2, c + s/2) in continuous pixel coordinates (pixel i covers [i, i + 1)); anti-aliasing draws at
4x (SUPERSAMPLE) and area-downsamples (PIL's Image.BOX). 3 x 5 x 2 x 5 = 150 combinations x 9 jitters = 1350
images, rendered without any randomness. For combination i the jitters i % 9 and (i + 4) % 9 are test images.

Language. A caption is "a {size} {colour} {shape} {place}", place one of "at the top", "at the bottom", "on the
left", "on the right", "in the center": always 7 words. The four VQA questions (QUESTIONS) are answered with one word
or the place phrase. An edit instruction changes exactly one attribute: "make it {colour}", "turn it into a
{shape}", "make it {large|small}", "move it {place}". Requests for a caption or a picture are paraphrased
(CAPTION_REQUESTS, T2I_REQUESTS), so that a model learns the task and not one sentence; the first of each is the one
the evaluation asks with. An attribute-level request names only some attributes (Combo.describe: "draw a blue
shape."), and any image that has them answers it.

Held-out compositions. The (shape, colour) pairs (triangle, blue), (circle, yellow) and (square, purple) are never an
image the LLM learns to draw: no caption -> image sequence, text-to-image reply or edit target shows them. They are
tokenizer and decoder training images and captioning inputs, because SEED's claim is that the LLM composes what it
has read into what it draws; every generation metric is reported for held-in and held-out pairs apart.

The judge. `judge` reads the four attributes back from the pixels by a heuristic, so that generated images are
scored by something that is not a model under test. It is right on every clean render, and on at least 99 % of
them under Gaussian pixel noise of 8 grey levels (tests/test_train.py).

Worked example: COMBOS[0] is Combo("circle", "red", "small", "center"), caption "a small red circle in the
center"; Combo("square", "red", "large", "center").edit("position", "left") is ("move it on the left",
Combo("square", "red", "large", "left")), and parse_caption("a large blue triangle on the left") gives
{"size": "large", "colour": "blue", "shape": "triangle", "position": "left"}.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40),
           "purple": (150, 60, 190)}
SIZES = {"small": 8, "large": 14}  # side of the shape's box in pixels
POSITIONS = {"center": (16, 16), "left": (10, 16), "right": (22, 16), "top": (16, 10), "bottom": (16, 22)}
PLACES = {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right",
          "center": "in the center"}
JITTERS = tuple((dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1))  # 9 offsets of the box centre
HELD_OUT_PAIRS = (("triangle", "blue"), ("circle", "yellow"), ("square", "purple"))  # the LLM never learns to draw them
QUESTIONS = {"colour": "what colour is the shape?", "shape": "what shape is it?", "size": "is it large or small?",
             "position": "where is the shape?"}
IMAGE_SIZE, SUPERSAMPLE = 32, 4
ATTRIBUTES = ("shape", "colour", "size", "position")
VALUES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS)}
CAPTION_REQUESTS = ("describe the image.", "what is in the picture?", "write a short caption for this image.")
T2I_REQUESTS = ("draw {}.", "can you generate an image of {}?", "please make a picture of {}.", "show me {}.")

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

    def describe(self, attributes) -> str:
        """A request-level description naming only `attributes` (in caption order), e.g. ("colour", "shape") ->
        "a blue triangle", ("size",) -> "a small shape": what an attribute-level request asks for."""
        words = [self.size if "size" in attributes else "", self.colour if "colour" in attributes else "",
                 self.shape if "shape" in attributes else "shape", PLACES[self.position] if "position" in attributes
                 else ""]
        return "a " + " ".join(w for w in words if w)

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

    def random_edit(self, rng) -> tuple[str, "Combo"]:
        """An edit of one attribute, drawn with `rng` (a random.Random), to a value it does not have yet."""
        attribute = rng.choice(ATTRIBUTES)
        return self.edit(attribute, rng.choice([v for v in VALUES[attribute] if v != getattr(self, attribute)]))

# Fixed enumeration order (shape, colour, size, position): the index of a combination is stable across versions.
COMBOS = tuple(Combo(s, c, z, p) for s in SHAPES for c in COLOURS for z in SIZES for p in POSITIONS)
CAPTIONS = tuple(c.caption for c in COMBOS)

def parse_caption(text: str) -> dict[str, str | None]:
    """The attributes a caption names (all None where the text does not follow the caption grammar)."""
    words = {a: "|".join(re.escape(v) for v in VALUES[a]) for a in ("shape", "colour", "size")}
    places = "|".join(re.escape(p) for p in PLACES.values())
    m = re.fullmatch(f"a ({words['size']}) ({words['colour']}) ({words['shape']}) ({places})", text)
    if m is None:
        return dict.fromkeys(ATTRIBUTES)
    place = {p: k for k, p in PLACES.items()}[m.group(4)]
    return {"size": m.group(1), "colour": m.group(2), "shape": m.group(3), "position": place}

def render(combo: Combo, jitter: tuple[int, int] = (0, 0)) -> Image.Image:
    """Draw one 32x32 image as the header specifies (4x supersampling, then a box filter)."""
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
    """All 1350 images as one tensor, with their combination, jitter and split. The 300 test images (the header's
    split) cover every combination twice and every jitter equally; no stage ever trains on them."""
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
    pairs = [(i, j) for i in range(len(COMBOS)) for j in range(len(JITTERS))]  # (combination, jitter) per image
    images = torch.stack([to_tensor(render(COMBOS[i], JITTERS[j])) for i, j in pairs])
    combo, jitter = (torch.tensor(column) for column in zip(*pairs))
    return World(images, combo, jitter, torch.tensor([j in (i % 9, (i + 4) % 9) for i, j in pairs]))

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
    verdicts = [judge(image) for image in images]
    right = [[verdict[a] == getattr(combo, a) for a in ATTRIBUTES] for verdict, combo in zip(verdicts, combos)]
    hits = {a: sum(row[k] for row in right) for k, a in enumerate(ATTRIBUTES)} | {"all": sum(map(all, right))}
    return {a: h / max(len(combos), 1) for a, h in hits.items()}
