"""KV export and import for handoff and migration, as methods of LLMEngine.

A sender reads a request's computed blocks (all at once with `export_kv`, or range
by range with `read_kv` as chunks finish) and, once the receiver has the request,
`release`s it. A receiver `reserve`s blocks, `write_kv`s each range (shape and
checksum checked first), then `commit`s the request into its running batch;
`import_request` does the three at once. Blocks go out as plain tensors with a
KVBlockMeta or a per-range CRC-32, never pickled.

A migration moves a decoding request the same way while it keeps running: the
sender copies its full blocks (`full_blocks`, `read_blocks`, from any thread: a
full block of a running request is never written again), `pause`s it (RUNNING to
HELD) for the last blocks and its tokens, then `release`s it once the receiver
has committed, or `resume`s it if the migration failed. The receiver may
`grow_reservation` when the request outgrew what it first reserved.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

from engine.detokenizer import IncrementalDetokenizer
from engine.errors import KVImportError, MigrationError
from engine.kv.cache_manager import KVCacheManager
from engine.kv.kv_cache import KVBlockMeta, PagedKVCache, check_import, check_layout, kv_checksum
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import is_decoding

if TYPE_CHECKING:
    from engine.config import EngineConfig, ModelConfig
    from engine.outputs import RequestOutput
    from engine.scheduler import Scheduler


class KVTransferMixin:
    """The KV transfer half of LLMEngine; it uses the engine's state declared below."""

    config: EngineConfig
    model_config: ModelConfig
    model_id: str
    max_model_len: int
    kv: KVCacheManager
    kv_cache: PagedKVCache
    scheduler: Scheduler
    requests: dict[str, Request]
    _detokenizers: dict[str, IncrementalDetokenizer]
    _aborted: list[RequestOutput]
    _next_id: itertools.count[int]

    if TYPE_CHECKING:  # defined by LLMEngine

        def _new_request(
            self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
        ) -> Request: ...

        def _drop(self, request: Request) -> None: ...

        def _append_generated(self, request: Request, output_ids: list[int]) -> None: ...

        def abort_request(self, request_id: str) -> None: ...

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

    def read_kv(
        self, request_id: str, start: int, end: int, layers: range | None = None
    ) -> tuple[torch.Tensor, int]:
        """Blocks [start, end) of a request's KV, and their CRC-32.

        Without `layers`, all layers of blocks already computed. With `layers`, those
        layers of any of the request's blocks: for a layer listener (see LLMEngine.step)
        that reads the layers a running step has just written.
        """
        request = self.requests[request_id]
        limit = len(request.block_ids)
        if layers is None:
            limit = self.kv.blocks_for(request.num_computed_tokens)
        elif not 0 <= layers.start < layers.stop <= len(self.kv_cache.layers):
            raise KVImportError(f"layers {layers} are not in this model")
        if not 0 <= start < end <= limit:
            raise KVImportError(
                f"blocks [{start}, {end}) of request {request_id} are not computed: it has "
                f"{request.num_computed_tokens} tokens in the cache"
            )
        data = self.kv_cache.read_blocks(request.block_ids[start:end], layers)
        return data, kv_checksum(data)

    def release(self, request_id: str) -> None:
        """Frees a held request once its KV lives elsewhere; no output is produced."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        del self._detokenizers[request_id]

    # -- migration, sending side --------------------------------------------------------

    def full_blocks(self, request_id: str) -> tuple[list[int], int]:
        """A decoding request's full, computed blocks, and its preemption count (which
        changes if the blocks are freed and the request recomputed elsewhere in the pool).
        Call on the engine's thread; MigrationError if the request is not decoding here."""
        request = self._decoding(request_id)
        num_full = request.num_computed_tokens // self.config.block_size
        return request.block_ids[:num_full], request.num_preemptions

    def read_blocks(self, block_ids: list[int]) -> tuple[torch.Tensor, int]:
        """The KV of these blocks (all layers) and its CRC-32. Safe off the engine's
        thread for blocks that are not written meanwhile (see `full_blocks`)."""
        data = self.kv_cache.read_blocks(block_ids)
        return data, kv_checksum(data)

    def pause(self, request_id: str) -> tuple[list[int], list[int], int]:
        """Takes a decoding request out of the batch, keeping its blocks: its block ids,
        its output tokens so far, and how many tokens its KV holds."""
        request = self._decoding(request_id)
        self.scheduler.hold(request)
        num_kv_tokens = request.num_computed_tokens
        block_ids = request.block_ids[: self.kv.blocks_for(num_kv_tokens)]
        return block_ids, request.output_token_ids, num_kv_tokens

    def resume(self, request_id: str) -> bool:
        """A paused request rejoins the batch; False if it ended meanwhile (aborted)."""
        request = self.requests.get(request_id)
        if request is None or request.status != RequestStatus.HELD:
            return False
        self.scheduler.resume(request)
        return True

    def _decoding(self, request_id: str) -> Request:
        request = self.requests.get(request_id)
        if request is None:
            raise MigrationError(f"request {request_id!r} is not on this instance")
        if request.status != RequestStatus.RUNNING or not is_decoding(request):
            raise MigrationError(
                f"request {request_id!r} is {request.status.name.lower()} and not decoding: "
                "only a request that has its first token and is in the running batch moves"
            )
        return request

    # -- receiving side ------------------------------------------------------------------

    def grow_reservation(self, request_id: str, num_kv_tokens: int) -> int:
        """Room for `num_kv_tokens` in a reserved request; returns its block count."""
        request = self._reserved(request_id)
        if not 0 < num_kv_tokens < self.max_model_len:
            raise KVImportError(f"cannot reserve KV for {num_kv_tokens} tokens")
        if not self.scheduler.grow(request, num_kv_tokens):
            raise KVImportError(
                f"no room: {self.kv.blocks_for(num_kv_tokens) - len(request.block_ids)} more "
                f"blocks asked, {self.kv.pool.num_free_blocks} free"
            )
        return len(request.block_ids)

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
        self, request_id: str, start: int, data: torch.Tensor, checksum: int, first_layer: int = 0
    ) -> None:
        """Writes arriving blocks [start, start + n) of a reserved request, checksum first.

        `data` holds layers [first_layer, first_layer + data.shape[0]) of those blocks.
        """
        request = self._reserved(request_id)
        end = start + data.shape[1]
        if start < 0 or end > len(request.block_ids):
            raise KVImportError(
                f"blocks [{start}, {end}) fall outside the {len(request.block_ids)} reserved"
            )
        expected = self.kv_cache.block_shape
        num_layers = len(self.kv_cache.layers)
        if (
            tuple(data.shape[2:]) != tuple(expected)
            or first_layer < 0
            or first_layer + data.shape[0] > num_layers
        ):
            raise KVImportError(
                f"KV blocks of shape {tuple(data.shape)} from layer {first_layer} do not fit "
                f"this cache ({num_layers} layers of blocks {tuple(expected)})"
            )
        if kv_checksum(data) != checksum:
            raise KVImportError("KV blocks failed their checksum: the transfer corrupted them")
        self.kv_cache.write_blocks(request.block_ids[start:end], data, first_layer)

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
        self._append_generated(request, output_token_ids)
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
            self.write_kv(request_id, 0, data, meta.checksum)
            self.commit(request_id, list(output_token_ids), meta.num_tokens)
        except Exception:
            self.abort_request(request_id)
            self._aborted.pop()
            raise
        return request_id
