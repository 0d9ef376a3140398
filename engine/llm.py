"""LLMEngine: requests in, token deltas out, one scheduler step at a time (not thread-safe: one caller)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from hotcold.engine.cache import KVCache
from hotcold.engine.errors import HotcoldError
from hotcold.engine.loader import LoadedModel
from hotcold.engine.model import StepBatch, attn_dtype
from hotcold.engine.sampling import SamplingParams, sample_token
from hotcold.engine.sequence import RequestOutput, Sequence

__all__ = ["LLMEngine", "RequestOutput", "SamplingParams"]


class LLMEngine:
    def __init__(self, loaded: LoadedModel, max_num_seqs: int = 16, max_model_len: int | None = None,
                 max_num_batched_tokens: int = 512):
        from hotcold.engine.scheduler import Scheduler

        cfg = loaded.config
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if max_num_seqs < 1 or max_num_batched_tokens < max_num_seqs:
            raise HotcoldError("need max_num_seqs >= 1 and max_num_batched_tokens >= max_num_seqs")
        self.max_num_seqs = max_num_seqs
        self.cache = KVCache(cfg.num_layers, max_num_seqs, cfg.num_kv_heads, self.max_model_len, cfg.head_dim,
                             attn_dtype(self.model.device, self.model.dtype), self.model.device)
        self.scheduler = Scheduler(max_num_seqs, max_num_batched_tokens)
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
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise HotcoldError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request asks for "
                f"{total} ({len(prompt_token_ids)} in the prompt + {params.max_tokens} to generate)")
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
        ids, sampled, rows = [], [], []
        for seq, n in plan:
            ids.extend(seq.all_ids[seq.num_computed: seq.num_computed + n])
            if seq.num_computed + n == seq.num_tokens:  # the chunk reaches the end: sample after it
                sampled.append(seq)
                rows.append(len(ids) - 1)
        batch = StepBatch([s.slot for s, _ in plan], [s.num_computed for s, _ in plan], [n for _, n in plan])
        device = self.model.device
        counters = getattr(self.model, "ffn_counters", None)
        if counters is not None:
            counters.reset()
        rows_t = torch.tensor(rows, dtype=torch.long, device=device)
        logits = self.model(torch.tensor(ids, device=device), batch, self.cache, rows_t)
        for seq, n in plan:
            seq.num_computed += n
        if counters is not None:
            self.last_ffn_sparsity, self.last_hot_share = counters.sparsity, counters.hot_share
        logits = logits.cpu()
        outputs = []
        for seq, row in zip(sampled, logits):
            token, logprob = sample_token(row, seq.params, seq.generator, seq.prompt_ids, seq.output_ids)
            delta = seq.append(token, self.tokenizer, self.max_model_len)
            if seq.finish_reason:
                self._finish(seq)
            outputs.append(RequestOutput(seq.request_id, [token], delta, [logprob] if logprob else None,
                                         seq.finished, seq.finish_reason, len(seq.prompt_ids), len(seq.output_ids)))
        return outputs

    def stats(self) -> dict:
        running = self.scheduler.running
        used = sum(s.num_computed for s in running)
        return {"num_running": len(running), "num_waiting": len(self.scheduler.waiting),
                "kv_cache_usage": used / (self.max_num_seqs * self.max_model_len),
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
