"""Base-model loading: what it changes in the process for the device it loads to."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from app.ml.loading import load_base_model  # noqa: E402


@pytest.fixture
def cudnn_attention_on():
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield
    torch.backends.cuda.enable_cudnn_sdp(True)  # PyTorch's default, for the tests after


@pytest.mark.usefixtures("cudnn_attention_on")
def test_loading_to_cuda_takes_cudnn_out_of_attention(tiny_model_dir, monkeypatch):
    # No GPU here: the move itself is skipped, everything before it runs as on a GPU host.
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: self)
    model = load_base_model(tiny_model_dir, device="cuda")
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert model.dtype == torch.bfloat16


@pytest.mark.usefixtures("cudnn_attention_on")
def test_loading_to_cpu_leaves_attention_backends_alone(tiny_model_dir):
    load_base_model(tiny_model_dir, device="cpu")
    assert torch.backends.cuda.cudnn_sdp_enabled()
