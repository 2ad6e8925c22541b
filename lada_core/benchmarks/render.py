"""Procedurally rendered image domains of ``mini-tail``: shapes, colours, textures, Greek letters, chess pieces.

Every image is a pure function of ``(domain, stream seed, index, label)``: :class:`RenderedImages`
draws nothing until an image is loaded, so building the benchmark costs nothing, and its fingerprint
is a hash of those inputs and of :data:`RENDER_VERSION` (bump it when a drawing changes). Images are
32 x 32 RGB, drawn at 4x and downsampled (anti-aliased). The random parameters (position, size,
rotation, colours, noise) vary per image, so a class is a family of images, not one picture.

The Greek letters and the chess pieces are drawn with the DejaVu fonts of Debian's ``fonts-dejavu-core`` package.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from lada_core.benchmarks.base import DataError

RENDER_VERSION = 3
SIZE = 32  # output side (pixels)
_SS = 4  # supersampling factor of the vector drawings

SHAPES = ["circle", "square", "triangle", "star", "cross", "hexagon", "crescent", "arrow"]
COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown"]
TEXTURES = ["striped", "chequered", "dotted", "zigzagged", "wavy", "grid", "speckled", "blotchy"]
GREEK = ["alpha", "beta", "gamma", "delta", "epsilon", "lambda", "pi", "sigma", "omega", "theta"]
_GREEK_GLYPHS = "αβγδελπσωθ"
CHESS = ["king", "queen", "rook", "bishop", "knight", "pawn"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_CHESS_GLYPHS = ("♔♚", "♕♛", "♖♜", "♗♝", "♘♞", "♙♟")  # outlined and solid
# hue (degrees), saturation and value ranges of the colour classes (HSV)
_COLOUR_HSV: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "red": ((-10, 8), (0.75, 1.0), (0.7, 1.0)),
    "orange": ((22, 36), (0.8, 1.0), (0.85, 1.0)),
    "yellow": ((50, 62), (0.75, 1.0), (0.85, 1.0)),
    "green": ((95, 145), (0.6, 1.0), (0.5, 0.95)),
    "blue": ((205, 240), (0.65, 1.0), (0.6, 1.0)),
    "purple": ((265, 295), (0.5, 0.9), (0.45, 0.85)),
    "pink": ((320, 345), (0.3, 0.6), (0.9, 1.0)),
    "brown": ((18, 34), (0.6, 0.9), (0.3, 0.5)),
}
FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu"))
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSansCondensed.ttf",
)


def _grey_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A background and a foreground colour with enough contrast (any hue, random brightness)."""
    while True:
        bg = rng.uniform(0, 255, 3)
        fg = rng.uniform(0, 255, 3)
        if abs(bg.mean() - fg.mean()) > 70:
            return bg, fg


def _ink_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paper and ink: a light, lightly tinted background and a dark, lightly tinted foreground (a
    drawing or a print, not a colour puzzle: the class is in the outline, not in the colours)."""
    bg = rng.uniform(170, 255) + rng.uniform(-25, 25, 3)
    fg = rng.uniform(0, 90) + rng.uniform(-25, 25, 3)
    return np.clip(bg, 0, 255), np.clip(fg, 0, 255)


def _finish(img: Any, rng: np.random.Generator, noise: float = 8.0) -> np.ndarray:
    """Downsample a supersampled PIL image to SIZE and add pixel noise -> uint8 [SIZE, SIZE, 3]."""
    from PIL import Image

    small = img.resize((SIZE, SIZE), Image.Resampling.LANCZOS) if img.size[0] != SIZE else img
    arr = np.asarray(small, dtype=np.float64)
    arr = arr + rng.normal(0.0, noise, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(n: int, radii: list[float], phase: float = 0.0) -> list[tuple[float, float]]:
        pts = []
        for i in range(n * len(radii)):
            a = angle + phase + 2 * math.pi * i / (n * len(radii))
            rr = r * radii[i % len(radii)]
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts

    if kind == "square":
        return ring(4, [1.0], math.pi / 4)
    if kind == "triangle":
        return ring(3, [1.0], -math.pi / 2)
    if kind == "hexagon":
        return ring(6, [1.0])
    if kind == "star":
        return ring(5, [1.0, 0.42], -math.pi / 2)
    if kind in ("cross", "arrow"):
        w = 0.32
        local = (
            [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
            if kind == "cross"
            else [(-1, -0.25), (0.15, -0.25), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.25), (-1, 0.25)]
        )
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in local]
    raise ValueError(kind)  # pragma: no cover - programming error


def _draw_shape(draw: Any, kind: str, cx: float, cy: float, r: float, angle: float, fill: tuple[int, ...], bg: tuple[int, ...]) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        ox, oy = cx + 0.45 * r * math.cos(angle), cy + 0.45 * r * math.sin(angle)
        draw.ellipse([ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r], fill=bg)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=fill)


def _shape_canvas(rng: np.random.Generator, kind: str, fill: np.ndarray, bg: np.ndarray) -> np.ndarray:
    from PIL import Image, ImageDraw

    big = SIZE * _SS
    img = Image.new("RGB", (big, big), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.26, 0.42) * big
    cx, cy = big / 2 + rng.uniform(-0.12, 0.12) * big, big / 2 + rng.uniform(-0.12, 0.12) * big
    angle = rng.uniform(0, 2 * math.pi)
    _draw_shape(draw, kind, cx, cy, r, angle, tuple(int(v) for v in fill), tuple(int(v) for v in bg))
    return _finish(img, rng)


def render_shape(label: int, rng: np.random.Generator) -> np.ndarray:
    """One shape of class ``SHAPES[label]``: random size, place and rotation, dark on light."""
    bg, fg = _ink_pair(rng)
    return _shape_canvas(rng, SHAPES[label], fg, bg)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb((h % 360) / 360.0, s, v)) * 255.0


def render_colour(label: int, rng: np.random.Generator) -> np.ndarray:
    """A paint swatch: the whole image in shades of ``COLOURS[label]`` (a smooth random shading of
    its hue, saturation and value), with pixel noise."""
    from PIL import Image

    (h0, h1), (s0, s1), (v0, v1) = _COLOUR_HSV[COLOURS[label]]
    centre = np.array([rng.uniform(h0, h1), rng.uniform(s0, s1), rng.uniform(v0, v1)])
    shade = np.asarray(Image.fromarray(rng.normal(size=(3, 3)).astype(np.float32), mode="F").resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    v = np.clip(centre[2] + 0.12 * shade, 0.0, 1.0)  # [SIZE, SIZE]
    rgb = _hsv_to_rgb(centre[0], centre[1], 1.0)  # [3] at full value
    arr = rgb[None, None, :] * v[..., None]
    return _finish(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), rng, noise=10.0)


def render_texture(label: int, rng: np.random.Generator) -> np.ndarray:
    """A texture of class ``TEXTURES[label]`` with a random scale, orientation, phase and colours."""
    n = SIZE * 2
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n  # [n, n] in [0, 1)
    theta = rng.uniform(0, math.pi)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    freq = rng.uniform(3.0, 6.0)
    phase = rng.uniform(0, 1)
    kind = TEXTURES[label]
    if kind == "striped":
        m = ((u * freq + phase) % 1.0) < 0.5
    elif kind == "chequered":
        m = (np.floor(u * freq + phase) + np.floor(v * freq + phase)) % 2 < 1
    elif kind == "dotted":
        du, dv = (u * freq + phase) % 1.0 - 0.5, (v * freq + phase) % 1.0 - 0.5
        m = du * du + dv * dv < rng.uniform(0.04, 0.09)
    elif kind == "zigzagged":
        tri = np.abs(((v * freq) % 1.0) - 0.5) * rng.uniform(0.6, 1.2)
        m = ((u * freq * 0.8 + tri + phase) % 1.0) < 0.45
    elif kind == "wavy":
        m = ((u * freq + 0.25 * np.sin(2 * math.pi * v * rng.uniform(1.5, 3.0)) + phase) % 1.0) < 0.5
    elif kind == "grid":
        w = rng.uniform(0.12, 0.22)
        m = (((u * freq + phase) % 1.0) < w) | (((v * freq + phase) % 1.0) < w)
    elif kind == "speckled":
        m = rng.random((n, n)) < rng.uniform(0.08, 0.2)
    else:  # blotchy: smooth low-frequency noise, thresholded
        coarse = rng.normal(size=(5, 5))
        from PIL import Image

        smooth = np.asarray(Image.fromarray(coarse.astype(np.float32), mode="F").resize((n, n), Image.Resampling.BICUBIC))
        m = smooth > np.median(smooth)
    bg, fg = _grey_pair(rng)
    arr = np.where(m[..., None], fg, bg).astype(np.float32)  # [n, n, 3]
    from PIL import Image

    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).resize((SIZE, SIZE), Image.Resampling.BOX)
    return _finish(img, rng, noise=6.0)


@cache
def font_paths() -> tuple[Path, ...]:
    """The DejaVu font files found on this machine (``fonts-dejavu-core``); DataError when none."""
    found = [d / f for d in FONT_DIRS for f in FONT_FILES if (d / f).is_file()]
    if not found:
        raise DataError(
            "the Greek-letter and chess domains of mini-tail need the DejaVu fonts: install Debian's package "
            f"'fonts-dejavu-core' (apt-get install fonts-dejavu-core); looked in {', '.join(map(str, FONT_DIRS))}"
        )
    return tuple(found)


@lru_cache(maxsize=64)
def _font(path: Path, size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.truetype(str(path), size)


def _render_glyph(text: str, fonts: tuple[Path, ...], rng: np.random.Generator, scale: tuple[float, float]) -> np.ndarray:
    """``text`` in a random one of ``fonts``, size, angle and place, random colours."""
    from PIL import Image, ImageDraw

    big = SIZE * _SS
    bg, fg = _ink_pair(rng)
    glyph = Image.new("L", (big, big), 0)
    font = _font(fonts[int(rng.integers(len(fonts)))], int(rng.uniform(*scale) * big))
    draw = ImageDraw.Draw(glyph)
    draw.text((big / 2, big / 2), text, fill=255, font=font, anchor="mm")
    glyph = glyph.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BILINEAR, translate=tuple(rng.uniform(-0.06, 0.06, 2) * big))
    mask = np.asarray(glyph, dtype=np.float32)[..., None] / 255.0  # [big, big, 1]
    arr = bg * (1 - mask) + fg * mask
    return _finish(Image.fromarray(arr.astype(np.uint8)), rng)


def render_greek(label: int, rng: np.random.Generator) -> np.ndarray:
    """The lower-case Greek letter ``GREEK[label]`` in a random upright DejaVu face, size, angle and place."""
    fonts = tuple(p for p in font_paths() if p.stem.split("-")[0] in ("DejaVuSans", "DejaVuSerif") and "Oblique" not in p.name and "Italic" not in p.name)
    return _render_glyph(_GREEK_GLYPHS[label], fonts or font_paths(), rng, (0.7, 0.9))


def render_digit(label: int, rng: np.random.Generator) -> np.ndarray:
    """The digit ``label`` drawn like scikit-learn's digits: a thick light stroke on black (a DejaVu
    face with a random stroke width, stretched to fill a tall box, slanted), reduced to 8 x 8 with 17 grey levels,
    then enlarged again (for the mini CLIP's pretraining only: mini-tail uses the real digits)."""
    from PIL import Image, ImageDraw

    big = SIZE * _SS
    glyph = Image.new("L", (big, big), 0)
    font = _font(font_paths()[int(rng.integers(len(font_paths())))], int(rng.uniform(0.8, 1.0) * big))
    ImageDraw.Draw(glyph).text((big / 2, big / 2), str(label), fill=255, font=font, anchor="mm",
                               stroke_width=int(rng.uniform(0.02, 0.07) * big), stroke_fill=255)
    box = glyph.getbbox() or (0, 0, big, big)
    w, h = int(rng.uniform(0.45, 0.75) * big), int(rng.uniform(0.85, 1.0) * big)  # tall, as handwritten in a box
    canvas = Image.new("L", (big, big), 0)
    canvas.paste(glyph.crop(box).resize((w, h), Image.Resampling.BILINEAR), ((big - w) // 2, (big - h) // 2))
    glyph = canvas.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR, translate=tuple(rng.uniform(-0.05, 0.05, 2) * big))
    small = np.asarray(glyph.resize((8, 8), Image.Resampling.BOX), dtype=np.float64)
    small = np.round(np.clip(small * rng.uniform(0.9, 1.2), 0, 255) * 16 / 255) * (255 / 16)  # scikit-learn's 0..16
    img = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    return np.asarray(img.convert("RGB"))


def render_chess(label: int, rng: np.random.Generator) -> np.ndarray:
    """The chess piece ``CHESS[label]`` (outlined or solid) in a DejaVu Sans face."""
    fonts = tuple(p for p in font_paths() if "Sans" in p.name) or font_paths()
    return _render_glyph(_CHESS_GLYPHS[label][int(rng.integers(2))], fonts, rng, (0.7, 0.9))


RENDERERS: dict[str, tuple[list[str], Callable[[int, np.random.Generator], np.ndarray]]] = {
    "shapes": (SHAPES, render_shape),
    "colours": (COLOURS, render_colour),
    "textures": (TEXTURES, render_texture),
    "greek": (GREEK, render_greek),
    "chess": (CHESS, render_chess),
    "digits": (DIGITS, render_digit),  # pretraining only (mini-tail's digits are scikit-learn's)
}
"""domain -> (class names, renderer of one image)."""

_STREAMS = {"train": 1, "val": 2, "test": 3, "pretrain": 4}


def render_one(domain: str, stream: str, seed: int, index: int, label: int) -> np.ndarray:
    """Image ``index`` of a stream: uint8 [SIZE, SIZE, 3]; a pure function of its arguments."""
    _, fn = RENDERERS[domain]
    digest = hashlib.sha256(f"{domain}|{stream}|{seed}".encode()).digest()
    rng = np.random.default_rng([int.from_bytes(digest[:8], "little"), _STREAMS[stream], index])
    return fn(int(label), rng)


def balanced_labels(num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """``per_class`` of every label, in a seeded random order: [num_classes * per_class] int64."""
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    return np.random.default_rng(seed).permutation(labels)


@dataclass
class RenderedImages:
    """Images of a procedural domain, drawn on demand: image ``i`` = ``render_one(domain, stream,
    seed, i, labels[i])``. Different streams (train / val / test / pretrain) never share an image."""

    domain: str
    stream: str
    seed: int
    labels: np.ndarray
    _fp: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        if self.domain in ("greek", "chess", "digits"):
            font_paths()  # fail at build time, with the package to install

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def load(self, index: int) -> Any:
        from PIL import Image

        return Image.fromarray(self.pixels_of(index))

    def pixels_of(self, index: int) -> np.ndarray:
        return render_one(self.domain, self.stream, self.seed, index, int(self.labels[index]))

    def pixels(self) -> np.ndarray:
        """Every image: uint8 [N, SIZE, SIZE, 3]."""
        return np.stack([self.pixels_of(i) for i in range(len(self))]) if len(self) else np.zeros((0, SIZE, SIZE, 3), np.uint8)

    def fingerprint(self) -> str:
        if not self._fp:
            h = hashlib.sha256(f"render-v{RENDER_VERSION}|{self.domain}|{self.stream}|{self.seed}".encode())
            h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
            if self.domain in ("greek", "chess", "digits"):  # the glyphs depend on the font files
                for p in font_paths():
                    h.update(f"{p.name}:{p.stat().st_size}".encode())
            self._fp = h.hexdigest()[:16]
        return self._fp
