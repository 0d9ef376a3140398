"""Gate/up biases as the executor passes them: the strided views gate_up_bias[:, 0] / [:, 1] (stride 2) of the
interleaved [I, 2] bias, through every kernel backend and through the hybrid executor, against float64.

Issue 14: the Triton kernel read biases at bias_ptr + row (stride 1), so it added the wrong neurons' biases
(a mix of gate and up) and no test noticed, because every kernel test passed contiguous biases."""

from __future__ import annotations

import pytest
import torch
from interpreted import INTERPRETED, run_interpreter_cases
from tiny_models import fixed_set_predictor, predictor_picks_f64, token_dependent_predictor

import hotcold.kernels as kernels
from hotcold.kernels import cpu_sparse, reference

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # interpreter exp()


def make(I: int, H: int, B: int, K: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> dict:
    """Interleaved gate/up rows [I,2,H] and biases [I,2] on `device`, passed as their strided views (as
    engine/hybrid.py does; views taken where the tensors live: moving a view makes a contiguous copy); gate
    and up biases differ in sign and size, so reading one for the other changes the result."""
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(I, 2, H, generator=g).to(dtype).to(device)
    bias = torch.stack([torch.rand(I, generator=g) + 1.0, -2.0 * torch.rand(I, generator=g) - 0.5], 1)
    bias = bias.to(dtype).to(device)
    assert bias[:, 0].stride() == (2,) and bias[:, 1].stride() == (2,)
    on = lambda t: t.to(device)  # noqa: E731
    return dict(x=on(torch.randn(B, H, generator=g).to(dtype)), w_up=gate_up[:, 1], w_gate=gate_up[:, 0],
                idx=on(torch.randperm(I, generator=g)[:K]), up_bias=bias[:, 1], gate_bias=bias[:, 0],
                token_mask=on(torch.rand(B, K, generator=g) > 0.3) if B > 1 else None,
                w_down_t=on(torch.randn(I, H, generator=g).to(dtype)))


def f64_h(a: dict) -> torch.Tensor:
    """swiglu in float64 from contiguous copies: silu(x Wg^T + bg) * (x Wu^T + bu), masked per token."""
    a = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    x = a["x"].double()
    r = a["idx"].long()
    g = x @ a["w_gate"].double()[r].T + a["gate_bias"].double().contiguous()[r]
    u = x @ a["w_up"].double()[r].T + a["up_bias"].double().contiguous()[r]
    h = g / (1.0 + torch.exp(-g)) * u
    return h if a["token_mask"] is None else torch.where(a["token_mask"], h, 0.0)


def f64_y(a: dict, h: torch.Tensor) -> torch.Tensor:
    w = a["w_down_t"].cpu()
    return h.to(w.dtype).double() @ w.double()[a["idx"].long().cpu()]


def close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    got = got.detach().cpu()
    assert torch.isfinite(got).all()
    err = (got.double() - want).abs().max().item()
    scale = max(want.abs().max().item(), 1.0)
    assert err <= tol * scale, f"max error {err:.3g} > {tol} * {scale:.3g}"


def gate_up(fn, a: dict, **kw) -> torch.Tensor:
    return fn(a["x"], a["w_up"], a["idx"], "swiglu", a["w_gate"], a["up_bias"], a["token_mask"],
              gate_bias=a["gate_bias"], **kw)


def ffn(a: dict, **kw) -> torch.Tensor:
    return kernels.gathered_ffn(a["x"], a["w_up"], a["w_down_t"], a["idx"], "swiglu", a["w_gate"], a["up_bias"],
                                a["token_mask"], gate_bias=a["gate_bias"], **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3, 40])
@pytest.mark.parametrize("use_native", [True, False])
def test_reference_and_cpu_take_strided_biases(dtype, B, use_native):
    """Reference, the CPU torch path and the native kernels (one call and gate/up alone) read the views."""
    a = make(70, 48, B, 31, dtype, seed=B)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    h64 = f64_h(a)
    close(gate_up(reference.gathered_gate_up, a), h64, tol)
    cfg = cpu_sparse.CpuConfig(use_native=use_native)
    close(gate_up(cpu_sparse.gathered_gate_up, a, config=cfg), h64, tol)
    y = cpu_sparse.gathered_ffn(a["x"], a["w_up"], a["w_down_t"], a["idx"], "swiglu", a["w_gate"], a["up_bias"],
                                a["token_mask"], cfg, gate_bias=a["gate_bias"])
    close(y, f64_y(a, h64), 2 * tol)
    close(ffn(a, backend="reference"), f64_y(a, h64), 2 * tol)


def test_strided_biases_under_the_interpreter():
    run_interpreter_cases(__file__, min_passed=5)


def hybrid_layer(tiny_checkpoint, device: str, backend: str, placement: str, per_token: bool = False):
    """Layer 0 of a gated model with gate, up and down biases under a HybridFFN in predictor mode, whose
    predictor keeps a fixed neuron set (logits from its bias alone) or, `per_token`, picks different neurons
    for each token; returns (ffn, picks: x -> the neurons kept, [I] or [T, I], dense FFN)."""
    from hotcold.engine.hybrid import HybridConfig, apply_hybrid
    from hotcold.engine.loader import load_model
    from hotcold.engine.plan import LayerPlan, Plan, PredictorPlan

    loaded = load_model(tiny_checkpoint("llama_untied_bias"), dtype="float32")
    cfg = loaded.config
    n = cfg.intermediate_size
    w, keep = fixed_set_predictor(cfg.hidden_size, n, seed=5)
    if per_token:
        w = token_dependent_predictor(cfg.hidden_size, n, seed=8)
    hot = torch.randperm(n, generator=torch.Generator().manual_seed(6))[: n // 2]
    layers = [LayerPlan(index=i, threshold=0.0, cett=0.0, sparsity=0.0, num_neurons=n, hot_ids=hot,
                        frequency=torch.zeros(n),
                        predictor=PredictorPlan(rank=4, tau=0.5, top_k=n // 2, recall=1.0, sparsity=0.0,
                                                topk_recall=1.0, topk_sparsity=0.0, weights=w))
              for i in range(cfg.num_layers)]
    dense = loaded.model.layers[0].ffn
    assert dense.gated and dense.gate_up_bias is not None and dense.gate_up_bias.dim() == 2
    apply_hybrid(loaded.model, Plan(fingerprint=loaded.fingerprint, layers=layers),
                 HybridConfig(mode="predictor", placement=placement, backend=backend), loaded.fingerprint,
                 gpu_device=device, workers=1)
    picks = (lambda x: predictor_picks_f64(w, x)) if per_token else (lambda x: keep)
    return loaded.model.layers[0].ffn, picks, dense


def executor_f64(dense, keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The dense FFN with only `keep` neurons ([I], or [T, I]: per token), in float64 from the model's weights."""
    gu, b = dense.gate_up.detach().cpu().double(), dense.gate_up_bias.detach().cpu().double()
    xd = x.cpu().double()
    g = xd @ gu[:, 0].T + b[:, 0]
    u = xd @ gu[:, 1].T + b[:, 1]
    h = g / (1.0 + torch.exp(-g)) * u * keep
    return h @ dense.down_t.detach().cpu().double() + dense.down_bias.detach().cpu().double()


if INTERPRETED:
    from hotcold.kernels import triton_ffn as tri

    @pytest.mark.parametrize("B", [1, 3, 6])  # GEMV path, GEMV with a mask, tl.dot path
    def test_interp_gate_up_strided_biases(B):
        a = make(24, 16, B, 13, torch.float32, seed=B)
        close(gate_up(tri.gathered_gate_up, a, block_k=8, block_h=16), f64_h(a), 1e-5)

    def test_interp_ffn_strided_biases_through_dispatcher():
        a = make(24, 16, 2, 11, torch.float32, seed=9)
        close(ffn(a, backend="triton"), f64_y(a, f64_h(a)), 1e-5)

    def test_interp_executor_predictor_mode(tiny_checkpoint):
        """The executor's own views: every neuron on the 'GPU side' (here the CPU, interpreted Triton)."""
        layer, picks, dense = hybrid_layer(tiny_checkpoint, "cpu", "triton", "gpu")
        assert layer.hot.views[2].stride() == (2,)  # the strided up-bias view reaches the kernel
        x = torch.randn(3, dense.gate_up.shape[-1], generator=torch.Generator().manual_seed(1))
        close(layer(x), executor_f64(dense, picks(x), x), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 4, 16])
def test_cuda_kernels_take_strided_biases(B):
    cuda = make(1100, 512, B, 333, torch.float32, seed=B, device="cuda")
    assert cuda["up_bias"].stride() == (2,) and cuda["w_up"].stride() == (1024, 1)  # the views, on the GPU
    h64 = f64_h(cuda)
    close(gate_up(kernels.gathered_gate_up, cuda), h64, 1e-4)
    close(ffn(cuda), f64_y(cuda, h64), 1e-4)


@pytest.mark.gpu
def test_cuda_executor_predictor_mode_gated_with_biases(tiny_checkpoint):
    """Predictor mode on CUDA (the Triton gate/up kernel with the strided bias views), hot/cold split."""
    layer, picks, dense = hybrid_layer(tiny_checkpoint, "cuda", "auto", "hybrid")
    for T in (1, 5):
        x = torch.randn(T, dense.gate_up.shape[-1], generator=torch.Generator().manual_seed(T)).cuda()
        close(layer(x), executor_f64(dense, picks(x), x), 1e-4)


@pytest.mark.parametrize("placement", ["hybrid", "gpu"])
def test_executor_device_ids_path(tiny_checkpoint, placement):
    """The GPU side's way (ids compacted on its device, the count read by the kernels; the cold side from the
    mask handed to the host) run with the reference kernels on the CPU, with a predictor whose picks differ
    from token to token: each token must sum exactly its own picks (float64 with those neurons), not its
    batch's union nor another token's set. One token, a decode batch, a prefill chunk (dense on both sides)."""
    layer, picks, dense = hybrid_layer(tiny_checkpoint, "cpu", "reference", placement, per_token=True)
    assert layer.hot.num > 0 and (layer.cold.num > 0) == (placement == "hybrid")
    hot = torch.zeros(layer.intermediate_size, dtype=torch.bool)
    hot[layer.hot.ids] = True
    gen = torch.Generator().manual_seed(2)
    for T in (1, 5, 40):
        x = torch.randn(T, dense.gate_up.shape[-1], generator=gen)
        keep = picks(x)
        assert 0 < keep.float().mean() < 0.6  # a minority of neurons per token
        for side in (hot, ~hot) if placement == "hybrid" else (hot,):  # on each side, per-token sets differ:
            # other tokens pick neurons the first one does not, and tokens lack neurons of the batch's union
            assert T == 1 or ((keep[1:] & ~keep[0] & side).any() and (keep.any(0) & ~keep & side).any())
        close(layer(x), executor_f64(dense, keep, x), 1e-5)
