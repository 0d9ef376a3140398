"""The Triton kernels compiled for the H200 (CUDA sm_90) on a machine with no GPU.

Triton's interpreter (the other Triton tests) runs the kernels' Python with numpy: it checks what they
compute, not that they compile. Compiled Triton is stricter (one type for every return of a function, even
behind a constexpr branch; power-of-two blocks; shared memory per block), and no GPU may be lent to find
out. So each wrapper here runs as in the engine, but its launches go to Triton's own argument binder (the
same specialization a launch on a GPU makes: types, ints equal to 1, 16-byte alignment) and then to
triton.compile for sm_90, down to a cubin through the ptxas that ships with triton. Nothing runs.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":  # only by hand: the suite's interpreted cases run in children
    pytest.skip("compiles the kernels for a GPU, and under TRITON_INTERPRET=1 triton gives interpreted ones "
                "instead; run this file without it", allow_module_level=True)

from triton_aot import H200_SHARED_PER_BLOCK, H200_SMS, CompileForH200, random_rows  # noqa: E402

from hotcold.kernels import triton_ffn  # noqa: E402
from hotcold.kernels.qrows import QRows  # noqa: E402
from hotcold.kernels.reference import FUNCTIONS, ActivationSpec, code_name  # noqa: E402


@pytest.fixture
def compiled(monkeypatch) -> list:
    """The kernels compiled by the wrappers called in a test (each a triton CompiledKernel)."""
    out: list = []
    monkeypatch.setattr(triton_ffn, "_gate_up_kernel", CompileForH200(triton_ffn._gate_up_kernel, out))
    monkeypatch.setattr(triton_ffn, "_down_kernel", CompileForH200(triton_ffn._down_kernel, out))
    monkeypatch.setattr(triton_ffn, "_num_sms", lambda device: H200_SMS)
    return out


def _check(compiled: list, launches: int) -> None:
    assert len(compiled) == launches
    for k in compiled:
        assert k.asm.get("cubin"), k.name
        assert k.metadata.shared <= H200_SHARED_PER_BLOCK, (k.name, k.metadata.shared)


@pytest.mark.parametrize("B", [1, 3, 64])
@pytest.mark.parametrize("weights", ["bf16", "fp16", "fp32", "Q4_0", "Q4_1", "Q8_0"])
def test_ffn_kernels_compile_for_h200(compiled, weights, B):
    """The executor's launches (gated with both biases as strided views, a token mask and a device-side
    count; plain up; down with and without count) and a dense product over quantized rows."""
    H, K = 320, 48  # not a multiple of the GEMV blocks
    dtype = torch.float32 if weights.startswith("Q") else random_rows(weights, 1, 1).dtype
    x, w_up, w_gate, w_down = (torch.randn(B, H, dtype=dtype), random_rows(weights, 96, H),
                               random_rows(weights, 96, H), random_rows(weights, 96, H))
    idx, count = torch.randperm(96)[:K].int(), torch.tensor([K // 2], dtype=torch.int32)
    bias = torch.randn(96, 2, dtype=dtype)
    h = triton_ffn.gathered_gate_up(x, w_up, idx, "reglu", w_gate, bias[:, 1], torch.rand(B, K) < 0.5,
                                    gate_bias=bias[:, 0], count=count)
    triton_ffn.gathered_gate_up(x, w_up, idx.long(), "relu2")
    triton_ffn.gathered_down(h, w_down, idx, dtype, count=count)
    triton_ffn.gathered_down(h, w_down, idx.long(), dtype)
    _check(compiled, 4)
    if isinstance(w_up, QRows):
        triton_ffn.gathered_gate_up(x, w_up, w_up.all_ids(), ActivationSpec(False, "identity", "identity"))
        _check(compiled, 5)


@pytest.mark.parametrize("code", sorted(FUNCTIONS.values()))
def test_every_activation_compiles_for_h200(compiled, code):
    x, w = torch.randn(1, 256, dtype=torch.bfloat16), torch.randn(64, 256, dtype=torch.bfloat16)
    fn = code_name(code)
    triton_ffn.gathered_gate_up(x, w, torch.arange(64), ActivationSpec(True, fn, "identity"), w)
    triton_ffn.gathered_gate_up(x, w, torch.arange(64), ActivationSpec(False, "identity", fn))
    _check(compiled, 2)


def test_block_sizes_are_checked(compiled):
    """A block size compiled Triton cannot take is one ValueError, before anything compiles."""
    x, q = torch.randn(1, 256), random_rows("Q4_0", 8, 256)
    with pytest.raises(ValueError, match="power of two, at least 32"):
        triton_ffn.gathered_gate_up(x, q, torch.arange(8), "relu", block_h=16)
    with pytest.raises(ValueError, match="power of two"):
        triton_ffn.gathered_down(torch.randn(1, 8), random_rows("bf16", 8, 256), torch.arange(8), block_h=48)
    assert compiled == []
