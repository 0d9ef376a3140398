"""The hybrid executor: exact on ReLU-family models for any hot/cold split, predictor masks honoured,
batch invariance, and the two sides running at once without interfering."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from tiny_models import fixed_set_predictor

from hotcold.engine.errors import HotcoldError
from hotcold.engine.hybrid import HybridConfig, apply_hybrid
from hotcold.engine.llm import LLMEngine
from hotcold.engine.loader import load_model
from hotcold.engine.plan import LayerPlan, Plan, PredictorPlan
from hotcold.engine.sampling import SamplingParams

IDS = torch.tensor(list(range(3, 40)))
RELU_FAMILY = [("relu_llama", None), ("llama", "drelu"), ("opt", None), ("opt_relu2", None),
               ("llama_untied_bias", "reglu")]  # gate and up biases


def make_plan(loaded, split: str, seed: int = 0, predictor: dict | None = None) -> Plan:
    gen = torch.Generator().manual_seed(seed)
    cfg = loaded.config
    layers = []
    for i in range(cfg.num_layers):
        n = cfg.intermediate_size
        if split == "all":
            hot = torch.arange(n)
        elif split == "none":
            hot = torch.arange(0)
        else:
            hot = torch.randperm(n, generator=gen)[: int(torch.randint(1, n, (1,), generator=gen))]
        pred = None
        if predictor is not None:
            pred = PredictorPlan(rank=predictor["w1"].shape[0], tau=0.5, top_k=n // 2, recall=1.0, sparsity=0.0,
                                 topk_recall=1.0, topk_sparsity=0.0, weights=predictor)
        layers.append(LayerPlan(index=i, threshold=0.0, cett=0.0, sparsity=0.0, num_neurons=n, hot_ids=hot,
                                frequency=torch.zeros(n), predictor=pred))
    return Plan(fingerprint=loaded.fingerprint, layers=layers)


@pytest.mark.parametrize("kind,activation", RELU_FAMILY)
@pytest.mark.parametrize("split", ["random", "all", "none"])
def test_oracle_threshold_zero_is_exact(kind, activation, split, tiny_checkpoint):
    path = tiny_checkpoint(kind)
    dense = load_model(path, dtype="float32", activation=activation).model.forward_sequence(IDS)
    loaded = load_model(path, dtype="float32", activation=activation)
    apply_hybrid(loaded.model, make_plan(loaded, split, seed=len(kind)), HybridConfig(mode="oracle", backend="cpu"),
                 loaded.fingerprint, workers=1)
    # single sequence, and a decode-sized batch (below max_sparse_tokens: the sparse path)
    sparse = loaded.model.forward_sequence(IDS)
    assert (sparse - dense).abs().max().item() <= 1e-5 * dense.abs().max().item()
    short = loaded.model.forward_sequence(IDS[:6])
    assert (short - dense[:6]).abs().max().item() <= 1e-5 * dense.abs().max().item()
    counters = loaded.model.ffn_counters
    assert counters.sparsity is not None and 0 < counters.sparsity < 1  # ReLU zeros really were skipped


@pytest.mark.parametrize("kind,activation", RELU_FAMILY[:2])
def test_oracle_batched_decode_equals_dense_engine(kind, activation, tiny_checkpoint):
    path = tiny_checkpoint(kind)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = [[3, 4, 5], list(range(3, 30)), [7, 8, 9, 10, 11], [12]]
    dense_engine = LLMEngine(load_model(path, dtype="float32", activation=activation), max_num_seqs=4, max_model_len=64)
    expected = [s.output_ids for s in dense_engine.generate(prompts, params)]
    loaded = load_model(path, dtype="float32", activation=activation)
    apply_hybrid(loaded.model, make_plan(loaded, "random"),
                 HybridConfig(mode="oracle", max_sparse_tokens=4, backend="cpu"), loaded.fingerprint, workers=1)
    engine = LLMEngine(loaded, max_num_seqs=4, max_model_len=64)
    assert [s.output_ids for s in engine.generate(prompts, params)] == expected


class KeepOnly(torch.nn.Module):
    """A dense FFN with every neuron outside `keep` zeroed (plain torch: the reference for a fixed mask)."""

    def __init__(self, ffn, keep: torch.Tensor):
        super().__init__()
        self.inner, self.keep = ffn, keep

    def forward(self, x):
        return self.inner.project_down(self.inner.activations(x) * self.keep.to(x.device))


@pytest.mark.parametrize("kind", ["llama", "llama_untied_bias"])  # the second has gate, up and down biases
def test_predictor_mask_is_what_gets_computed(kind, tiny_checkpoint):
    """A predictor whose logits are fixed by its bias selects a known neuron set; the executor must equal
    the dense FFN with every other neuron zeroed (computed here with plain torch)."""
    path = tiny_checkpoint(kind)
    loaded = load_model(path, dtype="float32")
    cfg = loaded.config
    weights, keep = fixed_set_predictor(cfg.hidden_size, cfg.intermediate_size, seed=1, share=0.3)
    plan = make_plan(loaded, "random", predictor=weights)
    ref_model = load_model(path, dtype="float32").model
    for layer in ref_model.layers:
        layer.ffn = KeepOnly(layer.ffn, keep)
    expected = ref_model.forward_sequence(IDS[:8])

    apply_hybrid(loaded.model, plan, HybridConfig(mode="predictor", max_sparse_tokens=64, backend="cpu"),
                 loaded.fingerprint)
    got = loaded.model.forward_sequence(IDS[:8])
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert loaded.model.ffn_counters.sparsity == pytest.approx(1 - keep.float().mean().item(), abs=1e-6)
    dense = load_model(path, dtype="float32").model.forward_sequence(IDS[:8])
    assert not torch.allclose(got, dense)  # the mask really changed something


def gated_h_f64(dense, x: torch.Tensor) -> torch.Tensor:
    """silu(x Wg^T + bg) * (x Wu^T + bu) of a gated FFN with biases, in float64 from the model's weights."""
    gu, b = dense.gate_up.double(), dense.gate_up_bias.double()
    xd = x.double()
    g, u = xd @ gu[:, 0].T + b[:, 0], xd @ gu[:, 1].T + b[:, 1]
    return g / (1.0 + torch.exp(-g)) * u


def keep_only_f64(dense, keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A gated (SiLU) FFN with biases, only the `keep` neurons ([I] or per token [T, I]), in float64."""
    return (gated_h_f64(dense, x) * keep) @ dense.down_t.double() + dense.down_bias.double()


def test_oracle_nonzero_threshold_drops_the_small_neurons(tiny_checkpoint):
    """Oracle mode at a layer threshold that cuts through the middle of a SiLU model's (never exactly zero)
    neurons: each token keeps exactly the neurons with |h_i| * ||down_t[i]|| > threshold (the plan's rule,
    brute-forced in float64), on both sides (the hot side's dense product over the oracle activations too),
    for one token, a decode batch and a prefill chunk."""
    path = tiny_checkpoint("llama_untied_bias")
    dense = load_model(path, dtype="float32").model.layers[0].ffn
    loaded = load_model(path, dtype="float32")
    x = torch.randn(40, loaded.config.hidden_size, generator=torch.Generator().manual_seed(11))
    score = gated_h_f64(dense, x).abs() * dense.down_t.double().norm(dim=1)
    s, lo, hi = score.flatten().sort().values, score.numel() // 3, 2 * score.numel() // 3
    k = lo + int((s[lo + 1:hi] - s[lo:hi - 1]).argmax())  # threshold: the widest gap in the middle third
    threshold = float(s[k] + s[k + 1]) / 2
    assert (score - threshold).abs().min().item() > 1e-5 * threshold  # no score a float32 rounding can flip
    plan = make_plan(loaded, "random", seed=7)
    for lp in plan.layers:
        lp.threshold = threshold
    apply_hybrid(loaded.model, plan, HybridConfig(mode="oracle", backend="reference"), loaded.fingerprint,
                 gpu_device="cpu", workers=1)
    layer = loaded.model.layers[0].ffn
    hot = torch.zeros(layer.intermediate_size, dtype=torch.bool)
    hot[layer.hot.ids] = True
    keep = score > threshold
    for T in (1, 6, 40):
        for side in (hot, ~hot):  # every token keeps some neurons and drops others, on each side
            assert (keep[:T] & side).any(1).all() and (~keep[:T] & side).any(1).all()
        want = keep_only_f64(dense, keep[:T], x[:T])
        err = (layer(x[:T]).double() - want).abs().max().item()
        assert err <= 1e-5 * want.abs().max().item()
        assert (want - keep_only_f64(dense, True, x[:T])).abs().max().item() > 1e-2  # the cut matters


def test_two_cpu_sides_run_at_once(tiny_checkpoint):
    """Hot side (this thread) and cold side (a worker) on the CPU really run at the same time, on the shared
    input, mask and id tables: each side waits at a two-party barrier before computing, so a call that does
    not overlap the two sides breaks the barrier (times out) and fails; every result is the float64 one."""
    loaded = load_model(tiny_checkpoint("llama_untied_bias"), dtype="float32")
    dense = load_model(tiny_checkpoint("llama_untied_bias"), dtype="float32").model.layers[0].ffn
    cfg = loaded.config
    n = cfg.intermediate_size
    weights, keep = fixed_set_predictor(cfg.hidden_size, n, seed=2)
    apply_hybrid(loaded.model, make_plan(loaded, "random", seed=4, predictor=weights),
                 HybridConfig(mode="predictor", backend="cpu"), loaded.fingerprint, gpu_device="cpu", workers=2)
    layer = loaded.model.layers[0].ffn
    hot = torch.zeros(n, dtype=torch.bool)
    hot[layer.hot.ids] = True
    assert (keep & hot).any() and (keep & ~hot).any()  # both sides have work on every call
    barrier, threads = threading.Barrier(2, timeout=20), set()

    def at_once(side):
        def run(*args):
            threads.add(threading.get_ident())
            barrier.wait()  # the other side must be running now
            return side(*args)
        return run

    layer._hot_side, layer._cold_side = at_once(layer._hot_side), at_once(layer._cold_side)
    gen = torch.Generator().manual_seed(3)
    for step in range(30):
        x = torch.randn(1 + step % 4, cfg.hidden_size, generator=gen)
        got = layer(x)
        want = keep_only_f64(dense, keep, x)
        assert (got.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert len(threads) == 2 and not barrier.broken


def test_plan_for_another_model_is_refused(tiny_checkpoint):
    a = load_model(tiny_checkpoint("relu_llama"), dtype="float32")
    b = load_model(tiny_checkpoint("llama"), dtype="float32")
    with pytest.raises(HotcoldError, match="different model"):
        apply_hybrid(b.model, make_plan(a, "all"), HybridConfig(mode="oracle"), b.fingerprint)
    with pytest.raises(HotcoldError, match="no predictor"):
        apply_hybrid(a.model, make_plan(a, "all"), HybridConfig(mode="predictor"), a.fingerprint)


@pytest.mark.parametrize("quantize", [None, "q8_0"])
def test_a_second_plan_is_refused_before_anything_changes(quantize, tiny_checkpoint):
    """apply_hybrid on a model that already runs a plan: one clear error, and the model keeps its FFNs, its
    counters and where its dense parts are."""
    loaded = load_model(tiny_checkpoint("llama"), dtype=None if quantize else "float32", quantize=quantize)
    plan = make_plan(loaded, "random", seed=2)
    config = HybridConfig(mode="oracle", backend="reference")
    counters = apply_hybrid(loaded.model, plan, config, loaded.fingerprint)
    ffns, embed = [layer.ffn for layer in loaded.model.layers], loaded.model.embed
    with pytest.raises(HotcoldError, match="already runs a plan"):
        apply_hybrid(loaded.model, plan, config, loaded.fingerprint)
    assert [layer.ffn for layer in loaded.model.layers] == ffns and loaded.model.embed is embed
    assert loaded.model.ffn_counters is counters


def test_dense_fallback_gives_the_same_result(tiny_checkpoint):
    """Long chunks and dense unions take the dense product over each side's rows: same numbers."""
    path = tiny_checkpoint("relu_llama")
    results = []
    for max_sparse, dense_above in [(1000, 1.01), (0, 0.0)]:
        loaded = load_model(path, dtype="float32")
        apply_hybrid(loaded.model, make_plan(loaded, "random"),
                     HybridConfig(mode="oracle", max_sparse_tokens=max_sparse, dense_above=dense_above),
                     loaded.fingerprint)
        results.append(loaded.model.forward_sequence(IDS))
    assert F.mse_loss(results[0], results[1]).item() < 1e-10


@pytest.mark.gpu
@pytest.mark.parametrize("kind,activation", RELU_FAMILY)
def test_hybrid_on_cuda_is_exact(kind, activation, tiny_checkpoint):
    """Hot neurons in the Triton kernels on the GPU, cold ones on a CPU worker (pinned staging buffers),
    prefill and decode-sized chunks: the dense CPU logits, in float32."""
    path = tiny_checkpoint(kind)
    dense = load_model(path, dtype="float32", activation=activation).model.forward_sequence(IDS)
    loaded = load_model(path, dtype="float32", activation=activation)
    apply_hybrid(loaded.model, make_plan(loaded, "random", seed=3), HybridConfig(mode="oracle"), loaded.fingerprint,
                 gpu_device="cuda", workers=1)
    assert loaded.model.layers[0].ffn.hot.gate_up.device.type == "cuda"
    for ids in (IDS, IDS[:1], IDS[:5]):
        got = loaded.model.forward_sequence(ids).cpu()
        assert (got - dense[: len(ids)]).abs().max().item() <= 1e-4 * dense.abs().max().item()


@pytest.mark.gpu
def test_hybrid_on_cuda_predictor_mode_bf16(tiny_checkpoint):
    """The route `--device cuda --plan` takes: bf16, predictor mode, a gated model with gate, up and down
    biases; hot rows through the Triton kernels (ids compacted on the GPU, the count read there), cold rows on
    a CPU worker. It must be the float32 model with only the predicted neurons, up to bf16 rounding, and far
    from the dense model (the mask matters)."""
    path = tiny_checkpoint("llama_untied_bias")
    loaded = load_model(path, dtype="bfloat16")
    cfg = loaded.config
    weights, keep = fixed_set_predictor(cfg.hidden_size, cfg.intermediate_size, seed=4)
    ref = load_model(path, dtype="float32").model
    dense = ref.forward_sequence(IDS[:8])
    for layer in ref.layers:
        layer.ffn = KeepOnly(layer.ffn, keep)
    want = ref.forward_sequence(IDS[:8])
    apply_hybrid(loaded.model, make_plan(loaded, "random", seed=5, predictor=weights),
                 HybridConfig(mode="predictor", max_sparse_tokens=64), loaded.fingerprint, gpu_device="cuda",
                 workers=1)
    ffn = loaded.model.layers[0].ffn
    assert ffn.hot.num > 0 and ffn.cold.num > 0 and ffn.hot.gate_up.device.type == "cuda"
    masked = (want - dense).abs().max().item()
    for n in (8, 1):  # tl.dot and GEMV paths
        err = (loaded.model.forward_sequence(IDS[:n]).float().cpu() - want[:n]).abs().max().item()
        assert err <= 0.08 * want[:n].abs().max().item() and err < 0.25 * masked, (err, masked)


@pytest.mark.parametrize("strategy,value", [("threshold", 0.3), ("threshold", 0.9), ("topk", 7), ("topk", 0),
                                            ("topk", 10**6)])
def test_one_predictor_rule_everywhere(strategy, value, tiny_checkpoint):
    """The executor, MaskedFFN and the profiler's evaluation probe decide the same neurons as a float64
    brute force of the rule (sigmoid(logit) >= tau; the k largest logits, k clamped to [0, I])."""
    from hotcold.engine.sparsity import masked_ffn_for
    from hotcold.profiler.collect import PredictorProbe

    loaded = load_model(tiny_checkpoint("llama_untied_bias"), dtype="float32")
    cfg = loaded.config
    n = cfg.intermediate_size
    gen = torch.Generator().manual_seed(8)
    w = {"w1": torch.randn(6, cfg.hidden_size, generator=gen), "b1": torch.randn(6, generator=gen),
         "w2": torch.randn(n, 6, generator=gen), "b2": torch.randn(n, generator=gen)}
    plan = make_plan(loaded, "random", predictor=w)
    for lp in plan.layers:
        lp.predictor.tau, lp.predictor.top_k = (value, 3) if strategy == "threshold" else (0.5, value)
    x = torch.randn(5, cfg.hidden_size, generator=gen)
    logits = torch.relu(x.double() @ w["w1"].double().T + w["b1"].double()) @ w["w2"].double().T + w["b2"].double()
    if strategy == "threshold":
        want = torch.sigmoid(logits) >= value
    else:
        k = min(value, n)
        want = torch.zeros(5, n, dtype=torch.bool)
        for t in range(5):
            want[t, sorted(range(n), key=lambda i: -logits[t, i].item())[:k]] = True
    dense = loaded.model.layers[0].ffn
    masked = masked_ffn_for(dense, plan.layers[0], "predictor", strategy)
    h = dense.activations(x)
    assert torch.equal(masked.mask(x, h), want)
    probe = PredictorProbe(dense, 0.0, masked.predictor, plan.layers[0].predictor.tau, plan.layers[0].predictor.top_k)
    tau_mask = probe.mask(x, h)
    if strategy == "threshold":
        assert torch.equal(tau_mask, want)
    else:
        assert probe.counts[4].item() == want.sum().item()  # the top-k decisions it scored
    apply_hybrid(loaded.model, plan, HybridConfig(mode="predictor", strategy=strategy), loaded.fingerprint,
                 gpu_device="cpu")
    layer = loaded.model.layers[0].ffn
    assert torch.equal(layer.active_mask(x)[0], want)
    if strategy == "topk" and value == 0:  # nothing computed: the down bias alone, as the plan was measured
        assert torch.equal(layer(x), dense.down_bias.expand(5, -1))


def test_oracle_on_the_device_ids_path(tiny_checkpoint):
    """Oracle mode through the GPU side's way (reference kernels on the CPU standing in for it): the dense model."""
    path = tiny_checkpoint("relu_llama")
    dense = load_model(path, dtype="float32").model.forward_sequence(IDS)
    loaded = load_model(path, dtype="float32")
    apply_hybrid(loaded.model, make_plan(loaded, "random", seed=5), HybridConfig(mode="oracle", backend="reference"),
                 loaded.fingerprint, gpu_device="cpu", workers=1)
    assert loaded.model.layers[0].ffn.hot.num > 0  # a split: the reference kernels stand in for a GPU side
    for n in (len(IDS), 6):  # a long chunk (dense over each side's rows) and a short one
        got = loaded.model.forward_sequence(IDS[:n])
        assert (got - dense[:n]).abs().max().item() <= 1e-5 * dense.abs().max().item()
    assert 0 < loaded.model.ffn_counters.hot_share < 1


def test_no_gpu_means_one_side(tiny_checkpoint):
    """With no GPU and the default kernels, a hybrid placement runs every neuron on the CPU side (a split of
    the same cores only adds a thread hop per layer: benchmarks/placement_cpu.py); same logits either way."""
    path = tiny_checkpoint("relu_llama")
    got = []
    for placement in ("hybrid", "cpu"):
        loaded = load_model(path, dtype="float32")
        apply_hybrid(loaded.model, make_plan(loaded, "random", seed=2),
                     HybridConfig(mode="oracle", placement=placement), loaded.fingerprint, gpu_device="cpu", workers=1)
        ffn = loaded.model.layers[0].ffn
        assert ffn.hot.num == 0 and ffn.cold.num == loaded.config.intermediate_size
        got.append(loaded.model.forward_sequence(IDS[:6]))
    assert torch.equal(got[0], got[1])


def _reachable_storages(root) -> list[torch.Tensor]:
    """Every tensor storage reachable from `root` through modules, hotcold objects, containers, as one flat
    tensor each (views of one storage counted once)."""
    seen, stack, storages = set(), [root], {}
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            flat = torch.tensor([], dtype=obj.dtype, device=obj.device).set_(storage)
            storages.setdefault(storage.data_ptr(), flat)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif isinstance(obj, torch.nn.Module) or type(obj).__module__.startswith("hotcold"):
            stack.extend(vars(obj).values())
    return list(storages.values())


@pytest.mark.parametrize("mode", ["oracle", "predictor"])
def test_every_neuron_is_held_once(mode, tiny_checkpoint):
    """Walk every tensor reachable from a model running a plan (GPU side standing in on the CPU, a random
    split) and count each FFN neuron's gate, up and down rows among them: exactly once each — the dense FFN
    is not kept beside the two sides' copies."""
    path = tiny_checkpoint("llama")
    dense = load_model(path, dtype="float32").model
    loaded = load_model(path, dtype="float32")
    cfg = loaded.config
    weights, _ = fixed_set_predictor(cfg.hidden_size, cfg.intermediate_size, seed=1)
    apply_hybrid(loaded.model, make_plan(loaded, "random", seed=6, predictor=weights if mode == "predictor" else None),
                 HybridConfig(mode=mode, backend="cpu"), loaded.fingerprint, gpu_device="cpu", workers=1)
    counts: dict[bytes, int] = {}
    for flat in _reachable_storages(loaded.model):
        if flat.dtype == torch.float32 and flat.numel() % cfg.hidden_size == 0:
            for row in flat.view(-1, cfg.hidden_size):
                counts[row.numpy().tobytes()] = counts.get(row.numpy().tobytes(), 0) + 1
    for layer in dense.layers:
        f = layer.ffn
        rows = torch.cat([f.gate_up[:, 0], f.gate_up[:, 1], f.down_t])
        found = [counts.get(r.numpy().tobytes(), 0) for r in rows]
        assert found == [1] * len(found), f"rows held {sorted(set(found))} times"
    assert 0 < loaded.model.layers[0].ffn.hot.num < cfg.intermediate_size  # both sides hold rows
