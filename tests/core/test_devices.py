"""Device choice for single-process jobs (evaluate / export) and the CUDA kernel settings."""

from __future__ import annotations

import pytest
import torch

from hllm.distributed import configure_cuda_kernels, single_device


def test_unknown_device_names_the_setting():
    with pytest.raises(ValueError, match=r"eval\.device must be auto, cpu or cuda, got 'gpu'"):
        single_device("gpu")


def test_cpu_is_always_cpu():
    assert single_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without a GPU gives")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"eval\.device=cuda but no CUDA device is visible"):
        single_device("cuda")
    assert single_device("auto") == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_picks_the_gpu_without_cudnn_attention(monkeypatch):
    monkeypatch.delenv("HLLM_CUDNN_SDPA", raising=False)
    torch.backends.cuda.enable_cudnn_sdp(True)
    assert single_device("auto").type == "cuda"
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    monkeypatch.setenv("HLLM_CUDNN_SDPA", "1")
    configure_cuda_kernels()
    assert torch.backends.cuda.cudnn_sdp_enabled()
