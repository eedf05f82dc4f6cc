"""The procedural data set: scenes sampled with numpy (deterministic by seed), drawn with torch on any device.

`sample_scenes(n, seed)` draws the labels (a `SceneBatch` of arrays); `render(batch)` draws the images
(float (N,3,S,S) in [0,1]) by anti-aliased signed distances, batched, so the GPU makes 100k images a second;
`batch.captions()` gives the words and `batch.scenes()` the structured labels.
Objects sit in distinct cells of a 2x2 grid, jittered a little inside their cell; the background has a faint
linear shading of random direction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffptq.models.bundled.scenes import (
    BACKGROUNDS,
    COLOURS,
    GRID,
    MAX_OBJECTS,
    NUM_CELLS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    caption,
)

IMAGE_SIZE = 64
COLOUR_RGB = np.array([(220, 40, 40), (40, 170, 60), (40, 90, 230), (235, 215, 40), (150, 60, 200), (245, 140, 30)],
                      dtype=np.float32) / 255.0
BACKGROUND_RGB = np.array([(25, 25, 25), (128, 128, 128), (235, 235, 235), (110, 75, 50)], dtype=np.float32) / 255.0
SIZE_FRACTION = (0.4, 0.6, 0.82)  # object extent as a fraction of the cell side
JITTER_FRACTION = 0.1  # largest centre offset as a fraction of the cell side (less where the object fills the cell)
SHADE_AMPLITUDE = 0.08  # background brightness varies by +-8% across the image
assert len(COLOUR_RGB) == len(COLOURS) and len(BACKGROUND_RGB) == len(BACKGROUNDS) and len(SIZE_FRACTION) == len(SIZES)


@dataclass
class SceneBatch:
    """Labels of N scenes as arrays. Object slots beyond a scene's count have `valid` False.

    background: (N,) int; cell, shape, colour, size: (N, MAX_OBJECTS) int; valid: (N, MAX_OBJECTS) bool;
    jitter: (N, MAX_OBJECTS, 2) float in [-1, 1] (x, y; scaled by the renderer); shade: (N, 2) float in [-1, 1].
    Valid slots come first, sorted by cell.
    """

    background: np.ndarray
    cell: np.ndarray
    shape: np.ndarray
    colour: np.ndarray
    size: np.ndarray
    valid: np.ndarray
    jitter: np.ndarray
    shade: np.ndarray

    def __len__(self) -> int:
        return len(self.background)

    def scenes(self) -> list[Scene]:
        out = []
        for i in range(len(self)):
            objs = tuple(SceneObject(int(self.cell[i, k]), int(self.shape[i, k]), int(self.colour[i, k]),
                                     int(self.size[i, k])) for k in range(MAX_OBJECTS) if self.valid[i, k])
            out.append(Scene(int(self.background[i]), objs))
        return out

    def captions(self) -> list[str]:
        return [caption(s) for s in self.scenes()]

    def cell_targets(self) -> dict[str, np.ndarray]:
        """Per-cell labels for the evaluator: present (N,4) int 0/1; shape, colour, size (N,4) int, -1 where empty;
        background (N,) int."""
        n = len(self)
        out = {"present": np.zeros((n, NUM_CELLS), np.int64), "background": self.background.astype(np.int64)}
        for key in ("shape", "colour", "size"):
            out[key] = np.full((n, NUM_CELLS), -1, np.int64)
        rows, slots = np.nonzero(self.valid)
        cells = self.cell[rows, slots]
        out["present"][rows, cells] = 1
        for key in ("shape", "colour", "size"):
            out[key][rows, cells] = getattr(self, key)[rows, slots]
        return out


def sample_scenes(n: int, seed: int) -> SceneBatch:
    """N random scenes: 1-3 objects (uniform), distinct cells, uniform attributes; deterministic given `seed`."""
    rng = np.random.default_rng(seed)
    count = rng.integers(1, MAX_OBJECTS + 1, n)
    cell = np.argsort(rng.random((n, NUM_CELLS)), axis=1)[:, :MAX_OBJECTS]
    valid = np.arange(MAX_OBJECTS)[None, :] < count[:, None]
    cell = np.where(valid, cell, NUM_CELLS + 1)  # empty slots sort last
    order = np.argsort(cell, axis=1)
    cell = np.take_along_axis(cell, order, axis=1)
    cell = np.where(valid, cell, 0)
    return SceneBatch(
        background=rng.integers(0, len(BACKGROUNDS), n),
        cell=cell,
        shape=rng.integers(0, len(SHAPES), (n, MAX_OBJECTS)),
        colour=rng.integers(0, len(COLOURS), (n, MAX_OBJECTS)),
        size=rng.integers(0, len(SIZES), (n, MAX_OBJECTS)),
        valid=valid,
        jitter=rng.uniform(-1.0, 1.0, (n, MAX_OBJECTS, 2)),
        shade=rng.uniform(-1.0, 1.0, (n, 2)),
    )


def scene_batch(scenes: list[Scene], seed: int = 0) -> SceneBatch:
    """A SceneBatch holding `scenes` (e.g. parsed from captions), with jitter and shading drawn from `seed`."""
    n = len(scenes)
    batch = sample_scenes(n, seed)
    for i, scene in enumerate(scenes):
        batch.background[i] = scene.background
        batch.valid[i] = False
        batch.cell[i] = batch.shape[i] = batch.colour[i] = batch.size[i] = 0
        for k, obj in enumerate(scene.objects):
            batch.valid[i, k] = True
            batch.cell[i, k], batch.shape[i, k], batch.colour[i, k], batch.size[i, k] = (
                obj.cell, obj.shape, obj.colour, obj.size)
    return batch


def _shape_sdf(shape: int, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance in pixels (negative inside) of SHAPES[shape]; u, v: (M,S,S) offsets from the centre
    (v points down); r: (M,1,1) half the object extent."""
    au, av = u.abs(), v.abs()
    name = SHAPES[shape]
    if name == "circle":
        return torch.sqrt(u * u + v * v) - r
    if name == "square":
        return torch.maximum(au, av) - 0.85 * r
    if name == "diamond":
        return (au + av - 1.05 * r) * 0.7071
    if name == "triangle":  # pointing up: apex at -r, base at +0.75 r
        base = 0.75 * r
        norm = torch.sqrt((base + r) ** 2 + r * r)
        return torch.maximum(v - base, (au * (base + r) - (v + r) * r) / norm)
    if name == "cross":
        arm = 0.34 * r
        return torch.minimum(torch.maximum(au - r, av - arm), torch.maximum(au - arm, av - r))
    raise ValueError(f"no distance function for shape {name!r}")


def render(batch: SceneBatch, device: str | torch.device = "cpu", image_size: int = IMAGE_SIZE,
           chunk: int = 4096) -> torch.Tensor:
    """Images of `batch`: float32 (N, 3, S, S) in [0, 1] on `device`, drawn `chunk` scenes at a time."""
    return torch.cat([_render_chunk(batch, slice(i, i + chunk), torch.device(device), image_size)
                      for i in range(0, len(batch), chunk)])


def _render_chunk(batch: SceneBatch, sl: slice, device: torch.device, s: int) -> torch.Tensor:
    def t(a: np.ndarray, dtype=torch.float32) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a[sl]), dtype=dtype, device=device)

    cell_px = s / GRID
    coords = torch.arange(s, device=device, dtype=torch.float32) + 0.5
    ys, xs = coords.view(1, 1, s, 1), coords.view(1, 1, 1, s)
    # background with a linear shading
    shade = t(batch.shade)
    ramp = shade[:, 0, None, None] * (xs[0] / s - 0.5) + shade[:, 1, None, None] * (ys[0] / s - 0.5)
    bg_rgb = torch.as_tensor(BACKGROUND_RGB, device=device)[t(batch.background, torch.long)]
    img = bg_rgb[:, :, None, None] * (1.0 + 2 * SHADE_AMPLITUDE * ramp[:, None])
    # objects, (N, K) parameters
    cell, size_idx = t(batch.cell, torch.long), t(batch.size, torch.long)
    extent = torch.as_tensor(SIZE_FRACTION, device=device)[size_idx] * cell_px
    max_jitter = torch.clamp((cell_px - extent) / 2, max=JITTER_FRACTION * cell_px)
    jitter = t(batch.jitter) * max_jitter[..., None]
    cx = ((cell % GRID).float() + 0.5) * cell_px + jitter[..., 0]
    cy = ((cell // GRID).float() + 0.5) * cell_px + jitter[..., 1]
    # coverage of each object slot, (N*K, S, S); each shape's distance is computed on its own objects only
    shape, valid = t(batch.shape, torch.long).flatten(), t(batch.valid, torch.bool).flatten()
    cx, cy, half = cx.flatten()[:, None, None], cy.flatten()[:, None, None], extent.flatten()[:, None, None] / 2
    alpha = torch.zeros(len(shape), s, s, device=device)
    for k in range(len(SHAPES)):
        idx = torch.nonzero(valid & (shape == k)).flatten()
        if len(idx):
            sdf = _shape_sdf(k, (xs[0] - cx[idx]).expand(-1, s, s), ys[0] - cy[idx], half[idx])
            alpha[idx] = (0.5 - sdf).clamp(0.0, 1.0)
    alpha = alpha.view(-1, MAX_OBJECTS, s, s)
    rgb = torch.as_tensor(COLOUR_RGB, device=device)[t(batch.colour, torch.long)]  # (N, K, 3)
    for k in range(alpha.shape[1]):
        a = alpha[:, k, None]
        img = img * (1 - a) + rgb[:, k, :, None, None] * a
    return img.clamp(0.0, 1.0)
