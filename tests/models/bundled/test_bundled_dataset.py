"""The procedural scenes: determinism by seed, and the caption parser inverting the caption generator."""
import numpy as np
import pytest
import torch

from diffptq.models.build import build_word_tokenizer
from diffptq.models.bundled.dataset import render, sample_scenes, scene_batch
from diffptq.models.bundled.scenes import (
    MAX_OBJECTS,
    MAX_TOKENS,
    CaptionError,
    Scene,
    SceneObject,
    caption,
    parse_caption,
    vocabulary,
)


def test_same_seed_same_scenes_and_images():
    a, b, c = sample_scenes(48, seed=5), sample_scenes(48, seed=5), sample_scenes(48, seed=6)
    assert a.captions() == b.captions() and a.captions() != c.captions()
    assert np.array_equal(a.jitter, b.jitter)
    img_a, img_b = render(a), render(b)
    assert img_a.shape == (48, 3, 64, 64) and img_a.dtype == torch.float32
    assert torch.equal(img_a, img_b) and 0.0 <= img_a.min() and img_a.max() <= 1.0


def test_scene_statistics():
    batch = sample_scenes(3000, seed=1)
    counts = batch.valid.sum(1)
    assert set(np.unique(counts)) == {1, 2, 3}
    for i in range(len(batch)):  # distinct cells, sorted
        cells = batch.cell[i, : counts[i]]
        assert len(set(cells)) == len(cells) and list(cells) == sorted(cells)
    assert len(np.unique(batch.shape[batch.valid])) == 5 and len(np.unique(batch.colour[batch.valid])) == 6


def test_parser_inverts_generator():
    batch = sample_scenes(2000, seed=2)
    for scene, text in zip(batch.scenes(), batch.captions()):
        assert parse_caption(text) == scene
        assert caption(parse_caption(text)) == text
    # labels built from parsed captions render the same objects
    again = scene_batch([parse_caption(t) for t in batch.captions()[:50]])
    assert again.captions() == batch.captions()[:50]
    expected = batch.cell_targets()
    for key, value in again.cell_targets().items():
        assert np.array_equal(value, expected[key][:50])


def test_cell_targets_match_scenes():
    batch = sample_scenes(200, seed=3)
    targets = batch.cell_targets()
    for i, scene in enumerate(batch.scenes()):
        assert targets["background"][i] == scene.background
        assert targets["present"][i].sum() == len(scene.objects)
        for obj in scene.objects:
            assert (targets["shape"][i, obj.cell], targets["colour"][i, obj.cell], targets["size"][i, obj.cell]) == (
                obj.shape, obj.colour, obj.size)


def test_example_caption_and_errors():
    text = "a large red circle at the top left and a small blue square at the bottom right on a gray background"
    scene = parse_caption(text)
    assert scene == Scene(1, (SceneObject(0, 0, 0, 2), SceneObject(3, 1, 2, 0)))
    for bad in ("a large red circle at the top left", "a huge red circle at the top left on a gray background",
                "a small blue square in the center on a gray background",
                "a small blue square at the bottom right and a large red circle at the top left on a gray background",
                "a large red circle at the top left and a small blue square at the top left on a gray background"):
        with pytest.raises(CaptionError):
            parse_caption(bad)


@pytest.mark.parametrize("style", ["t5", "clip"])
def test_captions_fit_the_tokenizer(style):
    tok = build_word_tokenizer(vocabulary(), style, MAX_TOKENS)
    batch = sample_scenes(500, seed=4)
    longest = max(batch.captions(), key=len)
    ids = tok(batch.captions(), padding="longest").input_ids
    assert len(ids[0]) <= MAX_TOKENS and tok.unk_token_id not in np.asarray(ids)
    assert len(tok(longest).input_ids) <= MAX_TOKENS
    assert MAX_OBJECTS == 3
