"""One model instance: requests in, tokens out, one step at a time.

    step():  schedule() ──▶ execute(batch) ──▶ update(batch, sampled)

The scheduler decides who runs (and never touches tensors); the model runner
turns its decision into tensors (and decides nothing); update() appends the
sampled tokens, detokenizes, applies the stop conditions and frees finished
requests. KV export/import for handoff and migration sit beside the loop.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

import torch

from engine import envs
from engine.attention import get_backend
from engine.config import EngineConfig, ModelConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import InvalidRequestError, KVImportError
from engine.kv.cache_manager import KVCacheManager
from engine.kv.kv_cache import (
    LAYOUT_FIELDS,
    KVBlockMeta,
    PagedKVCache,
    check_import,
    check_layout,
    kv_checksum,
)
from engine.model_runner import ModelRunner
from engine.models.loader import load_model, read_model_config
from engine.models.source import resolve_model
from engine.outputs import RequestOutput
from engine.request import Request, RequestStatus
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.tokenizer import load_tokenizer


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._init_threads()
        self._init_model()
        self._init_kv_cache()
        self.scheduler = Scheduler(self.kv, config.max_num_batched_tokens, config.max_num_seqs)
        self.sampler = Sampler(config.seed)
        self.requests: dict[str, Request] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._aborted: list[RequestOutput] = []
        self._next_id = itertools.count()

    def _init_threads(self) -> None:
        torch.set_num_threads(self.config.num_threads or envs.num_threads() or os.cpu_count() or 1)

    def _init_model(self) -> None:
        self.source = resolve_model(self.config.model)
        self.model_id = self.source.model_id
        self.model_config: ModelConfig = read_model_config(self.source)
        cfg = self.model_config
        # Sliding-window attention is not implemented, so the context is capped at the
        # window: within it, full attention is exactly what the model computes.
        limits = [self.config.max_model_len or cfg.max_position_embeddings, cfg.sliding_window]
        self.max_model_len = min(x for x in limits if x)
        self.model = load_model(self.source, self.config.torch_dtype, self.max_model_len)
        self.tokenizer = load_tokenizer(self.source)
        eos = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)

    def _init_kv_cache(self) -> None:
        cfg, ecfg = self.model_config, self.config
        backend_cls = get_backend(ecfg.attention_backend)
        self.backend = backend_cls(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        bytes_per_block = (
            cfg.num_layers
            * 2
            * ecfg.block_size
            * cfg.num_kv_heads
            * cfg.head_dim
            * ecfg.torch_dtype.itemsize
        )
        num_blocks = ecfg.num_blocks or max(1, ecfg.kv_cache_memory_bytes // bytes_per_block)
        shape = backend_cls.kv_cache_shape(
            num_blocks, ecfg.block_size, cfg.num_kv_heads, cfg.head_dim
        )
        layers = [torch.zeros(shape, dtype=ecfg.torch_dtype) for _ in range(cfg.num_layers)]
        self.kv_cache = PagedKVCache(layers, ecfg.block_size)
        self.kv = KVCacheManager(num_blocks, ecfg.block_size, ecfg.enable_prefix_caching)
        self.runner = ModelRunner(self.model, self.backend, self.kv_cache)

    # ---- requests in -------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        hold_after_prefill: bool = False,
    ) -> str:
        """Queues a request; returns its id (`request_id`, or a new one).

        With `hold_after_prefill` (a prefill instance), the request stops after its
        first token unless that token finished it: it is HELD, its blocks kept for
        `read_kv` until `release`.
        """
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        request = self._new_request(prompt_ids, params, request_id)
        request.hold_after_prefill = hold_after_prefill
        self.scheduler.add(request)
        return request.request_id

    def _new_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> Request:
        if request_id is None:
            request_id = str(next(self._next_id))
        elif request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self._validate(prompt_ids, params)
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            params=params,
            eos_token_ids=self.eos_token_ids,
        )
        self.requests[request.request_id] = request
        self._detokenizers[request.request_id] = IncrementalDetokenizer(
            self.tokenizer, prompt_ids, params.stop
        )
        return request

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        vocab = self.model_config.vocab_size
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty; send at least one token")
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})"
            )
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                f"{self.max_model_len}, so it must be at most {self.max_model_len - 1}"
            )
        params.check_vocab(vocab)
        room = self.max_model_len - len(prompt_ids)
        if params.max_tokens > room:
            raise InvalidRequestError(
                f"max_tokens={params.max_tokens} exceeds the room left in the context: the prompt "
                f"has {len(prompt_ids)} of {self.max_model_len} tokens, so at most {room} "
                "can follow"
            )
        needed = self.kv.blocks_for(len(prompt_ids) + params.max_tokens)
        if needed > self.kv.pool.num_blocks:
            raise InvalidRequestError(
                f"prompt plus max_tokens needs {needed} KV blocks, the cache has "
                f"{self.kv.pool.num_blocks}; lower max_tokens or enlarge the KV cache"
            )

    def abort_request(self, request_id: str) -> None:
        """Ends a request in any state; its blocks are freed at once. Unknown ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        self._aborted.append(self._output(request, [], finished=True))
        del self._detokenizers[request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._aborted)

    def has_pending_steps(self) -> bool:
        """Whether step() has anything to do (held and reserved requests wait on others)."""
        return bool(self.scheduler.waiting or self.scheduler.running or self._aborted)

    # ---- the step loop -------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        outputs, self._aborted = self._aborted, []
        if batch.is_empty:
            return outputs
        logits = self.runner.execute(batch)
        sampled = self.sampler(
            logits, [self.requests[s.request_id] for s in batch.scheduled if s.sample]
        )
        return outputs + self._update(batch, sampled)

    def _update(self, batch: SchedulerOutput, sampled: list[int]) -> list[RequestOutput]:
        outputs = []
        new_tokens = iter(sampled)
        for item in batch.scheduled:
            request = self.requests[item.request_id]
            request.num_computed_tokens += len(item.token_ids)
            self.kv.cache_computed_blocks(request)
            if not item.sample:
                continue
            token_id = next(new_tokens)
            request.append_token(token_id)
            status, stop_reason = self._check_stop(request, token_id)
            outputs.append(self._finish_or_report(request, [token_id], status, stop_reason))
            if status is None and request.hold_after_prefill:
                self.scheduler.hold(request)
        return outputs

    def _check_stop(
        self, request: Request, token_id: int
    ) -> tuple[RequestStatus | None, str | int | None]:
        params = request.params
        if token_id in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token_id
        if token_id in request.eos_token_ids and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED, None
        detokenizer = self._detokenizers[request.request_id]
        detokenizer.add(token_id)
        if detokenizer.stopped_by is not None:
            return RequestStatus.FINISHED_STOPPED, detokenizer.stopped_by
        if request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None

    def _finish_or_report(
        self,
        request: Request,
        new_ids: list[int],
        status: RequestStatus | None,
        stop_reason: str | int | None,
    ) -> RequestOutput:
        if status is None:
            return self._output(request, new_ids, finished=False)
        self._detokenizers[request.request_id].flush()
        self.scheduler.finish(request, status)
        output = self._output(request, new_ids, finished=True, stop_reason=stop_reason)
        del self.requests[request.request_id], self._detokenizers[request.request_id]
        return output

    def _output(
        self,
        request: Request,
        new_ids: list[int],
        finished: bool,
        stop_reason: str | int | None = None,
    ) -> RequestOutput:
        detokenizer = self._detokenizers[request.request_id]
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=request.output_token_ids,
            text=detokenizer.text,
            finished=finished,
            finish_reason=request.status.finish_reason if finished else None,
            stop_reason=stop_reason,
            new_token_ids=new_ids,
            new_text=detokenizer.emittable(finished),
            logprobs=list(request.logprobs) if request.params.logprobs is not None else None,
            num_cached_tokens=request.num_cached_tokens,
        )

    # ---- KV export and import (handoff, migration) ----------------------------------------

    def _layout(self, num_tokens: int, block_ids: list[int], checksum: int) -> KVBlockMeta:
        cfg = self.model_config
        return KVBlockMeta(
            model_id=self.model_id,
            dtype=self.config.dtype,
            block_size=self.config.block_size,
            num_layers=cfg.num_layers,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            num_tokens=num_tokens,
            block_ids=block_ids,
            checksum=checksum,
        )

    def export_kv(self, request_id: str) -> tuple[KVBlockMeta, torch.Tensor]:
        """The computed blocks of a running or held request, with their metadata."""
        request = self.requests[request_id]
        num_tokens = request.num_computed_tokens
        block_ids = request.block_ids[: self.kv.blocks_for(num_tokens)]
        data, checksum = self.read_kv(request_id, 0, len(block_ids))
        return self._layout(num_tokens, block_ids, checksum), data

    def read_kv(self, request_id: str, start: int, end: int) -> tuple[torch.Tensor, int]:
        """Blocks [start, end) of a request's computed KV, and the CRC-32 of their filled slots."""
        request = self.requests[request_id]
        if not 0 <= start < end <= self.kv.blocks_for(request.num_computed_tokens):
            raise KVImportError(
                f"blocks [{start}, {end}) of request {request_id} are not computed: it has "
                f"{request.num_computed_tokens} tokens in the cache"
            )
        data = self.kv_cache.read_blocks(request.block_ids[start:end])
        num_tokens = min(request.num_computed_tokens, end * self.kv.block_size)
        return data, kv_checksum(data, num_tokens - start * self.kv.block_size)

    def release(self, request_id: str) -> None:
        """Frees a held request once its KV lives elsewhere; no output is produced."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        del self._detokenizers[request_id]

    def layout(self) -> KVBlockMeta:
        """This engine's KV layout (the token and block fields empty)."""
        return self._layout(0, [], 0)

    def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        num_kv_tokens: int,
        layout: KVBlockMeta,
    ) -> int:
        """Allocates blocks for a request whose KV will arrive; returns how many.

        The request is RESERVED until `commit` (or `abort_request`).
        """
        check_layout(layout, self.layout())
        request = self._new_request(list(prompt_token_ids), params, request_id)
        if not 0 < num_kv_tokens < self.max_model_len:
            self._drop(request)
            raise KVImportError(f"cannot reserve KV for {num_kv_tokens} tokens")
        if not self.scheduler.reserve(request, num_kv_tokens):
            self._drop(request)
            raise KVImportError(
                f"no room: {self.kv.blocks_for(num_kv_tokens)} blocks asked, "
                f"{self.kv.pool.num_free_blocks} free, "
                f"{self.scheduler.num_unfinished} of {self.scheduler.max_num_seqs} requests"
            )
        return len(request.block_ids)

    def write_kv(
        self, request_id: str, start: int, data: torch.Tensor, num_tokens: int, checksum: int
    ) -> None:
        """Writes arriving blocks [start, start + n) of a reserved request, checksum first."""
        request = self._reserved(request_id)
        end = start + data.shape[1]
        if start < 0 or end > len(request.block_ids):
            raise KVImportError(
                f"blocks [{start}, {end}) fall outside the {len(request.block_ids)} reserved"
            )
        expected = self.kv_cache.layers[0].shape[1:]
        if tuple(data.shape[2:]) != tuple(expected) or data.shape[0] != len(self.kv_cache.layers):
            raise KVImportError(f"KV blocks of shape {tuple(data.shape)} do not fit this cache")
        if kv_checksum(data, num_tokens) != checksum:
            raise KVImportError("KV blocks failed their checksum: the transfer corrupted them")
        self.kv_cache.write_blocks(request.block_ids[start:end], data)

    def commit(self, request_id: str, output_token_ids: list[int], num_kv_tokens: int) -> None:
        """The reserved request's KV is complete: it joins the running batch.

        `output_token_ids` are the tokens generated elsewhere (at least the first).
        Text the sender already emitted for them is not emitted again.
        """
        request = self._reserved(request_id)
        if not output_token_ids:
            raise KVImportError("a request handed over needs its first output token")
        if num_kv_tokens != request.num_prompt_tokens + len(output_token_ids) - 1:
            raise KVImportError(
                f"KV holds {num_kv_tokens} tokens, the request "
                f"{request.num_prompt_tokens + len(output_token_ids) - 1}"
            )
        if self.kv.blocks_for(num_kv_tokens) > len(request.block_ids):
            raise KVImportError(
                f"{num_kv_tokens} tokens need more than the "
                f"{len(request.block_ids)} blocks reserved"
            )
        detokenizer = self._detokenizers[request_id]
        for token_id in output_token_ids:
            request.append_token(token_id)
            detokenizer.add(token_id)
        detokenizer.emittable(False)  # what the sender streamed already
        self.scheduler.commit(request, num_kv_tokens)
        self.kv.cache_computed_blocks(request)

    def _reserved(self, request_id: str) -> Request:
        request = self.requests.get(request_id)
        if request is None or request.status != RequestStatus.RESERVED:
            raise KVImportError(f"request {request_id!r} has no reservation here")
        return request

    def import_request(
        self,
        prompt_token_ids: list[int],
        output_token_ids: list[int],
        params: SamplingParams,
        meta: KVBlockMeta,
        data: torch.Tensor,
        request_id: str | None = None,
    ) -> str:
        """Adds a request whose KV (all tokens but the last) was computed elsewhere.

        reserve + write_kv + commit in one call. It joins the running batch and
        decodes from the next step on; on any error nothing is left allocated.
        """
        if not output_token_ids:
            raise KVImportError("an imported request needs its first output token")
        check_import(meta, self._layout(meta.num_tokens, meta.block_ids, meta.checksum), data)
        if request_id is None:
            request_id = str(next(self._next_id))
        self.reserve(request_id, prompt_token_ids, params, meta.num_tokens, meta)
        try:
            self.write_kv(request_id, 0, data, meta.num_tokens, meta.checksum)
            self.commit(request_id, list(output_token_ids), meta.num_tokens)
        except Exception:
            self.abort_request(request_id)
            self._aborted.pop()
            raise
        return request_id

    def _drop(self, request: Request) -> None:
        del self.requests[request.request_id], self._detokenizers[request.request_id]

    def check_invariants(self) -> None:
        self.scheduler.check_invariants()

    # ---- what a worker reports -------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What a router needs to know: model, limits, KV layout, tokenizer files."""
        layout = self.layout().to_dict()
        tokenizer = self.tokenizer
        return {
            "model_id": self.model_id,
            "layout": {k: layout[k] for k in LAYOUT_FIELDS},
            "max_model_len": self.max_model_len,
            "vocab_size": self.model_config.vocab_size,
            "eos_token_ids": sorted(self.eos_token_ids),
            "tokenizer_json": tokenizer.backend_tokenizer.to_str(),
            "tokenizer_config": {
                "chat_template": tokenizer.chat_template,
                "bos_token": tokenizer.bos_token,
                "eos_token": tokenizer.eos_token,
            },
            "num_blocks": self.kv.pool.num_blocks,
        }

    def stats(self, check_invariants: bool = False) -> dict[str, Any]:
        """Load and health: blocks, queue lengths, and the invariants if asked."""
        scheduler = self.scheduler
        error = ""
        if check_invariants:
            try:
                self.check_invariants()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        return {
            "num_blocks": self.kv.pool.num_blocks,
            "num_free_blocks": self.kv.pool.num_free_blocks,
            "num_waiting": len(scheduler.waiting),
            "num_running": len(scheduler.running),
            "num_reserved": len(scheduler.reserved),
            "num_held": len(scheduler.held),
            "num_queued_prefill_tokens": sum(r.num_tokens for r in scheduler.waiting)
            + sum(r.num_tokens - r.num_computed_tokens for r in scheduler.running),
            "invariants_error": error,
        }
