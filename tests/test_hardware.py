"""The ``dtype: auto`` rule: bf16 only where the hardware computes it natively."""

from __future__ import annotations

import pytest

from embedforge import hardware


@pytest.fixture
def flags(monkeypatch):
    """Pretend the CPU reports the given flags; clears the cached answer around each use."""
    def set_flags(found: set[str], machine: str = "x86_64"):
        monkeypatch.delenv("EMBEDFORGE_CPU_BF16", raising=False)
        monkeypatch.setattr(hardware, "_cpu_flags", lambda: found)
        monkeypatch.setattr(hardware.platform, "machine", lambda: machine)
        hardware.cpu_has_native_bf16.cache_clear()

    yield set_flags
    hardware.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize("found, machine, expected", [
    ({"avx2", "fma"}, "x86_64", "float32"),                      # AMD EPYC / older Xeon: emulated bf16
    ({"avx2", "avx512f", "avx512bw"}, "x86_64", "float32"),      # AVX-512 without the bf16 extension
    ({"avx512f", "avx512_bf16"}, "x86_64", "bfloat16"),          # Cooper Lake, Zen 4
    ({"avx512f", "amx_tile", "amx_bf16"}, "x86_64", "bfloat16"),  # Sapphire Rapids
    ({"asimd", "sve", "bf16"}, "aarch64", "bfloat16"),           # Graviton 3
    ({"asimd"}, "aarch64", "float32"),                           # Graviton 2
])
def test_auto_on_cpu_follows_native_bf16(flags, found, machine, expected):
    flags(found, machine)
    assert hardware.resolve_dtype("auto", "cpu") == expected
    assert hardware.describe()["auto_dtype_cpu"] == expected


def test_explicit_dtypes_pass_through_and_env_override(flags, monkeypatch):
    flags({"avx2"})
    for d in ("float32", "bfloat16", "float16"):
        assert hardware.resolve_dtype(d, "cpu") == d
    monkeypatch.setenv("EMBEDFORGE_CPU_BF16", "1")
    hardware.cpu_has_native_bf16.cache_clear()
    assert hardware.resolve_dtype("auto") == "bfloat16"
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        hardware.resolve_dtype("fp8")


def test_auto_on_gpu_is_bf16_without_torch_cuda(flags):
    flags({"avx2"})
    assert hardware.resolve_dtype("auto", "cuda:0") in ("bfloat16", "float16")


def test_every_engine_and_encoder_defaults_to_auto():
    from actors.cipher_agent import CipherAgentConfig
    from actors.embedder import EmbedderConfig
    from actors.llm_engine import LLMEngineConfig
    from workflows.synthesize.config import TranslationConfig

    for cfg in (LLMEngineConfig(), EmbedderConfig(), CipherAgentConfig(), TranslationConfig()):
        assert cfg.dtype == "auto", type(cfg).__name__


def test_real_engine_and_embedder_use_the_resolved_dtype(llm_engine, minilm_path):
    """The running vLLM engine and a real embedder report what ``auto`` picks on this machine."""
    from actors.embedder import Embedder

    expected = hardware.resolve_dtype("auto", "cpu")
    assert llm_engine.dtype == expected
    emb = Embedder({"model": minilm_path})
    assert emb.dtype == expected
    assert str(next(emb.model.parameters()).dtype) == f"torch.{expected}"
