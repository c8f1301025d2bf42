"""Unit tests of exo.api.serving.token_handler: stop strings, UTF-8 safety, chunks, queues."""

from __future__ import annotations

import asyncio
import json
import math
import random

import pytest
from helpers import smollm2_gguf_path

from exo.api.chat_api.responses import Usage
from exo.api.chat_api.chunks import ChoiceUpdate, StreamMeta, build_chunk, encode_sse
from exo.api.serving.token_handler import ChoiceTextStream, TokenLogprob, find_stop, stop_prefix_overlap
from exo.api.serving.token_queue import TokenQueue
from exo.inference.tokenizers import IncrementalDetokenizer, Tokenizer, ends_inside_a_character, tokenizer_for_path
from exo.orchestration.request import TokenResult


def feed(stream: ChoiceTextStream, ids: list[int]) -> list[str]:
    """Feed ids one at a time; the text released after each, then what ``finish`` releases."""
    out = []
    for i in ids:
        out.append(stream.add_token(i).text)
        if stream.stopped:
            return out
    out.append(stream.finish().text)
    return out


# ---------------------------------------------------------------------------- pure helpers


def test_find_stop_earliest():
    assert find_stop("abc STOP def END", ["END", "STOP"]) == 4
    assert find_stop("abc", ["x"]) is None
    assert find_stop("", ["x"]) is None


def test_stop_prefix_overlap():
    assert stop_prefix_overlap("Hello S", ["STOP"]) == 1
    assert stop_prefix_overlap("Hello ST", ["STOP"]) == 2
    assert stop_prefix_overlap("Hello STO", ["STOP", "TOPS"]) == 3
    assert stop_prefix_overlap("Hello", ["STOP"]) == 0
    assert stop_prefix_overlap("STOP", ["STOP"]) == 3 - 3  # a full match is find_stop's business
    assert stop_prefix_overlap("ab", ["abc", "bcd"]) == 2
    assert stop_prefix_overlap("xb", ["abc", "bcd"]) == 1
    assert stop_prefix_overlap("anything", []) == 0


# ---------------------------------------------------------------------------- stop strings


def test_no_stop_strings_text_passes_through(tiny_vocab):
    v = tiny_vocab
    s = ChoiceTextStream(v.tokenizer)
    assert feed(s, [v.word("Hello"), v.word(" world"), v.word("!")]) == ["Hello", " world", "!", ""]
    assert s.text == "Hello world!"
    assert s.completion_tokens == 3


def test_stop_string_in_one_token_is_not_emitted(tiny_vocab):
    v = tiny_vocab
    s = ChoiceTextStream(v.tokenizer, ["STOP"])
    out = feed(s, [v.word("Hello"), v.word("STOP")])
    assert out == ["Hello", ""]
    assert s.stopped and s.text == "Hello"
    assert s.add_token(v.word(" world")).text == ""  # nothing after the stop
    assert s.completion_tokens == 2


def test_stop_string_spanning_tokens(tiny_vocab):
    v = tiny_vocab
    s = ChoiceTextStream(v.tokenizer, ["STOP"])
    # the "ST" of " ST" may begin "STOP": held back; "OP" completes it
    out = feed(s, [v.word("Hello"), v.word(" ST"), v.word("OP"), v.word(" end")])
    assert out == ["Hello", " ", ""]
    assert s.stopped and s.text == "Hello "
    assert "STOP" not in "".join(out)


def test_stop_string_spanning_byte_tokens(tiny_vocab):
    v = tiny_vocab
    s = ChoiceTextStream(v.tokenizer, ["\nUser:"])
    ids = v.byte_ids("Hi\nUser: more")
    out = feed(s, ids)
    assert "".join(out) == "Hi" and s.stopped
    assert s.completion_tokens == len("Hi\nUser:")


def test_possible_prefix_held_then_released(tiny_vocab):
    v = tiny_vocab
    s = ChoiceTextStream(v.tokenizer, ["STOP"])
    assert s.add_token(v.word("Hello")).text == "Hello"
    assert s.add_token(v.word(" ST")).text == " "  # "ST" could start "STOP": held
    d = s.add_token(v.word(" world"))  # "ST world" cannot: released together
    assert d.text == "ST world" and not d.stopped
    assert s.finish().text == ""
    assert s.text == "Hello ST world" and not s.stopped


def test_held_prefix_released_at_finish(tiny_vocab):
    v = tiny_vocab
    s = ChoiceTextStream(v.tokenizer, ["STOP"])
    assert feed(s, [v.word("Hello"), v.word(" ST")]) == ["Hello", " ", "ST"]
    assert s.text == "Hello ST" and not s.stopped


def test_earliest_of_several_stop_strings(tiny_vocab):
    v = tiny_vocab
    s = ChoiceTextStream(v.tokenizer, ["world", "Hello"])
    assert feed(s, [v.word("Hello"), v.word(" world")]) == [""]
    assert s.text == "" and s.stopped


def test_stop_inside_a_token_keeps_the_text_before_it(tiny_vocab):
    v = tiny_vocab
    s = ChoiceTextStream(v.tokenizer, ["orl"])
    # the "o" of "Hello" could begin "orl": held until " world" shows it does not
    assert feed(s, [v.word("Hello"), v.word(" world")]) == ["Hell", "o w"]
    assert s.stopped


def test_add_result_with_several_tokens(tiny_vocab):
    v = tiny_vocab
    s = ChoiceTextStream(v.tokenizer, ["STOP"])
    d = s.add_result(TokenResult("r", [v.word("Hello"), v.word(" ST"), v.word("OP"), v.word("!")]))
    assert d.text == "Hello " and d.stopped
    assert s.completion_tokens == 3


# ---------------------------------------------------------------------------- UTF-8 and special tokens


def test_multibyte_characters_are_never_split(tiny_vocab):
    v = tiny_vocab
    text = "café € 😀"
    s = ChoiceTextStream(v.tokenizer)
    out = feed(s, v.byte_ids(text))
    assert all("\ufffd" not in piece for piece in out)
    assert "".join(out) == text
    # the 4-byte emoji is released only with its last byte
    assert out[-5:] == ["", "", "", "😀", ""]


def test_stop_string_with_multibyte_characters(tiny_vocab):
    v = tiny_vocab
    s = ChoiceTextStream(v.tokenizer, ["€"])
    out = feed(s, v.byte_ids("a€b"))
    assert "".join(out) == "a" and s.stopped


def test_special_tokens_produce_no_text(tiny_vocab):
    v = tiny_vocab
    s = ChoiceTextStream(v.tokenizer, ["x"])
    out = feed(s, [v.word("Hello"), v.eos, v.word("!")])
    assert "".join(out) == "Hello!"
    assert "<|im_end|>" not in s.text


class CountingTokenizer(Tokenizer):
    """The real Tokenizer, counting the token ids each ``decode`` is given."""

    decoded_ids = 0

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        self.decoded_ids += len(ids)
        return super().decode(ids, skip_special_tokens)


def test_incremental_detokenizer_decodes_a_bounded_window(tiny_vocab):
    v = tiny_vocab
    tok = CountingTokenizer(v.tokenizer._tok, None, None, [v.eos], [v.eos])
    text = "Hello café 😀 日本 " * 150
    ids = v.byte_ids(text)  # ~4000 tokens, one per byte: characters span up to 4 tokens
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # re-decoding everything each step would decode ~len(ids)**2 / 2 ids (8 million)
    assert tok.decoded_ids < 12 * len(ids)


def test_incremental_detokenizer_equals_full_decode_on_random_streams(tiny_vocab):
    v = tiny_vocab
    rng = random.Random(7)
    pool = list(range(v.eos + 1))  # every byte (valid or not as UTF-8), the words and the special token
    for _ in range(200):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 30))]
        detok = IncrementalDetokenizer(v.tokenizer)
        text = "".join(detok.add(i) for i in ids) + detok.flush()
        full = v.tokenizer.decode(ids)
        if ends_inside_a_character(v.tokenizer, ids):  # a character cut at the end is dropped
            assert full.endswith("\ufffd")
            full = full[:-1]
        assert text == full, ids


def test_token_bytes(tiny_vocab):
    v = tiny_vocab
    text = "naïve café 🚀 日本"
    assert b"".join(v.tokenizer.token_bytes(i) for i in v.byte_ids(text)) == text.encode("utf-8")
    assert v.tokenizer.token_bytes(v.word(" world")) == b" world"
    assert v.tokenizer.token_bytes(v.eos) == b"<|im_end|>"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        v.tokenizer.token_bytes(10**6)


def test_token_bytes_of_the_real_tokenizer():
    tok = tokenizer_for_path(smollm2_gguf_path())
    text = "naïve café 🚀 日本 <|im_end|>"
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert any(len(tok.token_bytes(i).decode("utf-8", errors="ignore")) == 0 for i in ids)  # a split character


# ---------------------------------------------------------------------------- logprobs


def test_logprobs_released_with_their_text(tiny_vocab):
    v = tiny_vocab
    s = ChoiceTextStream(v.tokenizer, ["STOP"], want_logprobs=True)
    d1 = s.add_token(v.word("Hello"), -0.5, [(v.word("Hello"), -0.5), (v.word("!"), -2.0)])
    assert [e.token for e in d1.logprobs] == ["Hello"]
    assert d1.logprobs[0].top[1] == ("!", b"!", -2.0)
    d2 = s.add_token(v.word(" ST"), -1.0, [])
    assert d2.logprobs == []  # " ST" not fully released yet
    d3 = s.add_token(v.word("OP"), -0.1, [])
    assert d3.stopped and d3.text == ""
    # " ST" straddles the stop string (its " " was released, its "ST" starts "STOP"): it belongs
    # to the stop, as "OP" does; neither is reported
    assert d3.logprobs == []
    assert s.text == "Hello "


def test_logprobs_cover_exactly_the_tokens_before_a_stop_string(tiny_vocab):
    v = tiny_vocab
    s = ChoiceTextStream(v.tokenizer, ["STOP"], want_logprobs=True)
    ids = [v.word("Hello"), v.word(" world"), v.word(" ST"), v.word("OP"), v.word("!")]
    entries = []
    for i in ids:
        d = s.add_token(i, -1.0, [])
        entries += d.logprobs
        if d.stopped:
            break
    assert s.text == "Hello world "
    assert [e.token for e in entries] == ["Hello", " world"]
    assert "".join(e.token for e in entries) == "Hello world"


def test_a_character_cut_by_max_tokens_is_dropped_not_shown_as_u_fffd(tiny_vocab):
    v = tiny_vocab
    for text in ("é", "€", "😀", "日本"):
        data = text.encode("utf-8")
        for cut in range(1, len(data)):
            ids = v.byte_ids("ok ") + list(data[:cut])
            s = ChoiceTextStream(v.tokenizer, want_logprobs=True)
            out = [s.add_token(i, -1.0, []).text for i in ids] + [s.finish().text]
            whole = text.encode("utf-8")[:cut].decode("utf-8", errors="ignore")
            assert "".join(out) == s.text == "ok " + whole, (text, cut, out)
            assert "\ufffd" not in s.text
    # a U+FFFD the model itself wrote stays
    s = ChoiceTextStream(v.tokenizer)
    assert feed(s, v.byte_ids("a\ufffd")) and s.text == "a\ufffd"


def test_logprobs_of_a_split_character(tiny_vocab):
    v = tiny_vocab
    s = ChoiceTextStream(v.tokenizer, want_logprobs=True)
    ids = v.byte_ids("é")
    d1 = s.add_token(ids[0], -0.2, [])
    assert d1.logprobs == [] and d1.text == ""
    d2 = s.add_token(ids[1], -0.3, [])
    assert d2.text == "é"
    assert [e.bytes for e in d2.logprobs] == [b"\xc3", b"\xa9"]
    assert [e.logprob for e in d2.logprobs] == [-0.2, -0.3]


# ---------------------------------------------------------------------------- chunks


def test_build_chat_chunks():
    meta = StreamMeta("chat", "chatcmpl-1", 1700000000, "m")
    first = build_chunk(meta, [ChoiceUpdate(0, text="", role="assistant")])
    assert first == {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m",
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
    }
    mid = build_chunk(meta, [ChoiceUpdate(0, text="Hi")])
    assert mid["choices"][0]["delta"] == {"content": "Hi"}
    last = build_chunk(meta, [ChoiceUpdate(0, text="", finish_reason="stop")])
    assert last["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in last


def test_build_chunk_with_usage_and_logprobs():
    meta = StreamMeta("chat", "chatcmpl-1", 1, "m", include_usage=True)
    lp = TokenLogprob("Hi", b"Hi", -0.25, (("Hi", b"Hi", -0.25), ("Yo", b"Yo", -1.5)), 0)
    c = build_chunk(meta, [ChoiceUpdate(0, text="Hi", logprobs=[lp])])
    assert c["usage"] is None
    assert c["choices"][0]["logprobs"]["content"] == [{
        "token": "Hi", "logprob": -0.25, "bytes": [72, 105],
        "top_logprobs": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
                         {"token": "Yo", "logprob": -1.5, "bytes": [89, 111]}],
    }]
    u = build_chunk(meta, [], usage=Usage.of(5, 2))
    assert u["choices"] == [] and u["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_build_completion_chunk():
    meta = StreamMeta("completion", "cmpl-1", 1, "m")
    lp = TokenLogprob(" x", b" x", math.log(0.5), ((" x", b" x", math.log(0.5)),), 3)
    c = build_chunk(meta, [ChoiceUpdate(2, text=" x", logprobs=[lp], text_offset_base=10, finish_reason="length")])
    assert c["object"] == "text_completion"
    assert c["choices"] == [{
        "index": 2, "text": " x", "finish_reason": "length",
        "logprobs": {"tokens": [" x"], "token_logprobs": [math.log(0.5)], "top_logprobs": [{" x": math.log(0.5)}],
                     "text_offset": [13]},
    }]


def test_encode_sse():
    assert encode_sse("[DONE]") == b"data: [DONE]\n\n"
    raw = encode_sse({"a": "é"})
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    assert json.loads(raw[6:]) == {"a": "é"}


# ---------------------------------------------------------------------------- TokenQueue


@pytest.mark.asyncio
async def test_token_queue_closes_generators_on_exit():
    closed: list[int] = []
    started = [asyncio.Event(), asyncio.Event()]

    def make(i):
        async def gen():
            try:
                yield TokenResult(f"r{i}", [i])
                started[i].set()
                await asyncio.Event().wait()  # a generation that never ends by itself
            finally:
                closed.append(i)
        return gen

    async with TokenQueue([make(0), make(1)]) as q:
        events = [await q.get(5.0), await q.get(5.0)]
        assert sorted(e.index for e in events) == [0, 1]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 5.0)
    assert sorted(closed) == [0, 1]


@pytest.mark.asyncio
async def test_token_queue_reports_errors_and_end():
    async def failing():
        raise RuntimeError("boom")
        yield  # pragma: no cover

    async def short():
        yield TokenResult("r", [1], finish_reason="stop")

    async with TokenQueue([failing, short]) as q:
        events = [await q.get(5.0) for _ in range(3)]  # choice 0: error; choice 1: result, done
    errors = [e for e in events if e.index == 0]
    assert len(errors) == 1 and isinstance(errors[0].error, RuntimeError)
    ones = [e for e in events if e.index == 1]
    assert ones[0].result.tokens == [1] and ones[1].done


@pytest.mark.asyncio
async def test_token_queue_timeout():
    async def silent():
        await asyncio.Event().wait()
        yield  # pragma: no cover

    async with TokenQueue([silent]) as q:
        with pytest.raises(asyncio.TimeoutError):
            await q.get(0.05)


@pytest.mark.asyncio
async def test_token_queue_get_never_swallows_a_cancellation():
    """A client that goes away just as a token arrives: the reader's cancellation must win.
    (Python 3.11's ``asyncio.wait_for`` returned the token instead and the request ran on to
    its last token.) The cancel comes in the same loop turn as the token, before the reader
    wakes: from the generator itself, right after its ``yield``."""
    reading = asyncio.Event()
    reader: asyncio.Task | None = None

    async def gen():
        await reading.wait()
        yield TokenResult("r", [1])
        reader.cancel()
        await asyncio.Event().wait()

    async def read():
        reading.set()  # the generator goes on once this reader waits in get
        return await q.get(5.0)

    async with TokenQueue([gen]) as q:
        reader = asyncio.create_task(read())
        with pytest.raises(asyncio.CancelledError):
            await reader
        event = await q.get(5.0)  # the token is not lost: the next reader gets it
        assert event.result.tokens == [1]
