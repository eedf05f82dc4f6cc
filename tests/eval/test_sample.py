"""Fixed-seed generation: one seed per image, independent of batching and of sharding over processes.

"The same image" means the same up to float rounding: a batched matmul may round differently for another batch
size (measured: <= 5e-7 on [0, 1] pixels), while another seed changes pixels by ~0.7.
"""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffptq.eval.sample import generate, image_seeds, shard_range
from diffptq.models import load_pipeline

PROMPTS = ["a red bicycle leaning against a brick wall", "a cup of coffee on a wooden table",
           "a golden retriever running on a sandy beach", "a lighthouse on a rocky coast", "a bowl of ripe cherries"]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) < 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny-dit")  # in eval mode: no dropout drawing on the global RNG


@pytest.fixture(scope="module")
def reference(pipe):
    return generate(pipe, PROMPTS, seeds=7, batch_size=2, num_inference_steps=2, progress=False)


def test_shard_ranges_cover_the_prompts_in_order():
    for n in range(0, 9):
        for world in range(1, 5):
            shards = [shard_range(n, world, r) for r in range(world)]
            assert [i for s in shards for i in s] == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert list(shard_range(5, 2, 0)) == [0, 1, 2] and list(shard_range(5, 2, 1)) == [3, 4]
    with pytest.raises(ValueError):
        shard_range(4, 2, 2)


def test_image_seeds():
    assert image_seeds(3, 10) == [10, 11, 12]


def test_images_are_the_same_whatever_the_batch_size(pipe, reference):
    assert reference.shape == (5, 3, 16, 16) and reference.dtype == torch.float32
    assert 0.0 <= float(reference.min()) and float(reference.max()) <= 1.0
    for batch_size in (1, 5):
        again = generate(pipe, PROMPTS, seeds=7, batch_size=batch_size, num_inference_steps=2, progress=False)
        assert same(again, reference), batch_size
    # an image depends on its own seed only: a sub-list with the same seeds gives the same images
    part = generate(pipe, PROMPTS[1:3], seeds=[8, 9], batch_size=2, num_inference_steps=2, progress=False)
    assert same(part, reference[1:3])
    other = generate(pipe, PROMPTS[:2], seeds=[100, 101], batch_size=2, num_inference_steps=2, progress=False)
    assert float((other - reference[:2]).abs().max()) > 0.1


def test_two_process_sharding_with_a_fake_state(pipe, reference):
    """Each fake process makes its contiguous slice; the gather puts the slices together in process order."""
    made = {}

    def run(rank, others):
        state = SimpleNamespace(num_processes=2, process_index=rank, is_main_process=rank == 0)

        def gather(parts):
            made[rank] = parts[0]
            return [parts[0] if r == rank else others[r] for r in range(2)]
        return generate(pipe, PROMPTS, seeds=7, batch_size=2, num_inference_steps=2, accelerator=state,
                        progress=False, gather=gather)

    full1 = run(1, {0: reference[:3]})
    assert same(made[1], reference[3:]) and torch.equal(full1[:3], reference[:3]) and torch.equal(full1[3:], made[1])
    full0 = run(0, {1: made[1]})
    assert same(made[0], reference[:3]) and torch.equal(full0[:3], made[0]) and torch.equal(full0[3:], made[1])


def test_uint8_images_are_rounded_per_process_before_the_gather(pipe, reference):
    """uint8=True: each process sends its 8-bit images (what as_uint8 makes of the float ones)."""
    from diffptq.eval.metrics.common import as_uint8

    sent = {}

    def gather(parts):
        sent["dtype"] = parts[0].dtype
        return [parts[0], as_uint8(reference[3:])]

    state = SimpleNamespace(num_processes=2, process_index=0, is_main_process=True)
    images = generate(pipe, PROMPTS, seeds=7, batch_size=2, num_inference_steps=2, accelerator=state,
                      progress=False, gather=gather, uint8=True)
    assert sent["dtype"] == torch.uint8 and images.dtype == torch.uint8
    assert int((images.int() - as_uint8(reference).int()).abs().max()) <= 1  # float rounding may cross a level
    alone = generate(pipe, PROMPTS[:1], seeds=7, num_inference_steps=2, progress=False, uint8=True)
    assert alone.dtype == torch.uint8 and torch.equal(alone, images[:1])


def test_seed_count_must_match(pipe):
    with pytest.raises(ValueError, match="seeds"):
        generate(pipe, PROMPTS[:2], seeds=[1], num_inference_steps=1, progress=False)


SCRIPT = """
import sys, torch
from accelerate import PartialState
from diffptq.eval.sample import generate
from diffptq.models import load_pipeline
torch.set_num_threads(1)
state = PartialState(cpu=True)
pipe = load_pipeline("tiny-dit")
images = generate(pipe, {prompts!r}, seeds=7, batch_size=2, num_inference_steps=2, accelerator=state, progress=False)
if state.is_main_process:
    torch.save(images, sys.argv[1])
"""


TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun not installed beside this python")
def test_two_real_processes_over_gloo(tmp_path, reference):
    """torchrun --nproc_per_node 2 (what accelerate launch --multi_gpu does) on the CPU: gloo gathers the shards."""
    script = tmp_path / "shard.py"
    script.write_text(SCRIPT.format(prompts=PROMPTS))
    res = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "images.pt")],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert same(torch.load(tmp_path / "images.pt"), reference)
