"""Gathered FFN kernels (reference, CPU path, Triton) against a float64 reference written here.

The Triton kernels run in Triton's interpreter in a child pytest (see test_triton_under_interpreter), so
this process never switches triton into interpreter mode. Native CUDA tests are marked `gpu`.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from interpreted import INTERPRETED, run_interpreter_cases

import hotcold.kernels as kernels
from hotcold.kernels import calibrate, cpu_sparse, native, reference

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # interpreter exp()

# activation -> (gate function or None when not gated, up function); independent of kernels.ACTIVATIONS
SPECS = {
    "swiglu": ("silu", "identity"),
    "reglu": ("relu", "identity"),
    "drelu": ("relu", "relu"),
    "geglu": ("gelu", "identity"),
    "geglu_tanh": ("gelu_tanh", "identity"),
    "fatrelu": ("fatrelu", "identity"),  # threshold 0 here; tests/test_published_archs.py sets one
    "relu": (None, "relu"),
    "relu2": (None, "relu2"),
    "gelu": (None, "gelu"),
    "gelu_tanh": (None, "gelu_tanh"),
}


def f64(name: str, v: torch.Tensor) -> torch.Tensor:
    if name == "identity":
        return v
    if name == "silu":
        return v / (1.0 + torch.exp(-v))
    if name == "relu":
        return torch.where(v > 0, v, 0.0)
    if name == "fatrelu":
        return torch.where(v >= 0, v, 0.0)
    if name == "relu2":
        return torch.where(v > 0, v * v, 0.0)
    if name == "gelu":
        return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
    raise AssertionError(name)


def ref_gate_up(x, w_up, idx, activation, w_gate=None, bias=None, mask=None, gate_bias=None):
    """float64; x rounded to the weights' dtype first (the kernels' contract)."""
    gate_fn, up_fn = SPECS[activation]
    xd = x.to(w_up.dtype).double()
    rows = idx.long()
    u = xd @ w_up.double()[rows].T
    if bias is not None:
        u = u + bias.double()[rows]
    h = f64(up_fn, u)
    if gate_fn is not None:
        g = xd @ w_gate.double()[rows].T
        if gate_bias is not None:
            g = g + gate_bias.double()[rows]
        h = f64(gate_fn, g) * h
    if mask is not None:
        h = torch.where(mask, h, 0.0)
    return h


def ref_down(h, w_down_t, idx):
    hd = h.to(w_down_t.dtype).double()
    return hd @ w_down_t.double()[idx.long()]


def make(I, H, B, K, dtype, activation, bias=False, mask=False, packed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    gated = SPECS[activation][0] is not None
    if packed:
        wgu = torch.randn(I, 2, H, generator=g).to(dtype)
        w_gate, w_up = wgu[:, 0], wgu[:, 1]
    else:
        w_up = torch.randn(I, H, generator=g).to(dtype)
        w_gate = torch.randn(I, H, generator=g).to(dtype)
    x = torch.randn(B, H, generator=g).to(dtype) * 0.5
    idx = torch.randperm(I, generator=g)[:K]
    return dict(
        x=x, w_up=w_up, idx=idx, activation=activation, w_gate=w_gate if gated else None,
        up_bias=torch.randn(I, generator=g).to(dtype) if bias else None,
        token_mask=torch.rand(B, K, generator=g) > 0.3 if mask else None,
        gate_bias=torch.randn(I, generator=g).to(dtype) if bias and gated else None,
    )


def check(out, ref, tol, dtype=torch.float32, floor=1e-6):
    """Max error <= tol * max(|ref|max, floor): a floor of ~1 where a few outputs can cancel to near 0."""
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "unwritten (poisoned) or non-finite elements"
    scale = ref.abs().max().item() if ref.numel() else 1.0
    err = (out.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= tol * max(scale, floor), f"max error {err:.3g} > {tol} * {scale:.3g}"


def gate_up_ref(a):
    return ref_gate_up(a["x"], a["w_up"], a["idx"], a["activation"], a["w_gate"], a["up_bias"], a["token_mask"],
                       a.get("gate_bias"))


def call_gate_up(fn, a, **kw):
    if a.get("gate_bias") is not None:
        kw["gate_bias"] = a["gate_bias"]
    return fn(a["x"], a["w_up"], a["idx"], a["activation"], a["w_gate"], a["up_bias"], a["token_mask"], **kw)


@pytest.fixture
def poison(monkeypatch):
    """Make every buffer a module allocates itself NaN-filled."""

    def apply(module):
        def empty(shape, dtype, device):
            return torch.full(shape, float("nan"), dtype=dtype, device=device)

        monkeypatch.setattr(module, "_empty", empty)

    return apply


def test_activation_table_is_covered():
    assert set(kernels.ACTIVATIONS) == set(SPECS)
    for name, (gate_fn, up_fn) in SPECS.items():
        spec = kernels.ACTIVATIONS[name]
        assert spec.gated == (gate_fn is not None) and spec.up_fn == up_fn


# ---------------------------------------------------------------- torch reference and CPU path

@pytest.mark.parametrize("activation", sorted(SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_and_cpu_every_activation(activation, dtype, poison):
    poison(cpu_sparse)
    a = make(96, 40, 2, 61, dtype, activation, bias=True, mask=True)  # 2 tokens
    ref = gate_up_ref(a)
    check(call_gate_up(reference.gathered_gate_up, a), ref, 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # torch's matmul rounds 16-bit products' sums
    native_here = calibrate.max_native_tokens(dtype) >= 2  # the calibration picks the path on this machine
    check(call_gate_up(cpu_sparse.gathered_gate_up, a), ref, 1e-5 if native_here else tol)  # native: fp32 sums
    config = cpu_sparse.CpuConfig(chunk_bytes=1000, chunk_bytes_16bit=1000, use_native=False)  # chunks + tail
    check(call_gate_up(cpu_sparse.gathered_gate_up, a, config=config), ref, tol)
    assert (call_gate_up(cpu_sparse.gathered_gate_up, a)[~a["token_mask"]] == 0).all()


@pytest.mark.parametrize("B", [1, 2, 5, 16])
@pytest.mark.parametrize("K", [0, 1, 77, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_cpu_shapes_and_layouts(B, K, dtype, packed, poison):
    poison(cpu_sparse)
    I, H = 130, 72
    a = make(I, H, B, K, dtype, "swiglu", mask=B > 1, packed=packed, seed=K + B)
    if packed:
        assert cpu_sparse._packed_view(a["w_gate"], a["w_up"]) is not None
    for config in (cpu_sparse.CpuConfig(), cpu_sparse.CpuConfig(use_native=False),
                   cpu_sparse.CpuConfig(2000, 2000, ebag_max_batch=1, use_native=False)):
        exact = dtype == torch.float32 or (config.use_native and B <= calibrate.max_native_tokens(dtype))
        tol = 1e-5 if exact else 2e-2
        h = call_gate_up(cpu_sparse.gathered_gate_up, a, config=config)
        check(h, gate_up_ref(a), tol, floor=1.0)  # K = 1: one product of 72-term sums
        w_down_t = torch.randn(I, H).to(dtype)
        for out_dtype in (torch.float32, dtype):
            y = cpu_sparse.gathered_down(h, w_down_t, a["idx"], out_dtype, config=config)
            check(y, ref_down(h, w_down_t, a["idx"]), tol if out_dtype == torch.float32 else 1e-2, out_dtype)
            check(reference.gathered_down(h, w_down_t, a["idx"], out_dtype),
                  ref_down(h, w_down_t, a["idx"]), 1e-5 if out_dtype == torch.float32 else 1e-2, out_dtype)


@pytest.mark.parametrize("B", [1, 3])
def test_cpu_down_split_across_threads(B):
    """embedding_bag splits one token's sum into a bag per thread; the partials must add up."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        for K in (1, 9, 40, 101):
            h, w, idx = torch.randn(B, K), torch.randn(120, 24), torch.randperm(120)[:K]
            y = cpu_sparse.gathered_down(h, w, idx, config=cpu_sparse.CpuConfig(min_bag=8, use_native=False))
            check(y, ref_down(h, w, idx), 1e-5)
    finally:
        torch.set_num_threads(threads)


def test_native_kernels_are_built_here():
    """The suite must test the native kernels, not silently the torch fallback."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.fail("no C compiler: the native CPU kernels cannot be built (install gcc)")
    assert native.load() is not None
    assert native.supports(torch.zeros(4, 8), torch.zeros(4, 8, dtype=torch.bfloat16))
    assert not native.supports(torch.zeros(4, 8, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_strided_rows_and_bad_ids(dtype):
    """Rows with a stride (one half of the interleaved layout alone), and ids out of range: an error, no read."""
    torch.manual_seed(1)
    packed = torch.randn(30, 2, 37).to(dtype)
    x, idx = torch.randn(2, 37), torch.tensor([29, 0, 5, 5])
    got = native.gathered_dots(packed[:, 1], 1, idx, x.to(dtype).float())[..., 0]
    want = x.to(dtype).double() @ packed[idx, 1].double().T
    check(got, want, 1e-5)
    h = torch.randn(2, 4)
    check(native.gathered_axpy(packed[:, 0], idx, h), h.double() @ packed[idx, 0].double(), 1e-5)
    for bad in ([30], [-1], [3, 1000000]):
        with pytest.raises(IndexError, match="neuron ids"):
            native.gathered_dots(packed, 2, torch.tensor(bad), x)
        with pytest.raises(IndexError, match="neuron ids"):
            native.gathered_axpy(packed[:, 0], torch.tensor(bad), torch.randn(2, len(bad)))


def test_huge_pages_keep_the_contents():
    t = torch.randn(3 << 20)  # 12 MiB: several 2 MiB pages inside
    before = t.clone()
    ok = native.use_huge_pages(t)
    assert isinstance(ok, bool) and torch.equal(t, before)
    assert not native.use_huge_pages(torch.randn(10))  # no whole 2 MiB page inside


def test_native_can_be_switched_off():
    out = _run_python("from hotcold.kernels import native; print(native.load())", {"HOTCOLD_NATIVE": "0"})
    assert out.strip() == "None"


def test_int32_ids_and_unsorted_repeats():
    a = make(50, 24, 2, 0, torch.float32, "relu2", bias=True)
    a["idx"] = torch.tensor([7, 3, 49, 0, 7, 12], dtype=torch.int32)
    h = call_gate_up(kernels.gathered_gate_up, a)
    check(h, gate_up_ref(a), 1e-5)
    w = torch.randn(50, 24)
    check(kernels.gathered_down(h, w, a["idx"]), ref_down(h, w, a["idx"]), 1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_gathered_equals_dense_when_all_active(activation):
    torch.manual_seed(0)
    I, H, B = 64, 48, 3
    a = make(I, H, B, I, torch.float32, activation, bias=activation == "gelu")
    a["idx"] = torch.arange(I)
    w_down_t, down_bias = torch.randn(I, H), torch.randn(H)
    dense = cpu_sparse.dense_ffn(a["x"], a["w_up"], activation, a["w_gate"], a["up_bias"], w_down_t, down_bias)
    want = ref_down(gate_up_ref(a), w_down_t, a["idx"]) + down_bias.double()
    check(dense, want, 1e-5)
    sparse = kernels.gathered_down(call_gate_up(kernels.gathered_gate_up, a), w_down_t, a["idx"]) + down_bias
    check(sparse, want, 1e-5)


def test_bad_arguments_raise_value_errors():
    a = make(20, 8, 2, 5, torch.float32, "swiglu")
    bad = [
        dict(activation="tanh"),
        dict(w_gate=None),
        dict(x=torch.randn(2, 9)),
        dict(idx=a["idx"].float()),
        dict(token_mask=torch.ones(2, 4, dtype=torch.bool)),
        dict(up_bias=torch.randn(3)),
        dict(gate_bias=torch.randn(3)),
        dict(idx=a["idx"].to("meta")),  # tensors on two devices
    ]
    for change in bad:
        with pytest.raises(ValueError):
            call_gate_up(kernels.gathered_gate_up, {**a, **change})
    with pytest.raises(ValueError):
        kernels.gathered_down(torch.randn(2, 4), torch.randn(20, 8), a["idx"])
    with pytest.raises(ValueError):
        call_gate_up(kernels.gathered_gate_up, a, backend="fast")


def test_dispatcher_backends(monkeypatch):
    a = make(40, 16, 2, 9, torch.float32, "reglu", mask=True)
    assert kernels.resolve_backend("auto", torch.device("cpu")) is cpu_sparse
    assert kernels.resolve_backend("reference", torch.device("cpu")) is reference
    check(call_gate_up(kernels.gathered_gate_up, a, backend="reference"), gate_up_ref(a), 1e-5)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        call_gate_up(kernels.gathered_gate_up, a, backend="triton")


def _run_python(code: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_import_without_triton():
    no_triton = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, hotcold.kernels as k\n"
        "assert not k.triton_available()\n"
        "x, w = torch.randn(2, 8), torch.randn(10, 8)\n"
        "print(k.gathered_gate_up(x, w, torch.tensor([1, 4]), 'relu').shape)\n"
    )
    assert "torch.Size([2, 2])" in _run_python(no_triton, {})


# ---------------------------------------------------------------- Triton, interpreted
# Triton reads TRITON_INTERPRET when it is first imported (its own tl.* helpers are jitted then), so the
# interpreter cases run in a child pytest on this file with the variable set from the start; the parent
# process keeps the normal JIT for anything that imports triton after us.


def test_triton_under_interpreter():
    run_interpreter_cases(__file__, min_passed=25, timeout=300)


if INTERPRETED:
    from hotcold.kernels import triton_ffn as tri

    @pytest.mark.parametrize("activation", sorted(SPECS))
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_interp_every_activation(activation, dtype, poison):
        poison(tri)
        a = make(40, 24, 2, 29, dtype, activation, bias=True, mask=True, seed=3)
        check(call_gate_up(tri.gathered_gate_up, a, block_k=8, block_h=16), gate_up_ref(a), 1e-5)

    # (B, K, dtype, blocks): GEMV path for B < 5, tl.dot above; K = 0, K = I, tails in K, H and B
    TRITON_CASES = [
        (1, 37, torch.float32, dict(block_k=16, block_h=16)),
        (1, 0, torch.bfloat16, {}),
        (3, 50, torch.bfloat16, dict(block_k=16, block_h=32)),
        (6, 37, torch.bfloat16, dict(block_k=16, block_h=16)),
        (6, 50, torch.float16, {}),
        (17, 23, torch.float32, dict(block_k=16, block_h=32)),
        (2, 1, torch.float32, {}),
    ]

    @pytest.mark.parametrize("B,K,dtype,blocks", TRITON_CASES)
    def test_interp_shapes(B, K, dtype, blocks, poison):
        poison(tri)
        I, H = 50, 40
        a = make(I, H, B, K, dtype, "swiglu", mask=B > 1, seed=B * 100 + K)
        h = call_gate_up(tri.gathered_gate_up, a, **blocks)
        check(h, gate_up_ref(a), 1e-5)
        w_down_t = torch.randn(I, H).to(dtype)
        # the interpreter's fp32 -> bf16 cast does not round to nearest even (CUDA does): feed h that is
        # exact in the weights' dtype, so only the kernel's arithmetic is under test here
        h = h.to(dtype).float()
        want = ref_down(h, w_down_t, a["idx"])
        for splits in (1, 3):
            check(tri.gathered_down(h, w_down_t, a["idx"], splits=splits, **blocks), want, 1e-5)
        check(tri.gathered_down(h, w_down_t, a["idx"], dtype), want, 1e-2, dtype)

    def test_interp_strided_packed_views(poison):
        poison(tri)
        a = make(30, 24, 2, 17, torch.float32, "geglu", packed=True, mask=True, seed=7)
        check(call_gate_up(tri.gathered_gate_up, a, block_k=8, block_h=16), gate_up_ref(a), 1e-5)

    def test_interp_dispatcher_triton_backend():
        a = make(30, 20, 3, 4, torch.float32, "relu", bias=True)
        assert kernels.resolve_backend("triton", torch.device("cpu")) is tri
        h = call_gate_up(kernels.gathered_gate_up, a, backend="triton")
        check(h, gate_up_ref(a), 1e-5)
        w_down_t = torch.randn(30, 20)
        check(kernels.gathered_down(h, w_down_t, a["idx"], backend="triton"), ref_down(h, w_down_t, a["idx"]), 1e-5)
        assert kernels.resolve_backend("auto", torch.device("cpu")) is cpu_sparse


# ---------------------------------------------------------------- Triton, native CUDA

@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 4, 16, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("activation", ["swiglu", "relu", "geglu"])
def test_triton_native_cuda(B, dtype, activation):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: native kernels cannot run")
    from hotcold.kernels import triton_ffn

    I, H = 1100, 4096 if B < 40 else 576
    for K in (0, 1, 333, I):
        a = make(I, H, B, K, dtype, activation, bias=activation == "relu", mask=B > 1, seed=K)
        cuda = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in a.items()}
        h = call_gate_up(kernels.gathered_gate_up, cuda)
        check(h.cpu(), gate_up_ref(a), 1e-4)
        w_down_t = torch.randn(I, H).to(dtype)
        y = kernels.gathered_down(h, w_down_t.cuda(), cuda["idx"])
        check(y.cpu(), ref_down(h.cpu(), w_down_t, a["idx"]), 1e-4)
        assert kernels.resolve_backend("auto", h.device) is triton_ffn


# ---------------------------------------------------------------- the one-call FFN

@pytest.mark.parametrize("activation", sorted(SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 2, 5])
def test_gathered_ffn_every_activation(activation, dtype, B):
    """The one-call FFN (native for a few tokens; the two kernels otherwise) against float64, biases and
    per-token masks included; and the reference backend's composition."""
    I, H = 90, 40
    a = make(I, H, B, 37, dtype, activation, bias=True, mask=B > 1, packed=True, seed=B)
    if SPECS[activation][0] is None:  # not gated: up rows alone, with a row stride of their own
        a["w_up"] = torch.randn(I, 2, H).to(dtype)[:, 1]
    w_down_t = torch.randn(I, H).to(dtype)
    h64 = gate_up_ref(a)
    want = h64.to(dtype).double() @ w_down_t.double()[a["idx"]]  # h rounded to the weights' dtype first
    args = (a["x"], a["w_up"], w_down_t, a["idx"], activation, a["w_gate"], a["up_bias"], a["token_mask"])
    one_call = B <= calibrate.max_native_tokens(dtype)
    tol = 1e-5 if dtype == torch.float32 else (2e-2 if one_call else 4e-2)  # bf16: h rounding flips
    for backend in ("cpu", "reference"):
        y = kernels.gathered_ffn(*args, gate_bias=a["gate_bias"], backend=backend)
        check(y, want, tol, floor=1.0)
    y16 = kernels.gathered_ffn(*args, gate_bias=a["gate_bias"], out_dtype=dtype)
    check(y16, want, 2e-2 if dtype != torch.float32 else 1e-5, dtype, floor=1.0)
    with pytest.raises(IndexError):
        kernels.gathered_ffn(a["x"], a["w_up"], w_down_t, torch.tensor([I]), activation, a["w_gate"],
                             a["up_bias"], None, gate_bias=a["gate_bias"])
