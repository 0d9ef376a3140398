"""`hotcold loadtest`: a load generator for any OpenAI-compatible streaming server (vLLM `bench serve` style).

Requests stream over SSE; arrivals are Poisson (gamma gaps when burstiness != 1); a semaphore caps
concurrency; every request is bounded by `--timeout` and the whole run by `--max-duration`, so it always
ends. Nothing here imports torch: the engine's tokenizer is imported lazily and only to size prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import httpx
import numpy as np

from hotcold.engine.errors import HotcoldError
from hotcold.server.loadtest_client import ClientConfig, CtrlC, ServerTokenizer
from hotcold.server.loadtest_data import (
    Prompt,
    arrival_gaps,
    file_prompts,
    load_prompt_tokenizer,
    random_prompts,
)
from hotcold.server.loadtest_stats import format_summary, parse_goodput_item, summarize

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, e.g. http://host:8000")
    parser.add_argument("--endpoint", default=ENDPOINTS[0], choices=ENDPOINTS)
    parser.add_argument("--model", help="model name to request (default: the first of GET /v1/models)")
    parser.add_argument("--tokenizer", help="hotcold model spec to size prompts with (default: try --model)")
    parser.add_argument("--num-prompts", type=int, default=64, help="number of requests (default 64)")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="mean requests per second, or inf to send all at once (default inf)")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of the gaps: 1 = Poisson, <1 burstier, >1 more regular")
    parser.add_argument("--max-concurrency", type=int, help="most requests in flight at once")
    parser.add_argument("--dataset", default="random",
                        help="'random', or a JSONL file of objects with 'prompt' or 'messages' "
                        "(and optionally 'max_tokens')")
    parser.add_argument("--input-len", type=int, default=128, help="random prompts: tokens (default 128)")
    parser.add_argument("--output-len", type=int, default=64, help="max_tokens of each request (default 64)")
    parser.add_argument("--range-ratio", type=float, default=0.0,
                        help="random lengths drawn uniformly in [L*(1-F), L*(1+F)] (default 0)")
    parser.add_argument("--seed", type=int, default=None,
                        help="prompts and arrivals (default: a fresh seed each run, printed: repeated prompts "
                             "would measure a server's prefix cache rather than its engine)")
    parser.add_argument("--goodput", nargs="+", type=parse_goodput_item, metavar="KEY:MS",
                        help="SLOs for goodput, e.g. ttft:500 tpot:100 e2el:5000 (milliseconds)")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM/hotcold extension)")
    parser.add_argument("--save-result", metavar="FILE.json",
                        help="write the summary and every request's record")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds allowed per request (default 300)")
    parser.add_argument("--max-duration", type=float, default=3600.0,
                        help="overall deadline in seconds: requests still running then are cancelled")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------- the command
MAX_LEN = 2**20  # tokens of a prompt or an answer: past any model's context


def _check(args: argparse.Namespace) -> None:
    problems = [
        (args.num_prompts < 1, "--num-prompts must be >= 1"),
        (not args.request_rate > 0, "--request-rate must be > 0 (or inf)"),
        (not (args.burstiness > 0 and math.isfinite(args.burstiness)), "--burstiness must be > 0"),
        (args.max_concurrency is not None and args.max_concurrency < 1, "--max-concurrency must be >= 1"),
        (args.input_len < 1 or args.output_len < 1, "--input-len and --output-len must be >= 1"),
        (max(args.input_len, args.output_len) > MAX_LEN,  # 10^8 built prompts for minutes and took 14 GB
         f"--input-len and --output-len must be <= {MAX_LEN} tokens"),
        (args.seed is not None and not 0 <= args.seed < 2**32, "--seed must be in [0, 2^32)"),
        (not (math.isfinite(args.temperature) and args.temperature >= 0), "--temperature must be a finite number >= 0"),
        (not 0 <= args.range_ratio < 1, "--range-ratio must be in [0, 1)"),
        (not args.timeout > 0 or not args.max_duration > 0, "--timeout and --max-duration must be > 0"),
    ]
    for bad, message in problems:
        if bad:
            raise HotcoldError(message)
    if args.save_result:  # checked before the run, not after it (the records would be lost)
        out = Path(args.save_result)
        if out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
            raise HotcoldError(f"--save-result {args.save_result}: not a file that can be written")


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise HotcoldError(f"--base-url must start with http:// or https:// (got {url!r})")
    port = httpx.URL(url).port
    if port is not None and not 0 < port < 65536:
        raise HotcoldError(f"--base-url: port {port} is out of range")
    return url[:-3] if url.endswith("/v1") else url


def list_models(base: str, headers: dict[str, str], timeout: float) -> list[dict]:
    """GET /v1/models: the served models (id, and `root`, the model's path, where the server says it)."""
    try:
        resp = httpx.get(f"{base}/v1/models", headers=headers, timeout=min(timeout, 30.0))
        resp.raise_for_status()
        models = [m for m in resp.json()["data"] if isinstance(m, dict) and "id" in m]
        if not models:
            raise ValueError("the server lists no model")
        return models
    except Exception as exc:
        raise HotcoldError(f"could not list the models at {base}/v1/models ({type(exc).__name__}: {exc}); "
                           "is the server up? or pass --model") from None


def choose_model(args: argparse.Namespace, base: str, headers: dict[str, str]) -> tuple[str, str | None]:
    """(model to request, tokenizer spec or None). The first listed model unless --model is given (as
    vLLM's benchmark does); the tokenizer is --tokenizer, else a local path the server or --model names
    ('default' only when already cached: no download on a machine that only runs the client)."""
    try:
        models = list_models(base, headers, args.timeout)
    except HotcoldError:
        if not args.model:
            raise
        models = []
    model = args.model or str(models[0]["id"])
    roots = [str(m.get("root")) for m in models if m.get("id") == model and m.get("root")]
    local = [s for s in (*roots, model) if (_default_cached() if s == "default" else Path(s).exists())]
    return model, args.tokenizer or (local[0] if local else None)


def _default_cached() -> bool:
    """Whether hotcold's default model is already in this machine's cache (so no download is needed)."""
    try:
        from hotcold.engine.default_model import FILENAME, cache_dir

        return (cache_dir() / "models" / FILENAME).is_file()
    except Exception:
        return False


def prefix_cache_counts(base: str, headers: dict) -> tuple[float, float] | None:
    """(prompt tokens looked up, found) from a hotcold or vLLM server's /metrics; None where it has none."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"{base}/metrics", headers=headers, timeout=10).text
        values = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    except Exception:  # no /metrics, or not Prometheus text: nothing to report
        return None
    for prefix in ("hotcold:", "vllm:"):
        if f"{prefix}prefix_cache_queries_total" in values:
            return values[f"{prefix}prefix_cache_queries_total"], values[f"{prefix}prefix_cache_hits_total"]
    return None


def run(args: argparse.Namespace) -> int:
    _check(args)
    base = _base_url(args.base_url)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model, spec = choose_model(args, base, headers)
    chat = args.endpoint == "/v1/chat/completions"
    tokenizer, why = load_prompt_tokenizer(spec)
    if tokenizer is None and args.tokenizer:
        raise HotcoldError(f"--tokenizer {args.tokenizer}: {why}")
    how = f"tokenizer of {spec}"
    if tokenizer is None:  # no local copy: the server's own, where it has vLLM's /tokenize
        tokenizer, why_not = ServerTokenizer.probe(base, model, headers, min(args.timeout, 30.0))
        rule = "1 token per word" if args.dataset == "random" else "~4 chars/token"
        about = f"no hotcold tokenizer for {spec!r}: " if spec else ""
        how = ("the server's tokenizer (/tokenize)" if tokenizer is not None
               else f"approximate counts ({rule}; {about}{why}; {why_not})")
    if args.seed is None:
        args.seed = int(np.random.SeedSequence().entropy % 2**31)
    prompt_rng, arrival_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(args.seed).spawn(2))
    try:
        if args.dataset == "random":
            prompts = random_prompts(args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                                     prompt_rng, tokenizer)
        else:
            if not Path(args.dataset).is_file():
                raise HotcoldError(f"--dataset: no such file {args.dataset!r} (or use 'random')")
            prompts = file_prompts(args.dataset, args.num_prompts, args.output_len, chat, tokenizer)
    finally:
        if isinstance(tokenizer, ServerTokenizer):
            tokenizer.close()
    gaps = arrival_gaps(args.num_prompts, args.request_rate, args.burstiness, arrival_rng)
    cfg = ClientConfig(url=base + args.endpoint, chat=chat, model=model, timeout=args.timeout,
                       max_duration=args.max_duration, max_concurrency=args.max_concurrency,
                       temperature=args.temperature, ignore_eos=args.ignore_eos,
                       progress=not args.no_progress, headers=headers)
    kind = "Poisson" if args.burstiness == 1 else f"gamma gaps, burstiness {args.burstiness:g}"
    rate = "all at once" if math.isinf(args.request_rate) else f"{args.request_rate:g} req/s ({kind})"
    print(f"target {cfg.url}  model {model!r}  {args.num_prompts} requests  dataset {args.dataset}")
    print(f"traffic: {rate}, max concurrency {args.max_concurrency or 'unlimited'}")
    print(f"prompts: {how}, seed {args.seed}", flush=True)

    before = prefix_cache_counts(base, headers)
    with CtrlC().installed() as ctrl_c:  # until the result is printed and saved
        return _measure_and_report(args, base, cfg, prompts, gaps, ctrl_c, before, how)


def _measure_and_report(args: argparse.Namespace, base: str, cfg: ClientConfig, prompts: list[Prompt],
                        gaps: np.ndarray, ctrl_c: CtrlC, before: tuple[float, float] | None, how: str) -> int:
    headers = cfg.headers
    measured = ctrl_c.run(cfg, prompts, gaps)
    records = measured.records
    # an interrupted run is summarized over the requests that went out: the rest were never tried
    counted = [r for r in records if r.sent] if measured.interrupted else records
    summary = summarize(counted, measured.duration_s, dict(args.goodput or []), args.max_concurrency)
    after = None
    try:
        with ctrl_c.skippable():
            after = prefix_cache_counts(base, headers)
    except KeyboardInterrupt:
        print("Ctrl-C: the server's prefix-cache counts are left out", flush=True)
    if before is not None and after is not None and after[0] > before[0]:
        summary["prefix_cache_hit_rate"] = (after[1] - before[1]) / (after[0] - before[0])
    if measured.interrupted:
        print(f"interrupted (Ctrl-C): {len(counted)} of {len(records)} requests were sent; "
              "the summary counts those", flush=True)
    print(format_summary(summary))
    if "prefix_cache_hit_rate" in summary:
        print(f"server prefix cache: {summary['prefix_cache_hit_rate']:.1%} of prompt tokens found (its /metrics)")
    if args.save_result:
        result = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": {k: "inf" if v == math.inf else v for k, v in vars(args).items() if k != "api_key"}
            | {"model": cfg.model, "url": cfg.url, "prompt_lengths": how},
            "interrupted": measured.interrupted,
            "summary": summary,
            "requests": [r.to_json() for r in records],
        }
        Path(args.save_result).write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
        print(f"saved {args.save_result}")
    if ctrl_c.pressed:
        return 130
    return 0 if summary["successful_requests"] else 1
