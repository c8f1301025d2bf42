"""Unit tests of the serving layer's pure parts: the streaming tool-call parser of each family,
the reasoning splitter, and the rendering of tools and tool history into a conversation."""

from __future__ import annotations

import json

import pytest

from exo.api.serving.reasoning import ReasoningSplitter, prompt_opens_thinking
from exo.api.serving.request import ToolCall, ToolSpec, Turn
from exo.api.serving.tool_parser import ToolCallParser
from exo.api.serving.tools import ToolSyntax, template_turns

HERMES = ToolSyntax("hermes", "<tool_call>", "arguments", False)
LLAMA = ToolSyntax("llama3", '{"name": ', "parameters", True)
MISTRAL = ToolSyntax("mistral", "[TOOL_CALLS]", "arguments", True)


def run(parser: ToolCallParser, text: str, step: int) -> tuple[str, list]:
    """Feed ``text`` in pieces of ``step`` characters; the content and the calls' pieces."""
    content, pieces = "", []
    for i in range(0, len(text), step):
        c, d = parser.feed(text[i:i + step])
        content += c
        pieces += d
    return content + parser.finish(), pieces


CASES = [
    (HERMES, 'Let me check. <tool_call>\n{"name": "f", "arguments": {"a": "}{\\"", "b": [1, {"c": 2}]}}\n</tool_call>',
     "Let me check. ", [("f", {"a": '}{"', "b": [1, {"c": 2}]})]),
    (HERMES, '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": {"x": 1}}'
             '\n</tool_call>', "", [("f", {}), ("g", {"x": 1})]),
    (HERMES, "No call, just a < sign and <tool", "No call, just a < sign and <tool", []),
    (LLAMA, '{"name": "f", "parameters": {"q": "x"}}', "", [("f", {"q": "x"})]),
    (MISTRAL, '[TOOL_CALLS][{"name": "f", "arguments": {"q": 1}}, {"name": "g", "arguments": {}}]', "",
     [("f", {"q": 1}), ("g", {})]),
]


@pytest.mark.parametrize("step", [1, 3, 1000])
@pytest.mark.parametrize("syntax, text, content, calls", CASES)
def test_parser_reads_calls_in_any_pieces(syntax, text, content, calls, step):
    parser = ToolCallParser(syntax)
    got_content, pieces = run(parser, text, step)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == calls
    # the streamed pieces: id and name first, then arguments that add up to the call's
    for i, call in enumerate(parser.calls):
        mine = [p for p in pieces if p.index == i]
        assert mine[0].id == call.id and mine[0].name == call.name
        assert all(p.id is None and p.name is None for p in mine[1:])
        assert "".join(p.arguments for p in mine) == call.arguments


@pytest.mark.parametrize("step", [1, 2, 100])
@pytest.mark.parametrize("text, inside, reasoning, content", [
    ("<think>a < b</think>\n\nanswer", False, "a < b", "answer"),
    ("  <think>x</think>y", False, "x", "y"),
    ("no thinking <think>here</think>", False, "", "no thinking <think>here</think>"),
    ("opened by the prompt</think>\nthen", True, "opened by the prompt", "then"),
    ("<think>never closed", False, "never closed", ""),
    ("<thin", False, "", "<thin"),
])
def test_reasoning_splitter(text, inside, reasoning, content, step):
    s = ReasoningSplitter(inside=inside)
    r = c = ""
    for i in range(0, len(text), step):
        a, b = s.feed(text[i:i + step])
        r, c = r + a, c + b
    a, b = s.finish()
    assert (r + a, c + b) == (reasoning, content)


def test_prompt_opens_thinking():
    assert prompt_opens_thinking("<|Assistant|><think>\n") and not prompt_opens_thinking("<think>\n\n</think>\n\n")


def test_history_without_native_tool_support_is_written_into_the_turns():
    tools = [ToolSpec("f", "does f", {"type": "object", "properties": {"a": {"type": "integer"}}})]
    turns = [Turn("system", "Be brief."), Turn("user", "do f"),
             Turn("assistant", "", [ToolCall("call_1", "f", '{"a": 1}')]),
             Turn("tool", "42", tool_call_id="call_1"), Turn("tool", "43", tool_call_id="call_2")]
    out = template_turns(turns, tools, HERMES)
    assert [d["role"] for d in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n") and '"name":"f"' in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    assert out[3]["content"] == "<tool_response>\n42\n</tool_response>\n<tool_response>\n43\n</tool_response>"


def test_history_with_native_tool_support_uses_the_transformers_forms():
    native = ToolSyntax("hermes", "<tool_call>", "arguments", True)
    out = template_turns([Turn("user", "x"), Turn("assistant", "", [ToolCall("c1", "f", '{"a": 1}')]),
                          Turn("tool", "42", tool_call_id="c1", name="f")], [], native)
    assert out[1]["tool_calls"] == [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]
    assert out[2] == {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "f"}


@pytest.fixture(scope="module")
def smollm2():
    from helpers import smollm2_gguf_path

    from exo.inference.tokenizers import tokenizer_for_path
    return tokenizer_for_path(smollm2_gguf_path())


def accepts(grammar: str, tokenizer, text: str) -> bool:
    """Whether ``text`` (then EOS) is a sentence of ``grammar``, token by token."""
    from exo.inference.grammar import GrammarMatcher

    m = GrammarMatcher(grammar, tokenizer)
    try:
        m.consume_all(tokenizer.backend.encode(text, add_special_tokens=False).ids)
    except ValueError:
        return False
    return m.is_accepting


WEATHER = ToolSpec("get_weather", "", {"type": "object", "properties": {"city": {"type": "string"}},
                                       "required": ["city"], "additionalProperties": False})
OTHER = ToolSpec("get_time", "", {"type": "object", "properties": {}})


@pytest.mark.parametrize("syntax", [HERMES, LLAMA, MISTRAL])
def test_tool_grammars_accept_calls_and_refuse_bad_arguments(smollm2, syntax):
    from exo.api.serving.request import ToolChoice
    from exo.api.serving.tools import tool_grammar

    call = syntax.calls_text([ToolCall("c", "get_weather", '{"city": "Paris"}')])
    bad = syntax.calls_text([ToolCall("c", "get_weather", '{"town": "Paris"}')])
    two = syntax.calls_text([ToolCall("c", "get_weather", '{"city": "Paris"}'), ToolCall("d", "get_time", "{}")])
    for mode in ("required", "auto"):
        g = tool_grammar([WEATHER, OTHER], ToolChoice(mode), True, syntax)
        assert accepts(g, smollm2, call) and not accepts(g, smollm2, bad) and accepts(g, smollm2, two)
    single = tool_grammar([WEATHER, OTHER], ToolChoice("required"), False, syntax)
    assert accepts(single, smollm2, call) and not accepts(single, smollm2, two)
    named = tool_grammar([WEATHER, OTHER], ToolChoice("function", "get_time"), True, syntax)
    assert not accepts(named, smollm2, call)
    auto = tool_grammar([WEATHER], ToolChoice("auto"), True, syntax)
    assert accepts(auto, smollm2, "Just text, no call.")
    assert accepts(auto, smollm2, "Let me look. " + call) and not accepts(auto, smollm2, "Let me look. " + bad)
    forced = tool_grammar([WEATHER], ToolChoice("required"), True, syntax)
    assert not accepts(forced, smollm2, "Just text, no call.")


def test_a_trigger_that_is_a_special_token_is_constrained_and_parsed():
    """Mistral's [TOOL_CALLS] is a control token: the grammar names it as a token, and the
    text stream shows it to the parser although decoding drops special tokens."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from exo.api.serving.request import ToolChoice
    from exo.api.serving.token_handler import ChoiceTextStream
    from exo.api.serving.tool_parser import ToolCallParser
    from exo.api.serving.tools import tool_grammar, tool_syntax
    from exo.inference.tokenizers import Tokenizer, byte_level_decoder

    byte_to_char = {b: c for c, b in byte_level_decoder().items()}
    backend = HFTokenizer(models.BPE(vocab={byte_to_char[b]: b for b in range(256)}, merges=[], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("</s>", special=True), AddedToken("[TOOL_CALLS]", special=True)])
    eos, trigger = 256, 257
    tok = Tokenizer(backend, chat_template="{{ tools }}[TOOL_CALLS]", eos_token_ids=[eos], special_token_ids=[eos, trigger])
    syntax = tool_syntax(tok)
    assert syntax.family == "mistral" and syntax.special_trigger == trigger and syntax.template_renders_tools
    grammar = tool_grammar([WEATHER], ToolChoice("required"), False, syntax)
    body = list('[{"name": "get_weather", "arguments": {"city": "Paris"}}]'.encode())
    assert accepts_ids(grammar, tok, [trigger] + body) and not accepts_ids(grammar, tok, list(b"[TOOL_CALLS]") + body)
    text = ChoiceTextStream(tok, show_tokens=[trigger])
    parser = ToolCallParser(syntax)
    content = "".join(parser.feed(text.add_token(t).text)[0] for t in [trigger] + body + [eos])
    assert content + parser.finish() == "" and [(c.name, c.arguments) for c in parser.calls] == \
        [("get_weather", '{"city": "Paris"}')]
    assert ChoiceTextStream(tok).add_token(trigger).text == ""  # hidden where no call is parsed


def accepts_ids(grammar: str, tokenizer, ids: list[int]) -> bool:
    from exo.inference.grammar import GrammarMatcher

    m = GrammarMatcher(grammar, tokenizer)
    try:
        m.consume_all(ids)
    except ValueError:
        return False
    return m.is_accepting
