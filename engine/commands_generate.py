"""`hotcold generate`: stream one completion to stdout."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

from hotcold.engine.errors import HotcoldError


@dataclass(frozen=True)
class KVReserve:
    """The KV cache a command will allocate, which a plan's GPU budget must leave room for: `sequences` x
    `tokens` (None: the model's whole context), and the flags that change it (named when it does not fit)."""

    sequences: int
    tokens: int | None
    flags: str

    def context(self, longest: int) -> int:
        return longest if self.tokens is None else min(self.tokens, longest)


WHOLE_CONTEXT = KVReserve(1, None, "")


def add_weight_arguments(parser: argparse.ArgumentParser) -> None:
    """--dtype and --quantize: how the weights are held (shared with `hotcold serve`)."""
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dequantize every weight to this dtype (default: a GGUF's quantized blocks stay as "
                             "they are; float checkpoints take the dtype calibrated for this CPU)")
    parser.add_argument("--quantize", default=None, choices=["q8_0", "q4_0", "q4_1"],
                        help="quantize a checkpoint's float matrices at load (CPU)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the commands that load a model."""
    parser.add_argument("--model", default="default", help="HF folder, .gguf file, or 'default' (SmolLM2-135M)")
    add_weight_arguments(parser)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--activation", default=None,
                        choices=["swiglu", "reglu", "drelu", "geglu", "relu", "relu2", "gelu"],
                        help="override the FFN activation the config declares (e.g. drelu for TurboSparse)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--plan", default=None, help="a plan folder from `hotcold profile`: run the FFNs sparsely")
    parser.add_argument("--sparsity", default=None, choices=["off", "oracle", "predictor", "input"],
                        help="which neurons run: all (off), the plan's thresholds on the true activations "
                             "(oracle), or the plan's predictors; input: the plan's thresholds on every "
                             "projection's inputs (default with --plan: what the plan was made for)")
    add_sparse_prefill_argument(parser)
    parser.add_argument("--placement", default="hybrid", choices=["hybrid", "gpu", "cpu"],
                        help="hot neurons on the GPU and cold on the CPU (hybrid), or all on one side (no GPU: all "
                             "on the CPU)")
    add_gpu_memory_argument(parser)


def add_sparse_prefill_argument(parser: argparse.ArgumentParser) -> None:
    """--sparse-prefill (shared with `hotcold serve`)."""
    parser.add_argument("--sparse-prefill", action="store_true",
                        help="with an input-sparsity plan: drop small inputs in prompt tokens too (default: "
                             "decode tokens only, as TEAL)")


def add_gpu_memory_argument(parser: argparse.ArgumentParser) -> None:
    """--gpu-memory (shared with `hotcold serve`)."""
    parser.add_argument("--gpu-memory", default=None,
                        help="with --plan: re-place its hot neurons for this GPU budget (8GiB, 512MiB, 0, all) "
                             "from the plan's measured frequencies, without re-profiling")


def check_threads_arg(threads: int | None) -> None:
    """--threads, where given: from 1 to the CPUs this process may run on (kernels.native's rule)."""
    from hotcold.kernels.native import check_threads

    if threads is not None:
        try:
            check_threads(threads, "--threads")
        except ValueError as exc:
            raise HotcoldError(str(exc)) from None


def check_model_args(args: argparse.Namespace) -> None:
    """The flags of every command that loads a model, checked before anything loads (serve: before it binds
    its port): --threads from 1 to the usable CPUs; --device cpu, or a CUDA device this machine has."""
    import torch

    check_threads_arg(args.threads)
    device = args.device
    try:
        d = torch.device(device)
    except RuntimeError:
        raise HotcoldError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if d.type == "cpu":
        return
    if d.type != "cuda":
        raise HotcoldError(f"--device {device}: hotcold runs on cpu or cuda")
    if not torch.cuda.is_available():
        built = "built without CUDA" if torch.version.cuda is None else "no CUDA device visible"
        raise HotcoldError(f"--device {device}: this machine has no usable GPU (torch {torch.__version__}, "
                           f"{built}); use --device cpu")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise HotcoldError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")


def load_from_args(args: argparse.Namespace, kv: KVReserve = WHOLE_CONTEXT):
    """Load the model; with --plan, switch its FFNs to the hybrid executor (its GPU budget leaving room for
    `kv`, the KV cache the command will allocate)."""
    import torch

    from hotcold.engine.loader import load_model
    from hotcold.kernels import native

    check_model_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
        native.set_threads(args.threads)
    if args.sparsity not in (None, "off") and not args.plan:
        raise HotcoldError(f"--sparsity {args.sparsity} needs --plan PLAN_DIR (make one with `hotcold profile`)")
    if getattr(args, "gpu_memory", None) is not None and not args.plan:
        raise HotcoldError("--gpu-memory places a plan's neurons: it needs --plan PLAN_DIR")
    plan = mode = None
    if args.plan:
        from hotcold.engine.plan import load_plan

        plan = load_plan(args.plan)  # read first: where the model loads depends on it; bound to the model below
        mode = args.sparsity or plan.sparsity_mode
        if mode != "off" and (mode == "input") != (plan.sparsity_mode == "input"):
            made = "input thresholds" if plan.sparsity_mode == "input" else "neuron thresholds and predictors"
            raise HotcoldError(f"--sparsity {mode} does not fit plan {args.plan}, which holds {made}; use "
                               f"--sparsity {plan.sparsity_mode} (or off)")
    dtype, device, quantize = args.dtype, args.device, getattr(args, "quantize", None)
    if plan is not None and mode not in ("off", "input") and torch.device(device).type != "cpu":
        # a GPU side: the model loads on the CPU and each neuron's rows go to one side (hot rows and the dense
        # parts to the GPU); a GGUF's quantized blocks stay quantized there too, unless --dtype says otherwise
        from hotcold.engine.loader import default_dtype, holds_quantized_ffn

        device = "cpu"
        if dtype is None and not quantize and not holds_quantized_ffn(args.model):
            dtype = default_dtype(args.device)  # the GPU side gathers 16/32-bit rows
    loaded = load_model(args.model, dtype=dtype, device=device, activation=args.activation, quantize=quantize)
    if args.model in (None, "", "default"):  # requests that set no sampling fields get the model card's
        from hotcold.engine.default_model import SAMPLING_DEFAULTS

        for name, value in SAMPLING_DEFAULTS.items():
            if getattr(loaded.generation, name) is None:
                setattr(loaded.generation, name, value)
    if plan is not None:
        from hotcold.engine.hybrid import HybridConfig, apply_hybrid

        plan.check_model(loaded.fingerprint, str(args.plan))
        if mode == "input":
            return _apply_input_plan(loaded, plan, args)
        place, budget = _gpu_budget(plan, args)
        if place:
            _replan(plan, loaded, budget, kv)
        config = HybridConfig(mode=mode, placement=args.placement)
        apply_hybrid(loaded.model, plan, config, loaded.fingerprint, gpu_device=args.device)  # --device decides
        if mode != "off" and loaded.model.device.type == "cpu" and any(
                lp.inputs is not None and lp.inputs.thresholds for lp in plan.layers):
            from hotcold.engine.input_sparsity import dense_ffn_sites

            # a neuron plan with input thresholds too: attention's, and those of the FFNs left dense
            thresholds = [lp.inputs.thresholds if lp.inputs is not None else {} for lp in plan.layers]
            _apply_input_thresholds(loaded, dense_ffn_sites(loaded.model, thresholds), args)
    return loaded


def _apply_input_plan(loaded, plan, args: argparse.Namespace):
    if getattr(args, "gpu_memory", None) is not None:
        raise HotcoldError("--gpu-memory places a plan's hot neurons; an input-sparsity plan has none")
    _apply_input_thresholds(loaded, [lp.inputs.thresholds for lp in plan.layers], args)
    return loaded


def _apply_input_thresholds(loaded, thresholds: list[dict[str, float]], args: argparse.Namespace) -> None:
    from hotcold.engine.input_sparsity import apply_input_sparsity, describe
    from hotcold.kernels import native

    prefill = getattr(args, "sparse_prefill", False)
    apply_input_sparsity(loaded.model, thresholds, prefill=prefill)
    logging.getLogger(__name__).info(describe(thresholds, prefill))
    native.release_heap()  # the row-major copies the input-major ones replaced, and the conversion's temporaries


_CHAT_TEMPLATE_TOKENS = 512  # room for a chat template's system prompt and role markers


def _gpu_budget(plan, args: argparse.Namespace) -> tuple[bool, int | None]:
    """(whether to re-place the plan's hot neurons, for how many bytes of GPU memory: None for no limit):
    --gpu-memory, else on a GPU the budget the plan was made for, re-placed around this run's KV cache."""
    import torch

    from hotcold.engine.placement import parse_memory

    if getattr(args, "gpu_memory", None) is not None:
        return True, parse_memory(args.gpu_memory)
    made_for = plan.placement.get("gpu_memory_bytes")
    if torch.device(args.device).type != "cpu" and made_for:
        return True, int(made_for)
    return False, None


def _replan(plan, loaded, budget: int | None, kv: KVReserve) -> None:
    """The plan's hot neurons re-placed for `budget` bytes of GPU memory (None: no limit), after the dense
    parts and the KV cache `kv`; what was chosen on stderr, or one line naming the flags to change when the
    dense parts and that cache alone do not fit."""
    from hotcold.engine.placement import fmt_bytes, replan

    context = kv.context(loaded.config.max_position_embeddings)
    # the dense parts' float bytes on the GPU: a quantized model's norms and activations run in bfloat16 there
    dtype_bytes = 2 if loaded.model.quantized else loaded.model.dtype.itemsize
    try:
        placed = replan(plan, loaded.model, budget, dtype_bytes, context, kv.sequences)
    except HotcoldError as exc:
        lower = f"lower {kv.flags}, or give" if kv.flags else "give a larger"
        raise HotcoldError(f"{exc} (this run's KV cache: {kv.sequences} x {context} tokens; {lower} "
                           "--gpu-memory)") from None
    p = placed.placement
    print(f"hotcold: GPU budget {fmt_bytes(budget)}: {sum(p.hot_counts)} hot neurons ({fmt_bytes(p.hot_bytes)}, "
          f"{100 * p.served / max(p.total, 1e-9):.0f}% of expected activations) after {fmt_bytes(placed.reserved)} "
          f"for the dense parts and the KV cache of {kv.sequences} x {context} tokens", file=sys.stderr)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def run(args: argparse.Namespace) -> int:
    from hotcold.engine.llm import LLMEngine
    from hotcold.engine.sampling import SamplingParams

    if not args.prompt:
        raise HotcoldError("the prompt is empty")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
        raise HotcoldError("--prompt is not valid UTF-8") from None
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop).validate()
    # the KV cache a plan's GPU budget must leave room for: at most a token per byte of the prompt (byte-level
    # and byte-fallback tokenizers), the chat template's own tokens, and the answer
    tokens = len(args.prompt.encode()) + (_CHAT_TEMPLATE_TOKENS if args.chat else 8) + args.max_tokens
    loaded = load_from_args(args, KVReserve(1, tokens, "--max-tokens or the prompt"))
    tok = loaded.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else tok.encode(args.prompt)
    engine = LLMEngine(loaded, max_num_seqs=1, max_model_len=min(loaded.config.max_position_embeddings,
                                                                  len(ids) + args.max_tokens))
    if not args.chat:
        sys.stdout.write(args.prompt)
    for out in engine.stream(ids, params):
        sys.stdout.write(out.new_text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
