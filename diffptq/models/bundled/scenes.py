"""The scene grammar of the bundled data set: attributes, labels, captions and the caption parser.

A scene is a background colour and 1-3 objects, each in its own cell of a 2x2 grid, each with a shape, a colour
and a size. The caption lists the objects in reading order of their cells (row by row, left to right), so a scene
has exactly one caption and `parse_caption(caption(scene)) == scene` (a test checks it):

    "a large red circle at the top left and a small blue square at the bottom right on a gray background"
"""
from __future__ import annotations

from dataclasses import dataclass

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "medium", "large")
BACKGROUNDS = ("black", "gray", "white", "brown")
# cell index = 2 * row + column, rows top to bottom
POSITIONS = ("at the top left", "at the top right", "at the bottom left", "at the bottom right")
GRID = 2
NUM_CELLS = GRID * GRID
MAX_OBJECTS = 3
# the longest caption has 3 * 8 + 2 + 4 = 30 words; the tokenizer adds one or two special tokens
MAX_TOKENS = 32


class CaptionError(ValueError):
    """A caption that the scene grammar cannot produce."""


@dataclass(frozen=True, order=True)
class SceneObject:
    """One object: indices into CELLS/SHAPES/COLOURS/SIZES (cell first so that sorting gives reading order)."""

    cell: int
    shape: int
    colour: int
    size: int

    def phrase(self) -> str:
        return f"a {SIZES[self.size]} {COLOURS[self.colour]} {SHAPES[self.shape]} {POSITIONS[self.cell]}"


@dataclass(frozen=True)
class Scene:
    """A background index and 1-3 objects in distinct cells, sorted by cell."""

    background: int
    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        cells = [o.cell for o in self.objects]
        if not 1 <= len(cells) <= MAX_OBJECTS or len(set(cells)) != len(cells) or cells != sorted(cells):
            raise ValueError(f"a scene holds 1-{MAX_OBJECTS} objects in distinct cells, sorted by cell: {cells}")


def caption(scene: Scene) -> str:
    """The one caption of `scene` (lower case, words separated by single spaces, no punctuation)."""
    objects = " and ".join(o.phrase() for o in scene.objects)
    return f"{objects} on a {BACKGROUNDS[scene.background]} background"


def _index(words: tuple[str, ...], word: str, what: str, text: str) -> int:
    if word not in words:
        raise CaptionError(f"unknown {what} {word!r} in caption {text!r}; known: {', '.join(words)}")
    return words.index(word)


def parse_caption(text: str) -> Scene:
    """The scene that `caption` turns into `text`; raises CaptionError for text outside the grammar."""
    words = text.strip().lower().split()
    if len(words) < 4 or words[-4:-2] != ["on", "a"] or words[-1] != "background":
        raise CaptionError(f"caption must end with 'on a <colour> background': {text!r}")
    background = _index(BACKGROUNDS, words[-2], "background", text)
    objects = []
    for phrase in " ".join(words[:-4]).split(" and "):
        parts = phrase.split()
        if len(parts) < 6 or parts[0] != "a":
            raise CaptionError(f"object phrase must read 'a <size> <colour> <shape> <position>': {phrase!r}")
        objects.append(SceneObject(
            cell=_index(POSITIONS, " ".join(parts[4:]), "position", text),
            shape=_index(SHAPES, parts[3], "shape", text),
            colour=_index(COLOURS, parts[2], "colour", text),
            size=_index(SIZES, parts[1], "size", text),
        ))
    try:
        scene = Scene(background, tuple(objects))
    except ValueError as err:
        raise CaptionError(f"{err} in caption {text!r}") from None
    if caption(scene) != " ".join(words):
        raise CaptionError(f"caption is not in canonical form (objects in reading order): {text!r}")
    return scene


def vocabulary() -> list[str]:
    """Every word a caption can hold, sorted."""
    words = {"a", "and", "on", "background"}
    for group in (SHAPES, COLOURS, SIZES, BACKGROUNDS, POSITIONS):
        for item in group:
            words.update(item.split())
    return sorted(words)
