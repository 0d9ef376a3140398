"""Triton kernels compiled for the H200 (CUDA sm_90) on a machine with no GPU: a stand-in for a @triton.jit
kernel whose launches go through Triton's own argument binder (the specialization a launch on a GPU makes:
types, ints equal to 1, 16-byte alignment) and then triton.compile, down to a cubin through the ptxas that
ships with triton. Nothing runs. Used by tests/test_triton_compile.py and benchmarks/triton_sass.py."""

from __future__ import annotations

import torch
import triton

from hotcold.kernels.qrows import QRows

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


def random_rows(kind: str, rows: int, cols: int) -> torch.Tensor | QRows:
    """Random weight rows as a kernel takes them: a float tensor, or quantized rows of `kind` (codes, scales)."""
    if kind in ("bf16", "fp16", "fp32"):
        return torch.randn(rows, cols, dtype={"bf16": torch.bfloat16, "fp16": torch.float16,
                                              "fp32": torch.float32}[kind])
    codes = torch.randint(0, 255, (rows, cols if kind == "Q8_0" else cols // 2), dtype=torch.uint8)
    scales = torch.rand(rows, cols // 32).half()
    return QRows(codes.view(torch.int8) if kind == "Q8_0" else codes, scales,
                 scales.clone() if kind == "Q4_1" else None, kind)
