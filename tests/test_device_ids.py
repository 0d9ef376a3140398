"""Active ids computed on the device (kernels.compact) and consumed through the kernels' `count` argument, so
a GPU side never waits for the host: against brute force (torch.nonzero) and float64 over the live ids alone,
in every backend (reference, CPU, Triton in the interpreter and on CUDA)."""

from __future__ import annotations

import pytest
import torch
from interpreted import INTERPRETED, run_interpreter_cases
from test_kernels import call_gate_up, check, make, poison, ref_down, ref_gate_up  # noqa: F401 (fixture)

from hotcold import kernels
from hotcold.kernels.qrows import from_quant
from hotcold.kernels.quant import quantize


@pytest.mark.parametrize("n,p", [(0, 0.5), (1, 1.0), (37, 0.0), (37, 1.0), (1000, 0.1), (1000, 0.7)])
def test_compact_is_nonzero_padded(n, p):
    active = torch.rand(n, generator=torch.Generator().manual_seed(n)) < p
    ids, count = kernels.compact(active)
    want = active.nonzero().flatten()
    assert count.dtype == torch.int32 and count.tolist() == [want.numel()]
    assert ids.shape == (n,) and torch.equal(ids[: want.numel()], want)
    assert not ids[want.numel():].any()  # padding: id 0, a valid row to read (never read: count stops it)


def _live_case(B: int, K: int, n_live: int, dtype=torch.float32, seed: int = 0, qtype: str | None = None):
    """Arguments over K ids of which the first n_live are live, the float64 answer over those alone."""
    a = make(60, 64, B, K, dtype, "reglu", bias=True, mask=B > 1, seed=seed)
    w_down_t = torch.randn(60, 64, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    if qtype is not None:  # quantized rows: the float64 answer over their dequantized values
        a["w_up"], a["w_gate"] = (from_quant(quantize(w.float(), qtype)) for w in (a["w_up"], a["w_gate"]))
        w_down_t = from_quant(quantize(w_down_t.float(), qtype))
        deq = lambda w: w.dequantize()  # noqa: E731
    else:
        deq = lambda w: w  # noqa: E731
    mask = None if a["token_mask"] is None else a["token_mask"][:, :n_live]
    live = {**a, "idx": a["idx"][:n_live], "token_mask": mask}
    h_live = ref_gate_up(live["x"], deq(a["w_up"]), live["idx"], "reglu", deq(a["w_gate"]), a["up_bias"],
                         live["token_mask"], a["gate_bias"])
    h_want = torch.nn.functional.pad(h_live, (0, K - n_live))
    y_want = ref_down(h_live.float(), deq(w_down_t), live["idx"]) if n_live else torch.zeros(B, 64, dtype=torch.float64)
    return a, w_down_t, torch.tensor([n_live], dtype=torch.int32), h_want, y_want


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("B,K,n_live", [(1, 40, 13), (4, 40, 0), (4, 40, 40), (3, 25, 7)])
def test_count_keeps_only_the_live_ids(backend, B, K, n_live):
    a, w_down_t, count, h_want, y_want = _live_case(B, K, n_live, seed=B * 10 + n_live)
    h = call_gate_up(kernels.gathered_gate_up, a, backend=backend, count=count)
    check(h, h_want, 1e-5)
    check(kernels.gathered_down(h, w_down_t, a["idx"], backend=backend, count=count), y_want, 1e-5)
    y = kernels.gathered_ffn(a["x"], a["w_up"], w_down_t, a["idx"], "reglu", a["w_gate"], a["up_bias"],
                             a["token_mask"], gate_bias=a["gate_bias"], backend=backend, count=count)
    check(y, y_want, 1e-5)


def test_count_is_checked():
    a, w_down_t, _, _, _ = _live_case(1, 10, 3)
    with pytest.raises(ValueError, match="count"):
        call_gate_up(kernels.gathered_gate_up, a, backend="reference", count=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="count"):
        kernels.gathered_down(torch.zeros(1, 10), w_down_t, a["idx"], backend="reference",
                              count=torch.tensor([1, 2]))


def test_device_ids_under_the_interpreter():
    run_interpreter_cases(__file__, min_passed=6)


if INTERPRETED:
    from hotcold.kernels import triton_ffn as tri

    # (B, K, live, qtype, blocks): GEMV and tl.dot paths, nothing / everything / a prefix live, quantized rows
    CASES = [
        (1, 40, 13, None, dict(block_k=8, block_h=16)),
        (1, 40, 0, None, {}),
        (6, 40, 40, None, dict(block_k=16, block_h=32)),
        (6, 40, 9, "Q8_0", dict(block_k=16, block_h=32)),
        (2, 33, 17, "Q4_0", dict(block_k=8, block_h=32)),
        (1, 40, 21, "Q4_1", {}),
    ]

    @pytest.mark.parametrize("B,K,n_live,qtype,blocks", CASES)
    def test_interp_count(B, K, n_live, qtype, blocks, poison):
        poison(tri)
        a, w_down_t, count, h_want, y_want = _live_case(B, K, n_live, seed=K + n_live, qtype=qtype)
        h = call_gate_up(tri.gathered_gate_up, a, count=count, **blocks)
        check(h, h_want, 1e-5)
        for splits in (1, 3, 8):  # live blocks dealt round-robin over the splits
            check(tri.gathered_down(h, w_down_t, a["idx"], splits=splits, count=count, **blocks), y_want, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 16])
def test_cuda_count_with_compacted_ids(B):
    """The executor's way on CUDA: a mask on the device, compact() there, the kernels read the count."""
    torch.manual_seed(B)
    I, H = 2048, 1024
    w_up, w_gate, w_down_t = (torch.randn(I, H, dtype=torch.bfloat16) for _ in range(3))
    x = torch.randn(B, H, dtype=torch.bfloat16)
    active = torch.rand(I) < 0.1
    ids, count = kernels.compact(active.cuda())
    cuda = [t.cuda() for t in (x, w_up, w_down_t, w_gate)]
    y = kernels.gathered_ffn(cuda[0], cuda[1], cuda[2], ids, "swiglu", cuda[3], count=count)
    live = active.nonzero().flatten()
    want = ref_down(ref_gate_up(x, w_up, live, "swiglu", w_gate).float(), w_down_t, live)
    check(y.cpu(), want, 1e-3)
