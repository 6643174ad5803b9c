"""The sampler's picks on hand-made logits: greedy rows take the first maximum."""

from __future__ import annotations

import torch

from engine.request import Request
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams


def _request(params: SamplingParams) -> Request:
    return Request("r", [1, 2, 3], params, eos_token_ids=frozenset())


def test_greedy_rows_take_the_first_of_tied_maxima():
    logits = torch.tensor(
        [
            [0.0, 3.0, 3.0, 1.0],  # a tie: the first index wins
            [5.0, -1.0, 5.0, 5.0],
            [-2.0, -1.0, -3.0, -1.0],
            [0.0, 0.0, 0.0, 9.0],
        ]
    )
    greedy = SamplingParams(temperature=0)
    assert Sampler()(logits, [_request(greedy) for _ in range(4)]) == [1, 0, 1, 3]


def test_a_sampled_row_draws_only_tokens_with_probability():
    logits = torch.full((1, 6), float("-inf"))
    logits[0, 2] = logits[0, 4] = 0.0  # two tokens, equally likely
    params = SamplingParams(temperature=1.0)  # unseeded: each draw is a new one
    sampler = Sampler()
    drawn = {sampler(logits, [_request(params)])[0] for _ in range(40)}
    assert drawn == {2, 4}


def test_sampled_rows_follow_the_distribution():
    # Probabilities 0.1, 0.2, 0.3, 0.4 and a token with none; 8,000 independent draws.
    probs = torch.tensor([0.1, 0.2, 0.0, 0.3, 0.4])
    rows = 8000
    logits = probs.log().expand(rows, -1).contiguous()
    params = SamplingParams(temperature=1.0)
    drawn = torch.tensor(Sampler(seed=3)(logits, [_request(params) for _ in range(rows)]))
    freq = torch.bincount(drawn, minlength=5).float() / rows
    assert freq[2] == 0
    # 4 standard deviations of a binomial frequency at 8,000 draws is at most 0.022.
    assert torch.allclose(freq, probs, atol=0.022), freq


def test_a_seeded_request_draws_the_same_tokens_whatever_its_batch():
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    seeded = SamplingParams(temperature=0.8, seed=1234)
    other = SamplingParams(temperature=0.8)
    alone = Sampler(seed=1)(logits[1:2], [_request(seeded)])
    batched = Sampler(seed=2)(logits, [_request(other), _request(seeded), _request(other)])
    assert batched[1] == alone[0]
