"""Turns one step's logits into one token per request.

Order of operations for each row (OpenAI's semantics):
  1. logprobs, if asked, from the raw distribution;
  2. logit_bias, then presence/frequency penalties over the generated tokens;
  3. greedy rows take the argmax; the others divide by temperature, keep the
     top_k, keep the top_p nucleus and draw.

A seeded request's draw for output position i depends on (seed, i) alone: not on
the rest of the batch, and not on which engine drew positions 0..i-1. So a request
handed from prefill to decode, migrated between decode instances, or preempted and
recomputed samples what one engine running it start to finish would.
"""

from __future__ import annotations

from collections import Counter

import torch

from engine.request import Request, TokenLogprobs


class Sampler:
    def __init__(self, seed: int = 0, kernels: bool = False) -> None:
        """`kernels`: tandem's C++ operators are loaded; greedy choices use row_argmax."""
        self._generator = torch.Generator().manual_seed(seed)  # for unseeded requests
        self._seeded = torch.Generator()  # re-seeded for each seeded draw
        self._kernels = kernels

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """logits: [N, V] in the model's dtype, row i for requests[i]. Appends logprobs to
        the requests."""
        if not all(_argmax_only(r) for r in requests):
            # Biases, logprobs and draws in float32; a batch of greedy rows alone takes
            # its maxima as they are (widening 96 rows of a 49,152-token vocabulary from
            # bfloat16 cost 0.7-3.7 ms a step, and changes no maximum).
            logits = logits.float()
        raw_logprobs = _raw_logprobs(logits, requests)
        logits = self._apply_biases(logits, requests)
        token_ids = _argmax(logits, self._kernels)  # [N]
        sampled_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows)
            token_ids[rows] = self._sample(logits[rows], [requests[i] for i in sampled_rows])
        ids = token_ids.tolist()
        _attach_logprobs(raw_logprobs, ids, requests)
        return ids

    def _apply_biases(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        rows = [i for i, r in enumerate(requests) if _has_bias(r)]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            params = requests[i].params
            for token_id, bias in params.logit_bias.items():
                logits[i, token_id] += bias
            counts = Counter(requests[i].output_token_ids)
            if counts and (params.presence_penalty or params.frequency_penalty):
                ids = torch.tensor(list(counts.keys()))
                freq = torch.tensor(list(counts.values()), dtype=logits.dtype)
                logits[i, ids] -= params.frequency_penalty * freq + params.presence_penalty
        return logits

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        # logits: [S, V] -> token ids [S]
        temps = torch.tensor([r.params.temperature for r in requests], dtype=logits.dtype)
        logits = logits / temps[:, None]
        logits = _top_k_top_p(logits, requests)
        probs = logits.softmax(dim=-1)
        # Inverse CDF: the first token whose cumulative probability reaches u * total, u in
        # (0, 1]. One uniform per row: an exponential per token (an exponential race) cost
        # 1 ms a row over a 49,152-token vocabulary, 11 of a 55 ms decode step at batch 12.
        # Float32 sums are exact enough: each token's share moves by one rounding, ~1e-7.
        uniform = torch.empty(len(requests), dtype=torch.float32)
        for i, request in enumerate(requests):
            generator = self._generator
            if request.params.seed is not None:
                generator = self._seeded
                generator.manual_seed(draw_seed(request.params.seed, request.num_output_tokens))
            uniform[i : i + 1].uniform_(generator=generator)
        cumulative = probs.cumsum(dim=-1)  # [S, V]
        targets = (1.0 - uniform) * cumulative[:, -1]  # in (0, total]: never a 0-mass token
        picks = torch.searchsorted(cumulative, targets[:, None].to(cumulative.dtype))
        return picks.squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _argmax(x: torch.Tensor, kernels: bool) -> torch.Tensor:
    """x.argmax(dim=-1), the first index of each row's maximum. torch's CPU argmax took
    4.9 ms for 96 rows of 49,152 float32 logits and max(dim=-1) 2.9; the C++ row_argmax
    reads each row twice at vector width (Intel Xeon, 2 threads)."""
    if kernels and x.dtype in (torch.float32, torch.bfloat16) and x.shape[-1] > 0:
        return torch.ops.tandem.row_argmax(x.contiguous())
    return x.max(dim=-1).indices


def draw_seed(seed: int, position: int) -> int:
    """The generator seed of a seeded request's draw for output position `position`:
    a splitmix64 mix, so that neighbouring seeds and positions give unrelated draws."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


_MASK64 = (1 << 64) - 1


def _raw_logprobs(logits: torch.Tensor, requests: list[Request]) -> dict[int, torch.Tensor]:
    """Row index -> log-probabilities [V] of the unmodified distribution, for rows that ask."""
    rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if not rows:
        return {}
    return dict(zip(rows, logits[rows].log_softmax(dim=-1)))


def _attach_logprobs(
    raw: dict[int, torch.Tensor], token_ids: list[int], requests: list[Request]
) -> None:
    for i, row in raw.items():
        num_top = requests[i].params.logprobs or 0
        chosen = row[token_ids[i]]
        top_values, top_ids = row.topk(num_top)
        requests[i].logprobs.append(
            TokenLogprobs(
                token_id=token_ids[i],
                logprob=float(chosen),
                rank=int((row > chosen).sum()) + 1,
                top=tuple(zip(top_ids.tolist(), top_values.tolist())),
            )
        )


def _argmax_only(request: Request) -> bool:
    p = request.params
    return p.greedy and p.logprobs is None and not _has_bias(request)


def _has_bias(request: Request) -> bool:
    p = request.params
    return bool(p.logit_bias) or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _top_k_top_p(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    top_ks = [r.params.top_k for r in requests]
    top_ps = [r.params.top_p for r in requests]
    if not any(top_ks) and all(p >= 1.0 for p in top_ps):
        return logits
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [S, V]
    k = torch.tensor([k if k > 0 else vocab for k in top_ks])
    ranks = torch.arange(vocab)[None, :]
    drop = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= torch.tensor(top_ps, dtype=logits.dtype)[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
