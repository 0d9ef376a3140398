"""LLMEngine: requests in, token deltas out, one scheduler step at a time (not thread-safe: one caller)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch

from hotcold.engine.block_manager import BlockManager
from hotcold.engine.cache import KVCache
from hotcold.engine.config import GATED, ModelConfig
from hotcold.engine.errors import HotcoldError
from hotcold.engine.loader import LoadedModel
from hotcold.engine.model import StepBatch, attn_dtype
from hotcold.engine.sampling import SamplingParams, sample_token, token_logprob
from hotcold.engine.sequence import RequestOutput, Sequence

log = logging.getLogger("hotcold.engine")

__all__ = ["LLMEngine", "RequestOutput", "SamplingParams"]


def attention_scale(cfg: ModelConfig) -> float:
    """Keys of context whose attention costs what one token's pass through the weights costs (the
    scheduler's token-equivalents): per layer, the projections' multiply-adds over attention's per key."""
    qkv_o = cfg.hidden_size * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    ffn = cfg.hidden_size * cfg.intermediate_size * (3 if cfg.activation in GATED else 2) * max(
        1, min(cfg.num_experts, cfg.num_experts_per_tok))
    return (qkv_o + ffn) / (2 * cfg.num_heads * cfg.head_dim)


class LLMEngine:
    """`kv_cache_tokens` sizes the paged KV cache (default: room for max_num_seqs full contexts);
    `block_size` is its page; `enable_prefix_caching` reuses the blocks of shared prompt prefixes;
    `max_step_seconds` bounds a step while other requests wait on it (chunked prefill, engine/scheduler.py)."""

    def __init__(self, loaded: LoadedModel, max_num_seqs: int = 16, max_model_len: int | None = None,
                 max_num_batched_tokens: int = 512, kv_cache_tokens: int | None = None, block_size: int = 16,
                 enable_prefix_caching: bool = True, max_step_seconds: float | None = 0.25):
        from hotcold.engine.scheduler import Scheduler

        cfg = loaded.config
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if max_num_seqs < 1 or max_num_batched_tokens < max_num_seqs:
            raise HotcoldError("need max_num_seqs >= 1 and max_num_batched_tokens >= max_num_seqs")
        if block_size < 1 or block_size & (block_size - 1):
            raise HotcoldError(f"the KV block size must be a power of two, not {block_size}")
        self.max_num_seqs = max_num_seqs
        num_blocks = -(-(kv_cache_tokens or max_num_seqs * self.max_model_len) // block_size)
        if num_blocks * block_size < self.max_model_len:
            raise HotcoldError(f"a KV cache of {num_blocks * block_size} tokens cannot hold one sequence of "
                               f"max_model_len {self.max_model_len}: raise --kv-cache-tokens or lower --max-model-len")
        self.cache = KVCache(cfg.num_layers, num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim,
                             attn_dtype(self.model.device, self.model.dtype), self.model.device)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(max_num_seqs, max_num_batched_tokens, self.blocks, attention_scale(cfg),
                                   max_step_seconds)
        self.eos_ids = loaded.eos_token_ids
        self._ids: set[str] = set()
        self.last_ffn_sparsity: float | None = None  # of the last step, when the FFNs run sparsely
        self.last_hot_share: float | None = None

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        params.validate()
        if request_id in self._ids:
            raise HotcoldError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise HotcoldError("the prompt is empty")
        vocab = self.loaded.config.vocab_size
        if any(not 0 <= int(t) < vocab for t in prompt_token_ids):
            raise HotcoldError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise HotcoldError(f"this model's maximum context length is {self.max_model_len} tokens; the prompt "
                               f"has {len(prompt_token_ids)}")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise HotcoldError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request asks for "
                f"{total} ({len(prompt_token_ids)} in the prompt + {params.max_tokens} to generate)")
        if self.blocks.blocks_for(total) > len(self.blocks.blocks):
            raise HotcoldError(f"the request needs {total} tokens of KV cache; the cache holds "
                               f"{len(self.blocks.blocks) * self.blocks.block_size}")
        self._ids.add(request_id)
        self.scheduler.add(Sequence(request_id, [int(t) for t in prompt_token_ids], params, self.eos_ids))

    def abort(self, request_id: str) -> None:
        seq = self.scheduler.find(request_id)
        if seq is not None:
            seq.finish_reason = "abort"
            self._finish(seq)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self._ids.discard(seq.request_id)

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan:
            return []
        ids, rows, wanted = [], [], []  # wanted: (sequence, its first row in `rows`, prompt rows, samples?)
        for seq, n in plan:
            start = len(ids)
            ids.extend(seq.tokens(seq.num_computed, seq.num_computed + n))
            prompt_rows = 0
            if seq.params.prompt_logprobs is not None and seq.num_computed < seq.num_prompt_tokens - 1:
                prompt_rows = min(n, seq.num_prompt_tokens - 1 - seq.num_computed)  # row t scores token t+1
            samples = seq.num_computed + n == seq.num_tokens  # the chunk reaches the end: sample after it
            if prompt_rows or samples:
                wanted.append((seq, len(rows), prompt_rows, samples))
                rows.extend(range(start, start + prompt_rows))
                if samples:
                    rows.append(len(ids) - 1)
        batch = StepBatch([s.table.blocks for s, _ in plan], [s.num_computed for s, _ in plan], [n for _, n in plan])
        device = self.model.device
        counters = getattr(self.model, "ffn_counters", None)
        if counters is not None:
            counters.reset()
        t0 = time.perf_counter()
        rows_t = torch.tensor(rows, dtype=torch.long, device=device)
        logits = self.model(torch.tensor(ids, device=device), batch, self.cache, rows_t).cpu()
        for seq, n in plan:
            seq.num_computed += n
            self.scheduler.computed(seq)
        self.scheduler.observe(plan, time.perf_counter() - t0)
        if counters is not None:
            self.last_ffn_sparsity, self.last_hot_share = counters.sparsity, counters.hot_share
        return [out for seq, row, prompt_rows, samples in wanted
                if (out := self._advance(seq, logits, row, prompt_rows, samples)) is not None]

    def _advance(self, seq: Sequence, logits: torch.Tensor, row: int, prompt_rows: int,
                 samples: bool) -> RequestOutput | None:
        """Score the prompt rows, sample the next token; a failure here fails this request alone."""
        try:
            k = seq.params.prompt_logprobs
            if k is not None and not seq.prompt_logprobs:
                seq.prompt_logprobs.append(None)  # the first prompt token has no logprob
            if prompt_rows:  # row i scores the prompt token after it; the cache was not used for these
                begin = len(seq.prompt_logprobs)
                targets = seq.prompt_ids[begin: begin + prompt_rows]
                seq.prompt_logprobs += [token_logprob(logits[row + i], t, k) for i, t in enumerate(targets)]
            if not samples:
                return None
            if seq.params.max_tokens == 0:
                seq.finish_without_output()
                token, logprob, delta = None, None, ""
            else:
                token, logprob = sample_token(logits[row + prompt_rows], seq.params, seq.generator,
                                              seq.prompt_ids, seq.output_ids)
                delta = seq.append(token, self.tokenizer, self.max_model_len)
            error = None
        except Exception as exc:  # noqa: BLE001 - contained: the step's other requests go on
            log.exception("request %s failed while sampling", seq.request_id)
            seq.finish_reason, token, logprob, delta, error = "error", None, None, "", f"{type(exc).__name__}: {exc}"
        if seq.finish_reason:
            self._finish(seq)
        first = len(seq.output_ids) <= 1
        return RequestOutput(seq.request_id, [] if token is None else [token], delta,
                             [logprob] if logprob else None, seq.finished, seq.finish_reason,
                             seq.num_prompt_tokens, len(seq.output_ids),
                             prompt_logprobs=seq.prompt_logprobs if first and k is not None else None,
                             num_cached_tokens=seq.num_cached, error=error)

    def stats(self) -> dict:
        running, blocks = self.scheduler.running, self.blocks
        return {"num_running": len(running), "num_waiting": len(self.scheduler.waiting),
                "kv_cache_usage": blocks.num_referenced / len(blocks.blocks),
                "prefix_cache_hit_rate": blocks.hit_rate, "prefix_cache_queried_tokens": blocks.queried_tokens,
                "prefix_cache_hit_tokens": blocks.hit_tokens,
                "ffn_sparsity": self.last_ffn_sparsity, "hot_share": self.last_hot_share}

    def stream(self, prompt_token_ids: list[int], params: SamplingParams,
               request_id: str = "0") -> Iterator[RequestOutput]:
        """Run one request alone and yield its deltas (the CLI's path)."""
        self.add_request(request_id, prompt_token_ids, params)
        while self.has_unfinished():
            yield from (o for o in self.step() if o.request_id == request_id)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Run several requests to completion together; return their finished sequences in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            self.add_request(f"gen-{i}", prompt, p)
        seqs = list(self.scheduler.waiting)[-len(prompts):]
        while self.has_unfinished():
            self.step()
        return seqs
