"""Full-size random-weight project models (`fullsize-pixart`, `fullsize-sd`): the stand-in text stack, the real
widths, prompt-driven sampling, and load_pipeline's dispatch. The 860M-parameter SD UNet is never built here."""
import pytest
import torch
from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
from transformers import CLIPTextModel, PreTrainedTokenizerFast, T5EncoderModel

import diffptq.models.load as load_module
from diffptq.errors import UnknownModelError
from diffptq.eval.sample import generate
from diffptq.models import PIXART, PROJECT_MODELS, family_of, load_pipeline
from diffptq.models.build import VAESpec, build_vae
from diffptq.models.fullsize import SD_VAE, _text_stack, build_fullsize_pipeline, full_size_pipeline
from diffptq.models.tiny import build_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pixart():
    return build_fullsize_pipeline("fullsize-pixart", torch.float32, "cpu", num_layers=1)


def test_fullsize_pixart_has_the_real_widths_and_a_one_layer_text_stack(pixart):
    assert isinstance(pixart, PixArtAlphaPipeline) and family_of(pixart) is PIXART
    den, enc, tok = pixart.transformer, pixart.text_encoder, pixart.tokenizer
    assert isinstance(den, PixArtTransformer2DModel) and len(den.transformer_blocks) == 1
    assert den.config.caption_channels == 4096 and den.inner_dim == 1152 and den.config.sample_size == 64
    assert isinstance(enc, T5EncoderModel) and enc.config.d_model == 4096 and enc.config.num_layers == 1
    assert isinstance(tok, PreTrainedTokenizerFast) and tok.model_max_length == 120
    assert "<unk>" not in tok.convert_ids_to_tokens(tok("a red bicycle on a street").input_ids)
    # the real pipeline's defaults: 512 px with aspect-ratio bins, 120 T5 tokens, CFG 4.5
    assert den.config.sample_size * pixart.vae_scale_factor == 512
    assert PIXART.call_kwargs(pixart) == {"clean_caption": False, "use_resolution_binning": True,
                                          "max_sequence_length": 120, "guidance_scale": 4.5}
    # the denoiser is the one full_size_pipeline (prompt_embeds only) builds from the same seed
    bare = full_size_pipeline("pixart", torch.float32, "cpu", num_layers=1)
    assert bare.text_encoder is None
    assert all(torch.equal(a, b) for a, b in zip(bare.transformer.parameters(), den.parameters(), strict=True))


def test_fullsize_pixart_generates_from_prompts(pixart):
    images = generate(pixart, ["a red bicycle leaning against a brick wall", "a bowl of ripe cherries"], seeds=3,
                      batch_size=2, num_inference_steps=2, progress=False, height=64, width=64,
                      use_resolution_binning=False)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    assert float((images[0] - images[1]).abs().max()) > 0


def test_clip_stand_in_has_the_real_width():
    tok, enc = _text_stack("clip")
    assert tok.model_max_length == 77 and isinstance(enc, CLIPTextModel)
    assert enc.config.hidden_size == 768 and enc.config.num_hidden_layers == 1
    out = enc(torch.tensor([tok("a cup of coffee", padding="max_length", max_length=77).input_ids]))
    assert out.last_hidden_state.shape == (1, 77, 768)


@pytest.mark.parametrize("name", ["fullsize-pixart", "fullsize-sd"])
def test_load_pipeline_dispatches_fullsize_names(name, monkeypatch):
    calls = []

    def fake(model, dtype, device):  # stands in for the full-size build (the SD UNet alone is 860M parameters)
        calls.append((model, dtype, device))
        return build_tiny_pipeline("tiny-dit" if name.endswith("pixart") else "tiny-unet").to(dtype=dtype)

    monkeypatch.setattr(load_module, "build_fullsize_pipeline", fake)
    pipe = load_pipeline(name, dtype=torch.float64, device="cpu")
    assert calls == [(name, torch.float64, "cpu")]
    assert pipe.diffptq_source == name and not family_of(pipe).denoiser(pipe).training
    assert name in PROJECT_MODELS


def test_unknown_name_lists_the_fullsize_models():
    with pytest.raises(UnknownModelError, match="fullsize-pixart, fullsize-sd"):
        load_pipeline("pixart")
    with pytest.raises(ValueError, match="fullsize-pixart"):
        build_fullsize_pipeline("fullsize-dit", torch.float32, "cpu")


def test_full_components_have_the_real_sizes():
    """components="full": T5 v1.1 XXL's encoder, CLIP ViT-L/14's text model and the SD VAE (built on the meta device:
    4.6B parameters would not fit a test machine)."""
    with torch.device("meta"):
        t5_tok, t5 = _text_stack("t5", full=True)
        clip_tok, clip = _text_stack("clip", full=True)
        vae = build_vae(SD_VAE)

    def params(m, vocab_rows=0):
        return sum(p.numel() for p in m.parameters()) - vocab_rows

    c = t5.config
    assert (c.num_layers, c.d_model, c.num_heads, c.d_kv, c.d_ff, c.feed_forward_proj) == (
        24, 4096, 64, 64, 10240, "gated-gelu")
    assert params(t5, len(t5_tok) * 4096) == 4_762_310_656 - 32128 * 4096  # the published encoder, its vocabulary off
    assert params(clip, len(clip_tok) * 768) == 123_060_480 - 49408 * 768
    assert params(vae) == 83_653_863 and vae.config.scaling_factor == 0.18215


def test_full_components_leave_the_denoiser_unchanged(monkeypatch):
    """The real-size text encoder and VAE are drawn after the denoiser (sizes shrunk here: the draw order is what
    matters), so both component sets time the same denoiser weights."""
    import diffptq.models.fullsize as fullsize

    monkeypatch.setattr(fullsize, "SD_VAE", VAESpec(channels=(8, 16, 16, 16), norm_groups=4))
    monkeypatch.setattr(fullsize, "_text_stack", lambda style, full=False: _text_stack(style))
    full = full_size_pipeline("pixart", torch.float32, "cpu", num_layers=1, text_encoder=True, components="full")
    standin = full_size_pipeline("pixart", torch.float32, "cpu", num_layers=1, text_encoder=True)
    assert all(torch.equal(a, b) for a, b in zip(full.transformer.parameters(), standin.transformer.parameters(),
                                                  strict=True))
    assert full.vae.config.block_out_channels == (8, 16, 16, 16) != standin.vae.config.block_out_channels
    with pytest.raises(ValueError, match="standin, full"):
        full_size_pipeline("pixart", torch.float32, "cpu", num_layers=1, components="real")
