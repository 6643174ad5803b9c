"""`tandem.LLM`: offline generation with one in-process engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import Conversation, apply_chat_template

Prompt = str | Sequence[int]


class LLM:
    """Generates for a list of prompts, batched continuously.

    >>> llm = LLM()  # SmolLM2-135M-Instruct, bfloat16
    >>> llm.generate(["The capital of France is"], SamplingParams(max_tokens=8))[0].text
    """

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "bfloat16",
        block_size: int = 16,
        max_num_batched_tokens: int = 512,
        enable_prefix_caching: bool = True,
        **engine_kwargs: Any,
    ) -> None:
        self.engine = LLMEngine(
            EngineConfig(
                model=model,
                dtype=dtype,
                block_size=block_size,
                max_num_batched_tokens=max_num_batched_tokens,
                enable_prefix_caching=enable_prefix_caching,
                **engine_kwargs,
            )
        )

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in the prompts' order.

        A prompt is a string or a list of token ids; a single prompt may be passed bare.
        """
        prompt_list = _as_prompt_list(prompts)
        param_list = _as_param_list(params, len(prompt_list))
        ids = []
        try:
            for prompt, p in zip(prompt_list, param_list):
                ids.append(self.engine.add_request(prompt, p))
            return self._run(ids)
        except BaseException:
            for request_id in ids:
                self.engine.abort_request(request_id)
            self.engine.step()  # collect the aborted outputs
            raise

    def chat(
        self,
        conversations: Conversation | Sequence[Conversation],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Applies the model's chat template to each conversation, then generates."""
        batch: list[Conversation]
        if conversations and isinstance(conversations[0], dict):
            batch = [list(conversations)]  # type: ignore[arg-type]
        else:
            batch = [list(c) for c in conversations]  # type: ignore[arg-type]
        prompts: list[Prompt] = [apply_chat_template(self.engine.tokenizer, c) for c in batch]
        return self.generate(prompts, params)

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        wanted = set(ids)
        while wanted - finished.keys():
            for output in self.engine.step():
                if output.finished and output.request_id in wanted:
                    finished[output.request_id] = output
        return [finished[i] for i in ids]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # type: ignore[list-item]
    return items  # type: ignore[return-value]


def _as_param_list(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(
            f"got {len(params)} SamplingParams for {n} prompts; pass one, or one per prompt"
        )
    return params
