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
