import math

import torch

from diffptq.tdq.fourier import FourierFeatures, fourier_features, fourier_frequencies


def test_shape_and_values():
    ff = FourierFeatures(n_freqs=3)
    c = torch.tensor([-1.0, 0.0, 0.5])
    out = ff(c)
    assert ff.out_dim == 7 and out.shape == (3, 7)
    freqs = [math.pi / 2, math.pi, 2 * math.pi]
    for i, ci in enumerate(c.tolist()):
        expected = [ci] + [math.sin(f * ci) for f in freqs] + [math.cos(f * ci) for f in freqs]
        torch.testing.assert_close(out[i], torch.tensor(expected))


def test_scalar_input_and_buffer():
    ff = FourierFeatures(n_freqs=2)
    assert ff(torch.tensor(0.3)).shape == (1, 5)
    assert "freqs" in dict(ff.named_buffers()) and not list(ff.parameters())
    torch.testing.assert_close(fourier_frequencies(4), torch.tensor([0.5, 1.0, 2.0, 4.0]) * math.pi)


def test_lowest_frequency_separates_range_ends():
    f = fourier_features(torch.tensor([-1.0, 1.0]), fourier_frequencies(1))
    assert float(f[0, 1]) == -float(f[1, 1]) == -1.0  # sin(∓π/2): the ends differ, not alias
