"""One model instance: requests in, tokens out, one step at a time.

    step():  schedule() ──▶ execute(batch) ──▶ update(batch, sampled)

The scheduler decides who runs (and never touches tensors); the model runner
turns its decision into tensors (and decides nothing); update() appends the
sampled tokens, detokenizes, applies the stop conditions and frees finished
requests. KV export/import for handoff and migration (engine/handoff.py) sit
beside the loop.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from engine import envs
from engine.attention import get_backend
from engine.config import EngineConfig, ModelConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import InvalidRequestError
from engine.handoff import KVTransferMixin
from engine.kv.cache_manager import KVCacheManager
from engine.kv.kv_cache import LAYOUT_FIELDS, PagedKVCache, ShardedKVCache
from engine.model_runner import ModelRunner, build_model, max_model_len
from engine.models.loader import read_model_config
from engine.models.source import resolve_model
from engine.outputs import RequestOutput
from engine.parallel import (
    ShardLauncher,
    TensorParallelDriver,
    TensorParallelError,
    check_divisible,
)
from engine.request import Request, RequestStatus
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class LLMEngine(KVTransferMixin):
    """`shards` starts ranks 1..N-1 of a tensor-parallel engine (default: child
    processes); this engine is rank 0, the driver."""

    def __init__(self, config: EngineConfig, shards: ShardLauncher | None = None) -> None:
        self.config = config
        self._shards = shards
        self.tp: TensorParallelDriver | None = None  # with tensor_parallel_size > 1
        self._init_threads()
        try:
            self._init_model()
            self._init_kv_cache()
        except BaseException:
            self.close()
            raise
        self.scheduler = Scheduler(self.kv, config.max_num_batched_tokens, config.max_num_seqs)
        self.sampler = Sampler(config.seed, kernels=self.model.fused_ops)
        self.requests: dict[str, Request] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._aborted: list[RequestOutput] = []
        self._next_id = itertools.count()
        self.last_batch = SchedulerOutput()  # what the latest step() ran, for step samples
        # Called on the loop thread as each layer of a step finishes writing its KV:
        # a prefill worker ships the final chunk layer by layer while the rest computes.
        self.layer_listener: Callable[[SchedulerOutput, int], None] | None = None

    def _init_threads(self) -> None:
        self.num_threads = self.config.num_threads or envs.num_threads() or os.cpu_count() or 1
        torch.set_num_threads(self.num_threads)

    def _init_model(self) -> None:
        self.source = resolve_model(self.config.model)
        self.model_id = self.source.model_id
        self.model_config: ModelConfig = read_model_config(self.source)
        cfg = self.model_config
        self.max_model_len = max_model_len(self.config, cfg)
        size = self.config.tensor_parallel_size
        check_divisible(cfg, size)
        if size > 1:  # the shards load their slices while this process loads its own
            self.tp = TensorParallelDriver(self.config, self._shards)
            self.config = self.tp.config
        self.model = build_model(self.config, self.source, cfg, self.max_model_len, 0, size)
        if self.tp is not None:
            self.model.set_all_reduce(self.tp.join().all_reduce)
        self.tokenizer = load_tokenizer(self.source)
        eos = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)

    def check_group(self) -> None:
        """Raises TensorParallelError if a rank of this engine's group is gone."""
        if self.tp is not None:
            self.tp.check()

    def close(self) -> None:
        """Stops a tensor-parallel engine's other ranks (nothing to do for a whole model)."""
        if self.tp is not None:
            self.tp.close()

    def _init_kv_cache(self) -> None:
        cfg, ecfg = self.model_config, self.config
        size = ecfg.tensor_parallel_size
        backend_cls = get_backend(ecfg.attention_backend)
        self.backend = backend_cls(cfg.num_heads // size, cfg.num_kv_heads // size, cfg.head_dim)
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
            num_blocks, ecfg.block_size, cfg.num_kv_heads // size, cfg.head_dim
        )
        if self.tp is None:
            layers = [torch.zeros(shape, dtype=ecfg.torch_dtype) for _ in range(cfg.num_layers)]
            self.kv_cache = PagedKVCache(layers, ecfg.block_size)
        else:  # every rank's slice in shared memory, mapped here too
            slices = self.tp.map_kv_cache(num_blocks, cfg.num_layers, shape, ecfg.torch_dtype)
            self.kv_cache = ShardedKVCache(slices, ecfg.block_size)
        self.kv = KVCacheManager(num_blocks, ecfg.block_size, ecfg.enable_prefix_caching)
        group = None if self.tp is None else self.tp.group
        self.runner = ModelRunner(self.model, self.backend, self.kv_cache, group)

    # ---- requests in -------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        hold_after_prefill: bool = False,
        output_token_ids: Sequence[int] = (),
    ) -> str:
        """Queues a request; returns its id (`request_id`, or a new one).

        With `hold_after_prefill` (a prefill instance), the request stops after its
        first token unless that token finished it: it is HELD, its blocks kept for
        `read_kv` until `release`.

        `output_token_ids` resumes a request whose instance died: the tokens it had
        generated (and streamed) are recomputed with the prompt, like a preempted
        request's, and generation goes on from the next position; its text, stop
        strings, penalties and seeded draws are as if it had never stopped.
        """
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        request = self._new_request(prompt_ids, params, request_id)
        if output_token_ids:
            try:
                self._check_resumed(request, list(output_token_ids))
            except InvalidRequestError:
                self._drop(request)
                raise
            self._append_generated(request, list(output_token_ids))
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

    def _check_resumed(self, request: Request, output_ids: list[int]) -> None:
        vocab = self.model_config.vocab_size
        bad = [t for t in output_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"output token ids {bad[:5]} are outside the vocabulary [0, {vocab})"
            )
        if len(output_ids) >= request.params.max_tokens:
            raise InvalidRequestError(
                f"{len(output_ids)} tokens were generated already, and max_tokens is "
                f"{request.params.max_tokens}: nothing is left to generate"
            )

    def _append_generated(self, request: Request, output_ids: list[int]) -> None:
        """Tokens generated elsewhere join the request; their text counts as emitted."""
        detokenizer = self._detokenizers[request.request_id]
        for token_id in output_ids:
            request.append_token(token_id)
            detokenizer.add(token_id)
        detokenizer.emittable(False)  # the instance that generated them streamed it

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
        batch = self.last_batch = self.scheduler.schedule()
        outputs, self._aborted = self._aborted, []
        if batch.is_empty:
            return outputs
        # Torch's thread count is per thread, and a thread's first parallel operator in
        # each library (our kernels' too) resets it to the count last set by any thread,
        # such as an RPC handler that set 1 (engine/threads.py): so it is set every step.
        torch.set_num_threads(self.num_threads)
        listener = self.layer_listener
        try:
            logits = self.runner.execute(
                batch, None if listener is None else lambda layer: listener(batch, layer)
            )
            sampled = self.sampler(
                logits, [self.requests[s.request_id] for s in batch.scheduled if s.sample]
            )
        except TensorParallelError:
            # A rank is gone: no step can run again. Its requests end as aborted; the
            # caller (EngineLoop) gives up the instance.
            for item in batch.scheduled:
                self.abort_request(item.request_id)
            raise
        except Exception:
            # A failed step must not strand its requests: they end as aborted (their
            # blocks freed) and the engine goes on serving the others.
            logger.exception("a step of %d requests failed; aborting them", len(batch.scheduled))
            for item in batch.scheduled:
                self.abort_request(item.request_id)
            failed, self._aborted = self._aborted, []
            return outputs + failed
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
            "tensor_parallel_size": self.config.tensor_parallel_size,
        }

    def num_queued_prefill_tokens(self) -> int:
        """Prompt tokens not yet computed, waiting or mid-prefill."""
        scheduler = self.scheduler
        return sum(r.num_tokens for r in scheduler.waiting) + sum(
            r.num_tokens - r.num_computed_tokens for r in scheduler.running
        )

    def stats(self, check_invariants: bool = False) -> dict[str, Any]:
        """Load and health: blocks, queue lengths, limits, prefix-cache counters (tokens,
        cumulative) and the invariants if asked."""
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
            "num_queued_prefill_tokens": self.num_queued_prefill_tokens(),
            "prefix_cache_queries": self.kv.num_prefix_queries,
            "prefix_cache_hits": self.kv.num_prefix_hits,
            "max_num_batched_tokens": scheduler.max_num_batched_tokens,
            "max_num_seqs": scheduler.max_num_seqs,
            "invariants_error": error,
        }
