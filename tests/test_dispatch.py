import pytest
import torch

import fastrm._dispatch as dispatch
from fastrm import kernels


def test_torch_is_always_torch():
    assert dispatch.resolve_backend("torch", torch.device("cpu"), "op") == "torch"


def test_auto_is_torch_on_cpu():
    assert dispatch.resolve_backend("auto", torch.device("cpu"), "op") == "torch"


def test_auto_is_triton_on_cuda_unless_float64(monkeypatch):
    monkeypatch.setattr(kernels, "HAS_TRITON", True)
    cuda = torch.device("cuda")
    assert dispatch.resolve_backend("auto", cuda, "op", torch.bfloat16) == "triton"
    assert dispatch.resolve_backend("auto", cuda, "op", torch.float64) == "torch"
    with pytest.raises(TypeError, match="op: backend='triton' needs logits of dtype"):
        dispatch.resolve_backend("triton", cuda, "op", torch.float64, "logits")


def test_auto_on_cuda_without_triton_warns_and_uses_torch(monkeypatch):
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    monkeypatch.setattr(dispatch, "_warned_no_triton", False)
    with pytest.warns(UserWarning, match="triton is not installed"):
        assert dispatch.resolve_backend("auto", torch.device("cuda"), "op") == "torch"
    with pytest.raises(RuntimeError, match="needs the triton package"):
        dispatch.resolve_backend("triton", torch.device("cuda"), "op")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(kernels, "HAS_TRITON", True)
    monkeypatch.setattr(kernels, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.resolve_backend("triton", torch.device("cpu"), "my_op")
    monkeypatch.setattr(kernels, "INTERPRET", True)
    assert dispatch.resolve_backend("triton", torch.device("cpu"), "my_op") == "triton"


def test_unknown_backend_and_env_default(monkeypatch):
    with pytest.raises(ValueError, match="my_op: backend must be one of"):
        dispatch.resolve_backend("gpu", torch.device("cpu"), "my_op")
    monkeypatch.setenv("FASTRM_BACKEND", "torch")
    assert dispatch.resolve_backend(None, torch.device("cuda"), "op") == "torch"
    monkeypatch.setenv("FASTRM_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTRM_BACKEND must be one of"):
        dispatch.resolve_backend(None, torch.device("cpu"), "op")
