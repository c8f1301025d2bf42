"""Sampling: exact, tiny cases."""

import numpy as np
import pytest

from exo.inference.generation import GenerationOptions
from exo.inference.sampling import Sampler, apply_penalties, filter_top_k, filter_top_p, log_softmax

LOGITS = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))


def test_greedy_at_temperature_zero():
    assert Sampler(GenerationOptions(temperature=0.0)).sample(LOGITS).token == 0


def test_top_k_keeps_k_largest():
    out = filter_top_k(LOGITS, 2)
    assert np.isfinite(out).tolist() == [True, True, False, False]


def test_top_p_keeps_smallest_set_reaching_p():
    assert np.isfinite(filter_top_p(LOGITS, 0.5)).tolist() == [True, False, False, False]
    assert np.isfinite(filter_top_p(LOGITS, 0.8)).tolist() == [True, True, False, False]
    assert np.isfinite(filter_top_p(LOGITS, 0.81)).tolist() == [True, True, True, False]


def test_same_seed_same_tokens():
    opts = GenerationOptions(temperature=1.0, seed=7)
    a = [Sampler(opts).sample(LOGITS).token for _ in range(1)]
    s1, s2 = Sampler(opts), Sampler(opts)
    assert [s1.sample(LOGITS).token for _ in range(50)] == [s2.sample(LOGITS).token for _ in range(50)]
    assert a


def test_sampling_follows_distribution():
    s = Sampler(GenerationOptions(temperature=1.0, seed=0))
    counts = np.bincount([s.sample(LOGITS).token for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_penalties_follow_openai_definition():
    out = apply_penalties(np.zeros(3, np.float32), {1: 2}, presence_penalty=0.5, frequency_penalty=0.25)
    assert out.tolist() == [0.0, -1.0, 0.0]


def test_logprobs_and_top_logprobs():
    r = Sampler(GenerationOptions(logprobs=True, top_logprobs=2)).sample(LOGITS)
    assert r.token == 0
    assert r.logprob == pytest.approx(np.log(0.5), abs=1e-6)
    assert [t for t, _ in r.top_logprobs] == [0, 1]
    np.testing.assert_allclose(np.exp(log_softmax(LOGITS)), [0.5, 0.3, 0.15, 0.05], atol=1e-6)


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_p", 0.0), ("top_k", -1), ("max_tokens", 0),
                                         ("presence_penalty", 2.5), ("top_logprobs", 21)])
def test_out_of_range_options_name_the_option(field, value):
    with pytest.raises(ValueError, match=field):
        GenerationOptions(**{field: value})


@pytest.mark.parametrize("temperature", [1e-39, 5e-324, 1e-6])
def test_a_temperature_below_the_greedy_threshold_is_argmax(temperature):
    logits = np.array([1.0, 30.0, 29.999, -5.0], dtype=np.float32)
    sampler = Sampler(GenerationOptions(temperature=temperature, seed=1, logprobs=True))
    for _ in range(20):  # logits / 1e-39 overflow float32: once NaN probabilities, a ValueError
        r = sampler.sample(logits)
        assert r.token == 1 and np.isfinite(r.logprob)


def test_a_negative_seed_is_a_seed():
    logits = np.zeros(1000, dtype=np.float32)

    def draws(seed: int) -> list[int]:
        sampler = Sampler(GenerationOptions(temperature=1.0, seed=seed))
        return [sampler.sample(logits).token for _ in range(8)]

    assert draws(-1) == draws(-1)  # numpy refused it: "expected non-negative integer"
    assert len({tuple(draws(s)) for s in (-2, -1, 0, 1, 2**63 - 1, -(2**63))}) == 6
    for seed in (2**63, -(2**63) - 1):
        with pytest.raises(ValueError, match="seed"):
            GenerationOptions(seed=seed)
