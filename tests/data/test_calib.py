"""Calibration collection: shapes, step coverage, CFG branches, shared text states; prompt files."""
import pytest
import torch

from diffptq.data.calib import collect_calibration
from diffptq.data.prompts import load_prompts
from diffptq.errors import PromptFileError
from diffptq.models import load_pipeline


def test_bundled_prompts_are_many_and_distinct():
    prompts = load_prompts()
    assert len(prompts) >= 200 and len(set(prompts)) == len(prompts)
    assert load_prompts(n=5) == prompts[:5]
    assert len(load_prompts(n=len(prompts) + 3)) == len(prompts) + 3


def test_prompt_file_errors(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n\n")
    with pytest.raises(PromptFileError, match="holds no prompt"):
        load_prompts(empty)


@pytest.mark.parametrize("name,latent_key", [("tiny-dit", "hidden_states"), ("tiny-unet", "sample")])
def test_collection_covers_every_step_with_both_cfg_branches(name, latent_key):
    pipe = load_pipeline(name)
    prompts = ["a red cat", "a blue cup", "a dog"]
    calib = collect_calibration(pipe, prompts, num_inference_steps=3, batch_size=2, progress=False)
    pipe.scheduler.set_timesteps(3)
    expected_t = [float(t) for t in pipe.scheduler.timesteps]
    assert len(calib) == 2 * 3  # two prompt batches × three steps
    assert calib.timesteps() == expected_t * 2
    assert [r.step for r in calib.records] == [0, 1, 2] * 2
    sizes = [2, 2, 2, 1, 1, 1]
    for rec, n in zip(calib.records, sizes):
        lat = rec.inputs[latent_key]
        assert lat.shape == (2 * n, 4, 8, 8) and lat.device.type == "cpu"  # CFG doubles the batch
        assert rec.inputs["encoder_hidden_states"].shape[0] == 2 * n
    # text states are stored once per prompt batch, not once per step
    first = calib.records[0].inputs["encoder_hidden_states"]
    assert calib.records[1].inputs["encoder_hidden_states"] is first
    # the two CFG branches differ (unconditional vs prompt)
    assert not torch.equal(first[0], first[2])
    assert calib.prompts == prompts
