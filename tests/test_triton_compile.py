"""The Triton kernels compiled for the H200 (CUDA sm_90) on a machine with no GPU.

Triton's interpreter (the other Triton tests) runs the kernels' Python with numpy: it checks what they
compute, not that they compile. Compiled Triton is stricter (one type for every return of a function, even
behind a constexpr branch; power-of-two blocks; shared memory per block), and no GPU may be lent to find
out. So each wrapper here runs as in the engine, but its launches go to Triton's own argument binder (the
same specialization a launch on a GPU makes: types, ints equal to 1, 16-byte alignment) and then to
triton.compile for sm_90, down to a cubin through the ptxas that ships with triton. Nothing runs.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from hotcold.kernels import triton_ffn  # noqa: E402
from hotcold.kernels.qrows import QRows  # noqa: E402
from hotcold.kernels.reference import FUNCTIONS, ActivationSpec, code_name  # noqa: E402

H200_SMS = 132
H200_SHARED_PER_BLOCK = 227 * 1024  # opt-in maximum of shared memory per block on sm_90


class CompileForH200:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kw)` compiles for sm_90, launches nothing."""

    def __init__(self, kernel, compiled: list) -> None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        self.kernel, self.compiled = kernel, compiled
        self.target = GPUTarget("cuda", 90, 32)
        self.backend = make_backend(self.target)
        self.binder = create_function_from_signature(kernel.signature, kernel.params, self.backend)

    def __getitem__(self, grid):
        assert all(g >= 1 for g in grid), grid

        def launch(*args, **kw):
            from triton.compiler import ASTSource

            bound, specialization, options = self.binder(*args, **kw)
            options, signature, constexprs, attrs = self.kernel._pack_args(self.backend, kw, bound,
                                                                           specialization, options)
            compiled = triton.compile(ASTSource(self.kernel, signature, constexprs, attrs), target=self.target,
                                      options=options.__dict__)
            self.compiled.append(compiled)

        return launch


@pytest.fixture
def compiled(monkeypatch) -> list:
    """The kernels compiled by the wrappers called in a test (each a triton CompiledKernel)."""
    out: list = []
    monkeypatch.setattr(triton_ffn, "_gate_up_kernel", CompileForH200(triton_ffn._gate_up_kernel, out))
    monkeypatch.setattr(triton_ffn, "_down_kernel", CompileForH200(triton_ffn._down_kernel, out))
    monkeypatch.setattr(triton_ffn, "_num_sms", lambda device: H200_SMS)
    return out


def _weights(kind: str, rows: int, cols: int) -> torch.Tensor | QRows:
    if kind in ("bf16", "fp16", "fp32"):
        return torch.randn(rows, cols, dtype={"bf16": torch.bfloat16, "fp16": torch.float16,
                                              "fp32": torch.float32}[kind])
    codes = torch.randint(0, 255, (rows, cols if kind == "Q8_0" else cols // 2), dtype=torch.uint8)
    scales = torch.rand(rows, cols // 32).half()
    return QRows(codes.view(torch.int8) if kind == "Q8_0" else codes, scales,
                 scales.clone() if kind == "Q4_1" else None, kind)


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
    H, K = 320, 48  # neither a multiple of the blocks
    dtype = torch.float32 if weights.startswith("Q") else _weights(weights, 1, 1).dtype
    x, w_up, w_gate, w_down = (torch.randn(B, H, dtype=dtype), _weights(weights, 96, H),
                               _weights(weights, 96, H), _weights(weights, 96, H))
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
