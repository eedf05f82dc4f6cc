"""FID's real loader: torch-fidelity's Inception-v3 architecture with random weights saved in the real file format."""
import logging
import math

import pytest
import torch
from torch import nn

from diffptq.eval.metrics import INCEPTION_WEIGHTS, fid_feature_dim, frechet_distance, inception_fid_metric


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's FeatureExtractorInceptionV3 with random init: its state_dict saved as the real file name."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS
    cls = tf_inception.FeatureExtractorInceptionV3
    with pytest.MonkeyPatch.context() as patch:  # build the architecture without loading (or downloading) weights
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(cls, "load_state_dict", lambda self, *a, **k: None)
        net = cls("inception-v3-compat", ["2048"])
    for module in net.modules():  # keep activations from vanishing through 17 random layers
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


def test_inception_fid_loads_a_weights_file_and_uses_2048_features(inception_weights, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: the path option must be what is used
    metric = inception_fid_metric(inception_weights)
    assert metric is not None
    assert fid_feature_dim(metric) == 2048
    images = torch.rand(2, 3, 32, 32)  # the fewest FID takes: Inception runs at 299 px, a 2048-d FID is slow on CPU
    with caplog.at_level(logging.WARNING):
        shifted = frechet_distance(metric, (images * 0.3).clamp(0, 1), images)
    assert shifted is not None and math.isfinite(shifted) and shifted > 0
    assert any("2048 features" in r.message for r in caplog.records)


def test_inception_fid_finds_weights_in_the_torch_hub_cache(inception_weights, tmp_path, monkeypatch):
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / INCEPTION_WEIGHTS).symlink_to(inception_weights)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    metric = inception_fid_metric()
    assert metric is not None and fid_feature_dim(metric) == 2048


def test_missing_inception_weights_give_none_and_name_the_file(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert inception_fid_metric() is None
    lines = [r.message for r in caplog.records if "fid" in r.message]
    assert len(lines) == 1
    assert INCEPTION_WEIGHTS in lines[0] and "fid_weights" in lines[0]
