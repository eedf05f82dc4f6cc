"""CLIP score through torchmetrics' CLIPScore on a tiny CLIP saved with save_pretrained; an absent model is skipped."""
import logging
import math
import string

import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from diffptq.eval.metrics import clip_score, clip_score_metric


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A CLIPModel with a tiny random CLIPConfig + character-level CLIP tokenizer + 32px image processor."""
    path = tmp_path_factory.mktemp("tiny_clip")
    chars = list(string.ascii_lowercase + string.digits)
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    layer = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab), "max_position_embeddings": 77, "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"], "pad_token_id": vocab["<|endoftext|>"], **layer,
        },
        vision_config={"image_size": 32, "patch_size": 8, **layer},
        projection_dim=8,
    )
    torch.manual_seed(0)  # module-scoped: set up before the autouse per-test seed
    model = CLIPModel(config)
    with torch.no_grad():  # a shared embedding direction in both towers: cosines > 0 (CLIPScore clamps at 0)
        model.vision_model.post_layernorm.bias.fill_(2.0)
        model.text_model.final_layer_norm.bias.fill_(2.0)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    model.save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def test_clip_score_of_a_local_model_is_finite(tiny_clip_dir):
    metric = clip_score_metric(str(tiny_clip_dir))
    assert metric is not None
    images = torch.rand(3, 3, 48, 48)
    prompts = ["a red cube", "two cats on a mat", "x" * 200]  # the last is longer than 77 tokens: truncated
    score = clip_score(metric, images, prompts, batch_size=2)
    assert math.isfinite(score) and 0.0 < score < 100.0
    assert clip_score(metric, (images * 255).round().to(torch.uint8), prompts) == pytest.approx(score, abs=1e-3)


def test_clip_score_changes_with_the_prompt(tiny_clip_dir):
    metric = clip_score_metric(str(tiny_clip_dir))
    images = torch.rand(4, 3, 32, 32)
    scores = {clip_score(metric, images, [p] * 4) for p in ("abc", "zzz yy", "q7", "hello world")}
    assert len(scores) > 1 and min(scores) > 0  # text actually reaches the model


def test_missing_clip_model_gives_none_and_says_where(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert clip_score_metric("openai/clip-vit-not-cached") is None
        assert clip_score_metric(str(tmp_path)) is None
    lines = [r.message for r in caplog.records if "clip_score" in r.message]
    assert len(lines) == 2
    assert "openai/clip-vit-not-cached" in lines[0] and "HF cache" in lines[0] and "clip_model" in lines[0]
    assert str(tmp_path) in lines[1] and "directory" in lines[1]


def test_clip_score_needs_one_prompt_per_image(tiny_clip_dir):
    metric = clip_score_metric(str(tiny_clip_dir))
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(metric, torch.rand(2, 3, 32, 32), ["only one"])
