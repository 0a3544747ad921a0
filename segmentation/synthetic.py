"""A small generated street-scene data set in exactly the Cityscapes layout (for the demo and the tests).

    python -m segmentation.synthetic --out data/synthetic              # 80 train + 20 val, 128 x 256
    python -m segmentation.synthetic --out DIR --num-train 8 --num-val 4 --height 64 --width 128 --seed 1

Writes ``DIR/leftImg8bit/{train,val}/{city}/{city}_{seq}_{frame}_leftImg8bit.png`` (RGB) and, next to
each, ``DIR/gtFine/.../*_gtFine_labelIds.png`` (mode "L", real Cityscapes label ids) plus a
``*_gtFine_color.png`` visualisation. Two "cities" per split.

Each scene: sky (top), a skyline of textured buildings and trees, a sidewalk band with the occasional
grass (terrain) strip, a road with lane markings, then objects drawn far-to-near with a perspective size:
cars (rounded boxes with cabin and wheels), persons (ellipse body + head), poles carrying traffic signs
(triangles) or traffic lights. Every class has its own colour distribution plus texture and pixel noise,
and some classes share colours (pole/building grey, terrain/vegetation green), so shape and context
matter. Some pixels carry ignored ids (0 "unlabeled" clutter patches, 1 "ego vehicle" bonnet) and map
to trainId 255. The output depends only on ``seed`` (and each image only on seed, split and index).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from trainkit import int_range

from .data import CITYSCAPES_CLASSES, CITYSCAPES_LABELS, IMAGE_SUFFIX, LABEL_ID_TO_TRAIN_ID, LABEL_SUFFIX

__all__ = ["generate", "main", "SYNTHETIC_LABEL_IDS", "SYNTHETIC_CITIES", "DEFAULT_SIZE"]

DEFAULT_SIZE: tuple[int, int] = (128, 256)
SYNTHETIC_CITIES: dict[str, tuple[str, str]] = {
    "train": ("alphaville", "brightwater"),
    "val": ("cedarfield", "dunmore"),
}
_SPLIT_CODE = {"train": 1, "val": 2}
COLOR_SUFFIX = "_gtFine_color.png"

# Cityscapes label ids drawn by the generator.
UNLABELED, EGO, ROAD, SIDEWALK, BUILDING, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR = (
    0,
    1,
    7,
    8,
    11,
    17,
    19,
    20,
    21,
    22,
    23,
    24,
    26,
)
#: The label ids the generator draws (0 and 1 are ignored ids -> trainId 255).
SYNTHETIC_LABEL_IDS: tuple[int, ...] = (
    UNLABELED,
    EGO,
    ROAD,
    SIDEWALK,
    BUILDING,
    POLE,
    LIGHT,
    SIGN,
    VEGETATION,
    TERRAIN,
    SKY,
    PERSON,
    CAR,
)

_ID_COLORS = np.zeros((256, 3), dtype=np.uint8)
for _lab in CITYSCAPES_LABELS:
    if _lab.id >= 0:
        _ID_COLORS[_lab.id] = _lab.color


class _Scene:
    """One image being drawn: float RGB canvas (H, W, 3) and uint8 label ids (H, W)."""

    def __init__(self, rng: np.random.Generator, h: int, w: int) -> None:
        self.rng, self.h, self.w = rng, h, w
        self.img = np.zeros((h, w, 3), dtype=np.float32)
        self.lab = np.zeros((h, w), dtype=np.uint8)

    # --- textures ---------------------------------------------------------------------------------------
    def smooth(self, h: int, w: int, cell: float) -> np.ndarray:
        """(h, w) smooth noise ~N(0, 1) with blobs of about ``cell`` pixels (bilinear upsampled coarse grid)."""
        gh, gw = max(2, int(round(h / cell)) + 1), max(2, int(round(w / cell)) + 1)
        coarse = self.rng.standard_normal((gh, gw)).astype(np.float32)
        return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))

    @staticmethod
    def texture(color: Sequence[float], jitter: float, smooth_amp: float, cell: float, pixel_amp: float) -> tuple:
        """A texture: base colour (+ N(0, jitter) per channel), smooth luminance noise of amplitude
        ``smooth_amp`` and blob size ``cell``, and per-pixel luminance noise N(0, pixel_amp)."""
        return (color, jitter, smooth_amp, cell, pixel_amp)

    def paint(self, mask: np.ndarray, label_id: int, tex: tuple, shade: np.ndarray | None = None) -> None:
        """Fills ``mask`` with the texture (plus the optional luminance ``shade``, broadcastable to (H, W))
        and the label id; the texture is only generated over the mask's bounding box."""
        mask = np.broadcast_to(mask, (self.h, self.w))
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rows.size == 0:
            return
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        bh, bw = r1 - r0, c1 - c0
        color, jitter, smooth_amp, cell, pixel_amp = tex
        base = np.asarray(color, np.float32) + self.rng.normal(0, jitter, 3).astype(np.float32)
        lum = smooth_amp * self.smooth(bh, bw, cell) + self.rng.normal(0, pixel_amp, (bh, bw)).astype(np.float32)
        if shade is not None:
            lum = lum + np.broadcast_to(shade, (self.h, self.w))[r0:r1, c0:c1]
        field = base + lum[..., None]
        m = mask[r0:r1, c0:c1]
        self.img[r0:r1, c0:c1][m] = field[m]
        self.lab[r0:r1, c0:c1][m] = label_id

    # --- masks --------------------------------------------------------------------------------------------
    def mask(self, draw_fn: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
        m = Image.new("L", (self.w, self.h), 0)
        draw_fn(ImageDraw.Draw(m))
        return np.asarray(m) > 0


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


_CAR_COLORS = ((150, 30, 35), (30, 50, 140), (25, 25, 30), (175, 175, 180), (230, 230, 225), (40, 90, 150))
_BUILDING_COLORS = ((120, 112, 105), (150, 125, 100), (95, 95, 110), (160, 150, 135))
_CLOTHES = ((40, 40, 60), (120, 30, 40), (60, 80, 40), (170, 150, 120), (30, 30, 30))


def _render(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    s = _Scene(rng, h, w)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]

    # Sky: blue, lighter towards the horizon, soft clouds.
    horizon = int(h * _u(rng, 0.38, 0.5))
    s.paint(np.ones((h, w), bool), SKY, s.texture((105, 150, 210), 12, 14, h / 3, 2), shade=yy / h * 60.0)

    # Ground: sidewalk band then road; the boundary is slightly slanted.
    side_h = h * _u(rng, 0.07, 0.14)
    slope = _u(rng, -0.08, 0.08)
    boundary = horizon + side_h + slope * (xx - w / 2)
    below = yy >= horizon
    tiles = ((xx.astype(int) // max(4, w // 40)) % 2 == 0) & ((yy.astype(int) % 5) == 0)
    s.paint(below, SIDEWALK, s.texture((165, 140, 150), 10, 6, 6, 6), shade=-25.0 * tiles)
    road = yy >= boundary
    s.paint(road, ROAD, s.texture((80, 72, 88), 8, 8, 12, 7))
    # Lane markings (label: road), dashed, following perspective.
    lane_y = int(horizon + side_h + (h - horizon - side_h) * _u(rng, 0.45, 0.7))
    dash = max(6, w // 16)
    phase = int(rng.integers(0, dash * 2))
    markings = road & (np.abs(yy - lane_y) <= max(1, h // 96)) & (((xx.astype(int) + phase) // dash) % 2 == 0)
    s.img[markings] = np.float32(215) + rng.normal(0, 8, (int(markings.sum()), 1)).astype(np.float32)
    # Occasional grass strip on the sidewalk.
    if rng.random() < 0.5:
        x0 = _u(rng, 0, w * 0.6)
        x1 = x0 + _u(rng, w * 0.15, w * 0.4)
        grass = below & ~road & (xx >= x0) & (xx < x1) & (yy >= horizon + 0.3 * side_h)
        s.paint(grass, TERRAIN, s.texture((120, 165, 80), 12, 10, 3, 10))

    # Skyline: buildings (with windows) and trees standing on the horizon line.
    x = -int(_u(rng, 0, w * 0.1))
    while x < w:
        bw = int(_u(rng, 0.12, 0.3) * w)
        top = int(_u(rng, 0.05, 0.8) * horizon)
        if rng.random() < 0.7:
            colour = _BUILDING_COLORS[int(rng.integers(len(_BUILDING_COLORS)))]
            m = s.mask(lambda d: d.rectangle([x, top, x + bw - 1, horizon], fill=1))
            win = max(3, w // 50)
            wy = ((yy.astype(int) - top) % (2 * win)) < win
            wx = ((xx.astype(int) - x) % (2 * win)) < win
            s.paint(m, BUILDING, s.texture(colour, 10, 6, 8, 5), shade=-45.0 * (wy & wx & (yy > top + win)))
        else:
            cx, r = x + bw / 2, bw / 2 * _u(rng, 0.8, 1.2)
            cy = top + r
            blobs = [
                (cx + _u(rng, -r / 2, r / 2), cy + _u(rng, -r / 3, r / 2), r * _u(rng, 0.5, 0.8)) for _ in range(4)
            ]
            trunk_w = max(2, bw // 10)

            def tree(d: ImageDraw.ImageDraw) -> None:
                if cy < horizon:
                    d.rectangle([cx - trunk_w / 2, cy, cx + trunk_w / 2, horizon], fill=1)
                for bx, by, br in blobs:
                    d.ellipse([bx - br, by - br, bx + br, by + br], fill=1)

            s.paint(s.mask(tree), VEGETATION, s.texture((65, 105, 40), 12, 18, 2.5, 14))
        x += bw + int(_u(rng, 0, 0.06) * w)

    # Objects, far (small, near the horizon) to near (large, low in the image).
    objects: list[tuple[float, str]] = []
    for _ in range(int(rng.integers(1, 5))):
        objects.append((_u(rng, horizon + side_h + 4, h * 1.05), "car"))
    for _ in range(int(rng.integers(1, 5))):
        objects.append((_u(rng, horizon + 2, h * 0.98), "person"))
    for _ in range(int(rng.integers(1, 4))):
        objects.append((_u(rng, horizon + 1, horizon + side_h), "pole"))
    for _ in range(int(rng.integers(0, 3))):
        objects.append((_u(rng, 0, h), "clutter"))
    objects.sort(key=lambda o: o[0])
    for base, kind in objects:
        depth = max(0.12, (base - horizon) / max(1.0, h - horizon))  # 0 far .. 1 near
        cx = _u(rng, -0.05 * w, 1.05 * w)
        if kind == "car":
            ch = depth * h * _u(rng, 0.35, 0.5)
            cw = ch * _u(rng, 1.8, 2.4)
            x0, y0 = cx - cw / 2, base - ch
            wheel = ch * 0.22
            colour = _CAR_COLORS[int(rng.integers(len(_CAR_COLORS)))]

            def body(d: ImageDraw.ImageDraw) -> None:
                d.rounded_rectangle([x0, y0 + 0.4 * ch, x0 + cw, base - wheel * 0.6], radius=max(1, ch * 0.12), fill=1)
                d.polygon(
                    [
                        (x0 + 0.2 * cw, y0 + 0.4 * ch),
                        (x0 + 0.3 * cw, y0),
                        (x0 + 0.72 * cw, y0),
                        (x0 + 0.85 * cw, y0 + 0.4 * ch),
                    ],
                    fill=1,
                )

            def wheels(d: ImageDraw.ImageDraw) -> None:
                for wx in (x0 + 0.2 * cw, x0 + 0.8 * cw):
                    d.ellipse([wx - wheel, base - 2 * wheel, wx + wheel, base], fill=1)

            def windows(d: ImageDraw.ImageDraw) -> None:
                d.polygon(
                    [
                        (x0 + 0.27 * cw, y0 + 0.38 * ch),
                        (x0 + 0.34 * cw, y0 + 0.08 * ch),
                        (x0 + 0.69 * cw, y0 + 0.08 * ch),
                        (x0 + 0.79 * cw, y0 + 0.38 * ch),
                    ],
                    fill=1,
                )

            s.paint(s.mask(body), CAR, s.texture(colour, 15, 8, 4, 5))
            s.paint(s.mask(windows), CAR, s.texture((45, 60, 75), 8, 10, 3, 4))
            s.paint(s.mask(wheels), CAR, s.texture((20, 20, 22), 4, 3, 3, 3))
        elif kind == "person":
            ph = depth * h * _u(rng, 0.55, 0.75)
            pw = ph * _u(rng, 0.25, 0.35)
            head = pw * 0.45
            clothes = _CLOTHES[int(rng.integers(len(_CLOTHES)))]
            s.paint(
                s.mask(lambda d: d.ellipse([cx - pw / 2, base - ph + 2 * head, cx + pw / 2, base], fill=1)),
                PERSON,
                s.texture(clothes, 15, 10, 3, 6),
            )
            s.paint(
                s.mask(lambda d: d.ellipse([cx - head, base - ph, cx + head, base - ph + 2 * head], fill=1)),
                PERSON,
                s.texture((205, 160, 130), 15, 5, 3, 5),
            )
        elif kind == "pole":
            top = _u(rng, 0.05, 0.4) * horizon
            pw = max(1.0, w * _u(rng, 0.006, 0.012))
            s.paint(
                s.mask(lambda d: d.rectangle([cx - pw / 2, top, cx + pw / 2, base], fill=1)),
                POLE,
                s.texture((125, 125, 128), 10, 4, 4, 6),
            )
            size = _u(rng, 0.05, 0.09) * h
            if rng.random() < 0.55:  # traffic sign: yellow/white warning triangle with a red rim
                tri = [
                    (cx, top - size * 0.2),
                    (cx - size * 0.6, top + size * 0.85),
                    (cx + size * 0.6, top + size * 0.85),
                ]
                s.paint(s.mask(lambda d: d.polygon(tri, fill=1)), SIGN, s.texture((200, 40, 35), 10, 4, 3, 5))
                inner = [((px - cx) * 0.6 + cx, (py - top - size * 0.45) * 0.6 + top + size * 0.45) for px, py in tri]
                s.paint(s.mask(lambda d: d.polygon(inner, fill=1)), SIGN, s.texture((235, 215, 40), 10, 4, 3, 5))
            else:  # traffic light: dark box with one lit lamp
                bw, bh = size * 0.45, size * 1.1
                s.paint(
                    s.mask(lambda d: d.rectangle([cx - bw / 2, top, cx + bw / 2, top + bh], fill=1)),
                    LIGHT,
                    s.texture((35, 35, 30), 5, 3, 3, 4),
                )
                lamp = int(rng.integers(3))
                lamp_col = ((230, 40, 30), (240, 180, 30), (60, 220, 90))[lamp]
                ly, lr = top + bh * (lamp + 0.5) / 3, bw * 0.3
                s.paint(
                    s.mask(lambda d: d.ellipse([cx - lr, ly - lr, cx + lr, ly + lr], fill=1)),
                    LIGHT,
                    s.texture(lamp_col, 10, 3, 3, 5),
                )
        else:  # clutter: an unlabeled patch of random colour (ignored in training and evaluation)
            cw_, ch_ = _u(rng, 0.03, 0.1) * w, _u(rng, 0.03, 0.1) * h
            s.paint(
                s.mask(lambda d: d.rectangle([cx, base - ch_, cx + cw_, base], fill=1)),
                UNLABELED,
                s.texture(tuple(rng.uniform(30, 220, 3)), 0, 20, 2, 15),
            )

    # Ego-vehicle bonnet at the bottom of some frames (ignored id 1).
    if rng.random() < 0.3:
        bh = h * _u(rng, 0.06, 0.12)
        s.paint(
            s.mask(lambda d: d.ellipse([-0.2 * w, h - bh, 1.2 * w, h + 2.5 * bh], fill=1)),
            EGO,
            s.texture((30, 35, 40), 6, 4, 8, 4),
        )

    # Global illumination and sensor noise.
    gain = _u(rng, 0.8, 1.15)
    img = s.img * gain + rng.normal(0, 4, (h, w, 3)).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), s.lab


def _check_args(num_train: int, num_val: int, size: Sequence[int], seed: int) -> tuple[int, int]:
    for name, v in (("num_train", num_train), ("num_val", num_val)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (height, width), got {size!r}") from None
    if h < 32 or w < 32:
        raise ValueError(f"size must be at least (32, 32) so that the objects fit, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return h, w


def generate(
    out: str,
    num_train: int = 80,
    num_val: int = 20,
    size: Sequence[int] = DEFAULT_SIZE,
    seed: int = 0,
    force: bool = False,
    color: bool = True,
    verbose: bool = False,
) -> None:
    """Writes the synthetic data set to ``out`` in the Cityscapes layout.

    Args:
        out: Output folder; must be missing or empty unless ``force`` is set.
        num_train: Number of training images (split over two cities).
        num_val: Number of validation images (split over two other cities).
        size: (height, width) of every image, at least (32, 32).
        seed: Seed; the same seed always gives byte-identical files.
        force: Allow a non-empty ``out``: its ``leftImg8bit/`` and ``gtFine/`` folders are deleted first
            (nothing else in it is touched).
        color: Also write ``*_gtFine_color.png`` (label colours) next to each label file.
        verbose: Print a summary (files written, class pixel shares).

    Raises:
        FileExistsError: ``out`` is a file, or a non-empty folder and ``force`` is False.
    """
    h, w = _check_args(num_train, num_val, size, seed)
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out!r} exists and is not a folder; pick another --out")
    if os.path.isdir(out) and os.listdir(out):
        if not force:
            raise FileExistsError(
                f"output folder {out!r} is not empty; refusing to overwrite it. Pick an empty or new --out, "
                "or pass --force (generate(..., force=True)) to replace its leftImg8bit/ and gtFine/ folders."
            )
        for sub in ("leftImg8bit", "gtFine"):
            path = os.path.join(out, sub)
            if os.path.isdir(path):
                shutil.rmtree(path)
    t0 = time.perf_counter()
    counts = np.zeros(256, dtype=np.int64)
    written = {}
    for split, n in (("train", num_train), ("val", num_val)):
        cities = SYNTHETIC_CITIES[split]
        for i in range(n):
            city = cities[0] if i < (n + 1) // 2 else cities[1]
            name = f"{city}_{i // 10:06d}_{19 + i:06d}"
            rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
            img, lab = _render(rng, h, w)
            img_dir = os.path.join(out, "leftImg8bit", split, city)
            lab_dir = os.path.join(out, "gtFine", split, city)
            os.makedirs(img_dir, exist_ok=True)
            os.makedirs(lab_dir, exist_ok=True)
            Image.fromarray(img).save(os.path.join(img_dir, name + IMAGE_SUFFIX))
            Image.fromarray(lab).save(os.path.join(lab_dir, name + LABEL_SUFFIX))
            if color:
                Image.fromarray(_ID_COLORS[lab]).save(os.path.join(lab_dir, name + COLOR_SUFFIX))
            if split == "train":
                counts += np.bincount(lab.reshape(-1), minlength=256)
        written[split] = n
    if verbose:
        dt = time.perf_counter() - t0
        print(f"wrote {written['train']} train + {written['val']} val images of {h}x{w} (HxW) to {out!r} in {dt:.1f}s:")
        print(f"  {os.path.join(out, 'leftImg8bit', '{train,val}', 'CITY', 'NAME' + IMAGE_SUFFIX)}  (RGB)")
        extra = f" (+ *{COLOR_SUFFIX})" if color else ""
        print(f"  {os.path.join(out, 'gtFine', '{train,val}', 'CITY', 'NAME' + LABEL_SUFFIX)}  (label ids){extra}")
        print(f"  cities: train {', '.join(SYNTHETIC_CITIES['train'])}; val {', '.join(SYNTHETIC_CITIES['val'])}")
        total = counts.sum()
        train_counts = np.zeros(256, dtype=np.int64)
        np.add.at(train_counts, LABEL_ID_TO_TRAIN_ID, counts)
        shares = [
            f"{CITYSCAPES_CLASSES[t]} {100 * train_counts[t] / total:.1f}%"
            for t in range(len(CITYSCAPES_CLASSES))
            if train_counts[t]
        ]
        print(f"  train pixel shares: {', '.join(shares)}, ignored (255) {100 * train_counts[255] / total:.1f}%")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m segmentation.synthetic",
        description="Write a small generated street-scene data set in the Cityscapes layout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output folder (must be missing or empty unless --force)")
    p.add_argument("--num-train", type=int_range(1), default=80)
    p.add_argument("--num-val", type=int_range(1), default=20)
    p.add_argument("--height", type=int_range(32), default=DEFAULT_SIZE[0])
    p.add_argument("--width", type=int_range(32), default=DEFAULT_SIZE[1])
    p.add_argument("--seed", type=int_range(0, 2**63 - 1), default=0)
    p.add_argument("--no-color", action="store_true", help="skip the *_gtFine_color.png visualisations")
    p.add_argument(
        "--force", action="store_true", help="allow a non-empty --out: replace its leftImg8bit/ and gtFine/ folders"
    )
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # a value out of range (argparse printed it) or --help: hand the status back
        return e.code if isinstance(e.code, int) else 2
    try:
        _check_args(args.num_train, args.num_val, (args.height, args.width), args.seed)
        generate(
            args.out,
            num_train=args.num_train,
            num_val=args.num_val,
            size=(args.height, args.width),
            seed=args.seed,
            force=args.force,
            color=not args.no_color,
            verbose=True,
        )
    except (FileExistsError, ValueError) as e:  # bad arguments or a non-empty --out
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
