"""Grammars (exo.inference.grammar) and the constrained sampler, with SmolLM2's real tokenizer."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from helpers import smollm2_gguf_path

from exo.inference.generation import GenerationOptions
from exo.inference.grammar import GrammarMatcher, grammar_tokenizer, json_schema_grammar, lark_grammar, validate_grammar
from exo.inference.sampling import Sampler
from exo.inference.tokenizers import tokenizer_for_path
from exo.orchestration.worker import replayed_sampler

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok():
    return tokenizer_for_path(smollm2_gguf_path())


def _generate(sampler: Sampler, tok, logits_fn, max_tokens: int = 200) -> list[int]:
    """Tokens ``sampler`` draws from ``logits_fn(step)`` until an EOS id (excluded)."""
    out = []
    for step in range(max_tokens):
        t = sampler.sample(logits_fn(step)).token
        if t in tok.eos_token_ids:
            return out
        out.append(t)
    raise AssertionError(f"no EOS after {max_tokens} tokens: {tok.decode(out)!r}")


def test_json_schema_grammar_rejects_bad_schemas():
    with pytest.raises(ValueError, match="Invalid type: objectx"):
        json_schema_grammar({"type": "objectx"})
    with pytest.raises(ValueError, match="object or a boolean"):
        json_schema_grammar("{}")
    with pytest.raises(ValueError, match="JSON schema"):
        json_schema_grammar(False)
    assert json_schema_grammar(None) == json_schema_grammar({"type": "object"})


def test_lark_grammar_validates():
    assert lark_grammar('start: "x" %json {"type": "integer"}\n')
    with pytest.raises(ValueError, match="unknown name"):
        lark_grammar("start: foo\n")


def test_grammar_tokenizer_is_cached_and_shared_by_copies(tok):
    ll = grammar_tokenizer(tok)
    assert grammar_tokenizer(tok) is ll
    assert grammar_tokenizer(tok.with_chat_template("chatml")) is ll
    assert ll.vocab_size == tok.vocab_size and set(ll.eos_tokens) == set(tok.eos_token_ids)


def test_validate_grammar_with_the_tokenizer(tok):
    validate_grammar(json_schema_grammar(PERSON), tok)
    with pytest.raises(ValueError, match="invalid grammar"):
        validate_grammar(lark_grammar("start: <[999999]>\n"), tok)


def test_mask_allows_exactly_the_grammar_and_pads_or_truncates_the_vocab(tok):
    m = GrammarMatcher(json_schema_grammar(PERSON), tok)
    logits = np.zeros(tok.vocab_size + 64, dtype=np.float32)  # a model whose head is padded
    masked = m.apply_mask(logits)
    allowed = np.flatnonzero(masked > -np.inf)
    assert all(tok.decode([int(t)]).lstrip().startswith("{") for t in allowed)
    assert (masked[tok.vocab_size:] == -np.inf).all()  # ids the tokenizer does not have
    short = m.apply_mask(np.zeros(1024, dtype=np.float32))  # a toy engine's vocabulary
    assert short.shape == (1024,)
    np.testing.assert_array_equal(np.flatnonzero(short > -np.inf), allowed[allowed < 1024])
    m.consume_all(tok.encode('{"name": "x", "age": 3, "tags": [], "ok": true}'))
    assert m.is_accepting and m.is_stopped
    assert set(np.flatnonzero(m.apply_mask(logits) > -np.inf)) == set(tok.eos_token_ids)  # only EOS now
    with pytest.raises(ValueError, match="grammar error"):
        m.consume(tok.encode("x")[0])


def test_forbidden_tokens_are_never_sampled_and_output_validates(tok):
    grammar = json_schema_grammar(PERSON)
    rng = np.random.default_rng(0)
    for seed in range(20):
        opts = GenerationOptions(temperature=1.0, seed=seed)
        sampler = Sampler(opts, GrammarMatcher(grammar, tok))
        check = GrammarMatcher(grammar, tok)  # a second matcher checks every token drawn
        out = []
        for _ in range(200):
            logits = rng.standard_normal(tok.vocab_size).astype(np.float32) * 3
            allowed = check.allowed()
            t = sampler.sample(logits).token
            assert allowed[t], f"token {t} ({tok.decode([t])!r}) is forbidden here"
            check.consume(t)
            if t in tok.eos_token_ids:
                break
            out.append(t)
        else:
            raise AssertionError("no EOS")
        jsonschema.validate(json.loads(tok.decode(out)), PERSON)


def test_greedy_constrained_picks_the_best_allowed_token(tok):
    m = GrammarMatcher(json_schema_grammar(None), tok)
    logits = np.zeros(tok.vocab_size, dtype=np.float32)
    x = tok.encode("x")[0]
    brace = tok.encode("{")[0]
    logits[x], logits[brace] = 10.0, 1.0
    s = Sampler(GenerationOptions(temperature=0.0, logprobs=True, top_logprobs=20), m).sample(logits)
    assert s.token == brace
    assert all(lp > -np.inf for _, lp in s.top_logprobs) and x not in dict(s.top_logprobs)


def test_logit_bias_is_added_to_the_logits():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    s = Sampler(GenerationOptions(temperature=0.0, logit_bias={3: 100.0}, logprobs=True)).sample(logits)
    assert s.token == 3
    biased = logits.astype(np.float64) + np.array([0, 0, 0, 100])
    expected = biased[3] - np.log(np.exp(biased - biased.max()).sum()) - biased.max()
    assert s.logprob == pytest.approx(expected, abs=1e-6)
    s = Sampler(GenerationOptions(temperature=0.0, logit_bias={0: -0.5, 1: 0.3})).sample(logits)
    assert s.token == 1  # log 0.5 - 0.5 = -1.19 < log 0.3 + 0.3 = -0.90
    with pytest.raises(ValueError, match="logit_bias names token 4"):
        Sampler(GenerationOptions(logit_bias={4: 1.0})).sample(logits)


def test_logit_bias_cannot_reach_a_token_the_grammar_forbids(tok):
    x = tok.encode("x")[0]
    opts = GenerationOptions(temperature=0.0, logit_bias={x: 100.0})
    s = Sampler(opts, GrammarMatcher(json_schema_grammar(None), tok))
    assert s.sample(np.zeros(tok.vocab_size, dtype=np.float32)).token != x


def test_a_mask_that_leaves_nothing_raises_not_nan(tok):
    brace = tok.encode("{")[0]
    s = Sampler(GenerationOptions(temperature=1.0, seed=0), GrammarMatcher(lark_grammar('start: "{"\n'), tok))
    with pytest.raises(ValueError, match="allows no token"):
        s.sample(np.zeros(brace, dtype=np.float32))  # a vocabulary without that token


def test_replayed_constrained_sampler_continues_like_the_uninterrupted_one(tok):
    grammar = json_schema_grammar(PERSON)
    rng = np.random.default_rng(1)
    logits = [rng.standard_normal(tok.vocab_size).astype(np.float32) * 3 for _ in range(200)]
    opts = GenerationOptions(temperature=1.0, seed=99, presence_penalty=0.3)
    straight = _generate(Sampler(opts, GrammarMatcher(grammar, tok)), tok, lambda i: logits[i])
    for cut in (1, 5, len(straight) // 2):
        resumed = replayed_sampler(opts, straight[:cut], lambda: GrammarMatcher(grammar, tok))
        assert straight[:cut] + _generate(resumed, tok, lambda i, cut=cut: logits[cut + i]) == straight
