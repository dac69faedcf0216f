"""QC pictures, which MONAI does not draw: three slices through each hippocampus with the mask outlined."""

from __future__ import annotations

import os

import numpy as np
from scripts.labels import CROP_LABELS, HEAD_LABELS

OUTLINE_COLOURS = ((228, 26, 28), (255, 217, 47), (55, 126, 184), (77, 175, 74))  # labels 1-4


def draw_qc_png(image_file: str, mask_file: str, png_file: str, margin_mm: float = 10.0, height: int = 180) -> None:
    """Three orthogonal slices (RAS) with each label outlined, each the one holding most of the hippocampus: for a
    crop, of the whole crop; for a head, a row per side, each cut to its hippocampus's box and `margin_mm` around it,
    so that the hippocampus fills its picture. Each row is `height` pixels high, in millimetres' proportions. Drawn
    with Pillow (matplotlib took 0.13 s a picture, about as long as segmenting a crop)."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation
    from PIL import Image, ImageDraw
    from scripts.data.transforms import image_reader

    load = LoadImage(image_only=True)
    to_ras = Compose([EnsureChannelFirst(), Orientation("RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))])
    image, labels = (to_ras(load(f, image_reader(f))) for f in (image_file, mask_file))
    spacing = np.linalg.norm(np.asarray(labels.affine)[:3, :3], axis=0)
    image, labels = np.asarray(image[0], dtype=np.float32), np.asarray(labels[0], dtype=np.uint8)
    sides = (
        [(f"{side}, ", side_labels) for side, side_labels in HEAD_LABELS.items()]
        if labels.max() > 2
        else [("", tuple(CROP_LABELS.values()))]
    )
    rows = []
    for name, side_labels in sides:
        inside = np.isin(labels, side_labels)
        box = (slice(None),) * 3
        if name and inside.any():
            margin = np.ceil(margin_mm / spacing).astype(int)
            corners = np.argwhere(inside)
            box = tuple(slice(max(a - m, 0), b + m + 1) for a, b, m in zip(corners.min(0), corners.max(0), margin))
        picture, outline = image[box], labels[box]
        counted = np.isin(outline, side_labels) if inside.any() else outline > 0
        centre = [int(np.argmax(counted.sum(axis=tuple(a for a in range(3) if a != axis)))) for axis in range(3)]
        low, high = np.percentile(picture, [1, 99.5])
        panels = []
        for axis, title in enumerate(("sagittal", "coronal", "axial")):
            # rows from the top (superior or anterior) down, columns from the subject's posterior or left
            plane = np.take(picture, centre[axis], axis).T[::-1]
            contour = np.take(outline, centre[axis], axis).T[::-1]
            across, up = (s for a, s in enumerate(spacing) if a != axis)
            size = (max(1, round(height * plane.shape[1] * across / (plane.shape[0] * up))), height)
            grey = np.clip((plane - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)
            pixels = np.asarray(Image.fromarray(grey).resize(size, Image.BILINEAR).convert("RGB")).copy()
            drawn = np.asarray(Image.fromarray(contour).resize(size, Image.NEAREST))
            edge = drawn > 0
            edge[1:-1, 1:-1] &= ~(
                (drawn[1:-1, 1:-1] == drawn[:-2, 1:-1])
                & (drawn[1:-1, 1:-1] == drawn[2:, 1:-1])
                & (drawn[1:-1, 1:-1] == drawn[1:-1, :-2])
                & (drawn[1:-1, 1:-1] == drawn[1:-1, 2:])
            )
            for label, colour in enumerate(OUTLINE_COLOURS, start=1):
                pixels[edge & (drawn == label)] = colour
            panel = Image.fromarray(pixels)
            ImageDraw.Draw(panel).text((4, 2), f"{name}{title} {centre[axis] + (box[axis].start or 0)}", fill="white")
            panels.append(panel)
        rows.append(panels)
    gap = 6
    width = max(sum(p.width for p in panels) + gap * (len(panels) - 1) for panels in rows)
    sheet = Image.new("RGB", (width, 18 + len(rows) * (height + gap)), "white")
    ImageDraw.Draw(sheet).text((4, 3), os.path.basename(mask_file), fill="black")
    for row, panels in enumerate(rows):
        x = 0
        for panel in panels:
            sheet.paste(panel, (x, 18 + row * (height + gap)))
            x += panel.width + gap
    os.makedirs(os.path.dirname(png_file), exist_ok=True)
    sheet.save(png_file, compress_level=1)  # zlib's default level took 60% of a picture's time
