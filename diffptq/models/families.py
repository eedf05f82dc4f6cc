"""Model families: where a denoiser's blocks are, which modules are quantizable, and the unrolled forward.

A family describes one kind of denoiser so that no other code hard-codes module paths:
- `pixart`: PixArtAlphaPipeline, denoiser `transformer`, blocks `transformer.transformer_blocks[i]`.
- `sd`: StableDiffusionPipeline, denoiser `unet`, blocks `unet.down_blocks[i]`, `unet.mid_block`, `unet.up_blocks[i]`.
The forward is split into `prologue -> run_block(k) for each block -> epilogue`, which together compute exactly what
`denoiser(**inputs).sample` computes (a test checks it); `units()` splits the blocks further for the sequential
driver (diffptq.models.units), with the same result. Between blocks the state is `(h, skips)`: `h` the main
hidden tensor, `skips` the UNet's skip tensors that later up blocks consume (empty for PixArt). Everything else a
block needs (timestep embedding, text states, masks) lives in a context dict computed once by the prologue from the
float model; embedders, patch/conv_in and the final projections stay in float and are never quantized.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from diffptq.models.units import Unit, unet_block_units

QUANTIZABLE_TYPES = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class ModelFamily:
    """One denoiser family. `default_model` is the hub id the scripts of this family default to."""

    name: str
    pipeline_class: str
    denoiser_attr: str
    default_model: str
    text_tokens: int
    text_dim: int

    def denoiser(self, pipe) -> nn.Module:
        return getattr(pipe, self.denoiser_attr)

    def blocks(self, denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
        """The sequential quantization units, in forward order, as (qualified name, module)."""
        if self.name == "pixart":
            return [(f"transformer_blocks.{i}", b) for i, b in enumerate(denoiser.transformer_blocks)]
        units = [(f"down_blocks.{i}", b) for i, b in enumerate(denoiser.down_blocks)]
        if denoiser.mid_block is not None:
            units.append(("mid_block", denoiser.mid_block))
        units += [(f"up_blocks.{i}", b) for i, b in enumerate(denoiser.up_blocks)]
        return units

    def units(self, denoiser: nn.Module, fine: bool = True) -> list[Unit]:
        """The sequential driver's units in forward order: one per block, or (`fine`) the UNet's blocks split into
        their ResNets, transformer blocks and resamplers where diffptq.models.units knows the block type. PixArt's
        transformer blocks are single units either way."""
        units: list[Unit] = []
        for k, (name, block) in enumerate(self.blocks(denoiser)):
            parts = unet_block_units(denoiser, k, name, block) if (fine and self.name == "sd") else None
            if parts is None:
                reads = len(block.resnets) if (self.name == "sd" and name.startswith("up_blocks.")) else 0
                parts = [Unit(name, block, k, partial(self.run_block, denoiser, k), reads)]
            units += parts
        return units

    def quantizable_layers(self, block: nn.Module, skip: tuple[str, ...] = ()) -> list[tuple[str, nn.Module]]:
        """Linear/Conv2d modules of one block in registration order (≈ forward order), minus `skip` patterns."""
        return [
            (name, mod) for name, mod in block.named_modules()
            if isinstance(mod, QUANTIZABLE_TYPES) and not any(fnmatch.fnmatch(name, p) for p in skip)
        ]

    def block_layer_names(self, denoiser: nn.Module) -> list[str]:
        """Qualified names in `denoiser` of the quantizable layers of every block, blocks in forward order: the
        layers the project quantizes (embedders, patch/conv_in and the final projections are not among them)."""
        return [f"{b}.{n}" for b, block in self.blocks(denoiser) for n, _ in self.quantizable_layers(block)]

    def call_kwargs(self, pipe) -> dict:
        """Extra keyword arguments for calling the pipeline so that it runs offline at the model's own size."""
        defaults = dict(getattr(pipe, "diffptq_sampling", {}))  # a model's own recommended settings
        if self.name != "pixart":
            return defaults
        # PixArt's aspect-ratio bins exist for 256/512/1024/2048 px with its 8x VAE only
        pixels = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        standard = pipe.vae_scale_factor == 8 and pixels in (256, 512, 1024, 2048)
        return {"clean_caption": False, "use_resolution_binning": standard,
                "max_sequence_length": min(120, pipe.tokenizer.model_max_length) if pipe.tokenizer else 120,
                **defaults}

    # ---- unrolled forward ---------------------------------------------------------------------------------
    def prologue(self, denoiser: nn.Module, inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor], dict]:
        """Everything before block 0. `inputs`: the denoiser's keyword arguments. Returns (h, skips, context)."""
        return _pixart_prologue(denoiser, inputs) if self.name == "pixart" else _unet_prologue(denoiser, inputs)

    def run_block(self, denoiser: nn.Module, index: int, h: torch.Tensor, skips: list[torch.Tensor],
                  ctx: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run block `index` (into `blocks()`) on state (h, skips). Returns the next state; `skips` is not mutated."""
        if self.name == "pixart":
            block = denoiser.transformer_blocks[index]
            h = block(h, attention_mask=ctx["amask"], encoder_hidden_states=ctx["ehs"],
                      encoder_attention_mask=ctx["emask"], timestep=ctx["t_mod"], cross_attention_kwargs=None,
                      class_labels=None)
            return h, skips
        return _unet_run_block(denoiser, index, h, skips, ctx)

    def epilogue(self, denoiser: nn.Module, h: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Everything after the last block: the denoiser's output tensor."""
        return _pixart_epilogue(denoiser, h, ctx) if self.name == "pixart" else _unet_epilogue(denoiser, h)

    def forward_unrolled(self, denoiser: nn.Module, inputs: dict, fine: bool = False) -> torch.Tensor:
        """prologue, every unit (`units(denoiser, fine)`), epilogue: equals denoiser(**inputs).sample."""
        h, skips, ctx = self.prologue(denoiser, inputs)
        for unit in self.units(denoiser, fine):
            h, skips = unit.run(h, skips, ctx)
        return self.epilogue(denoiser, h, ctx)


PIXART = ModelFamily("pixart", "PixArtAlphaPipeline", "transformer", "PixArt-alpha/PixArt-XL-2-512x512", 120, 4096)
SD = ModelFamily("sd", "StableDiffusionPipeline", "unet", "stable-diffusion-v1-5/stable-diffusion-v1-5", 77, 768)
FAMILIES = {f.name: f for f in (PIXART, SD)}


def family_of(pipe_or_denoiser) -> ModelFamily:
    """The family of a pipeline or denoiser module (also one wrapped as `.denoiser`, e.g. a GraphedDenoiser)."""
    obj = pipe_or_denoiser
    parts = [obj] + [getattr(obj, attr) for attr in ("transformer", "unet") if getattr(obj, attr, None) is not None]
    parts += [m._modules["denoiser"] for m in parts if isinstance(m, nn.Module) and "denoiser" in m._modules]
    names = {type(m).__name__ for m in parts}
    if names & {"PixArtAlphaPipeline", "PixArtTransformer2DModel"}:
        return PIXART
    if names & {"StableDiffusionPipeline", "UNet2DConditionModel"}:
        return SD
    raise ValueError(f"no diffptq model family for {sorted(names)}; supported: PixArt-alpha and Stable Diffusion")


def _mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.ndim != 2:
        return mask
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


def _pixart_prologue(tr: nn.Module, inputs: dict):
    x = inputs["hidden_states"]
    batch = x.shape[0]
    hw = (x.shape[-2] // tr.config.patch_size, x.shape[-1] // tr.config.patch_size)
    h = tr.pos_embed(x)
    t_mod, t_emb = tr.adaln_single(inputs["timestep"], inputs.get("added_cond_kwargs"), batch_size=batch,
                                   hidden_dtype=h.dtype)
    ehs = inputs["encoder_hidden_states"]
    if tr.caption_projection is not None:
        ehs = tr.caption_projection(ehs).view(batch, -1, h.shape[-1])
    ctx = {"ehs": ehs, "emask": _mask_to_bias(inputs.get("encoder_attention_mask"), h.dtype),
           "amask": _mask_to_bias(inputs.get("attention_mask"), h.dtype), "t_mod": t_mod, "t_emb": t_emb, "hw": hw}
    return h, [], ctx


def _pixart_epilogue(tr: nn.Module, h: torch.Tensor, ctx: dict) -> torch.Tensor:
    shift, scale = (tr.scale_shift_table[None] + ctx["t_emb"][:, None]).chunk(2, dim=1)
    h = tr.norm_out(h) * (1 + scale) + shift
    h = tr.proj_out(h).squeeze(1)
    p, (hh, ww) = tr.config.patch_size, ctx["hw"]
    h = h.reshape(-1, hh, ww, p, p, tr.out_channels)
    h = torch.einsum("nhwpqc->nchpwq", h)
    return h.reshape(-1, tr.out_channels, hh * p, ww * p)


def _unet_prologue(unet: nn.Module, inputs: dict):
    sample = inputs["sample"]
    up_factor = 2 ** unet.num_upsamplers
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    t_emb = unet.get_time_embed(sample=sample, timestep=inputs["timestep"])
    emb = unet.time_embedding(t_emb, inputs.get("timestep_cond"))
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    ehs = unet.process_encoder_hidden_states(encoder_hidden_states=inputs["encoder_hidden_states"],
                                             added_cond_kwargs=inputs.get("added_cond_kwargs"))
    h = unet.conv_in(sample)
    ctx = {"emb": emb, "ehs": ehs, "emask": _mask_to_bias(inputs.get("encoder_attention_mask"), h.dtype),
           "forward_upsample_size": any(d % up_factor != 0 for d in sample.shape[-2:])}
    return h, [h], ctx


def _unet_run_block(unet: nn.Module, index: int, h, skips, ctx):
    n_down = len(unet.down_blocks)
    has_mid = unet.mid_block is not None
    cross = {"encoder_hidden_states": ctx["ehs"], "encoder_attention_mask": ctx["emask"]}
    if index < n_down:
        block = unet.down_blocks[index]
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=ctx["emb"], **cross)
        else:
            h, res = block(hidden_states=h, temb=ctx["emb"])
        return h, list(skips) + list(res)
    if has_mid and index == n_down:
        block = unet.mid_block
        if getattr(block, "has_cross_attention", False):
            return block(h, ctx["emb"], **cross), skips
        return block(h, ctx["emb"]), skips
    up_index = index - n_down - int(has_mid)
    block = unet.up_blocks[up_index]
    n = len(block.resnets)
    res, rest = tuple(skips[-n:]), list(skips[:-n])
    is_final = up_index == len(unet.up_blocks) - 1
    upsample_size = rest[-1].shape[2:] if (not is_final and ctx["forward_upsample_size"]) else None
    if getattr(block, "has_cross_attention", False):
        h = block(hidden_states=h, temb=ctx["emb"], res_hidden_states_tuple=res, upsample_size=upsample_size,
                  **cross)
    else:
        h = block(hidden_states=h, temb=ctx["emb"], res_hidden_states_tuple=res, upsample_size=upsample_size)
    return h, rest


def _unet_epilogue(unet: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if unet.conv_norm_out:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)
