"""The same numbers on a GPU as on the CPU (runs where CUDA is present; CI has no GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dinofeat_server.engine.classical import weka_features
from dinofeat_server.engine.deep import PRESETS, DeepExtractor
from tiny_vit import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def test_classical_bank_on_the_gpu_equals_the_cpu():
    image = torch.rand(1, 1, 300, 280)
    cpu = weka_features(image)
    gpu = weka_features(image.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ["fast", "default", "paper"])
def test_deep_features_in_bf16_on_the_gpu_match_fp32_on_the_cpu(preset):
    image = np.random.default_rng(0).random((120, 150)).astype(np.float32)
    model = tiny_model()
    cpu = DeepExtractor(model, torch.device("cpu")).features(image, PRESETS[preset])
    gpu = DeepExtractor(tiny_model(), torch.device("cuda")).features(image, PRESETS[preset])
    assert F.cosine_similarity(gpu, cpu, dim=0).mean() > 0.99
