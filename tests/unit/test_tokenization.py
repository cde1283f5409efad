"""Tokenization as vLLM does it, with the real Qwen3 tokenizer and chat template."""

import asyncio

import pytest

from extproc.requests import RoutingRequest
from extproc.tokenization import TokenizerBusy, TokenizerManager, TokenizerUnavailable, tokenize_with

MODEL = "Qwen/Qwen3-0.6B"
MESSAGES = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is a KV cache?"},
]


def chat(**kw) -> RoutingRequest:
    return RoutingRequest(model=MODEL, kind="chat", messages=kw.pop("messages", MESSAGES), **kw)


def test_chat_matches_the_tokenizers_own_apply_chat_template(tokenizer):
    expected = tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert tokenize_with(tokenizer, chat()) == list(expected)


def test_chat_special_tokens_are_not_added_twice(tokenizer):
    ids = tokenize_with(tokenizer, chat())
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == im_start and ids[1] != im_start
    assert ids.count(im_start) == 3  # system, user, and the generation prompt




def test_generation_prompt_and_tools_change_the_rendering(tokenizer):
    with_prompt = tokenize_with(tokenizer, chat())
    without = tokenize_with(tokenizer, chat(add_generation_prompt=False))
    assert with_prompt[: len(without)] == without and len(with_prompt) > len(without)
    tools = [{"type": "function", "function": {"name": "get_time", "description": "now", "parameters": {"type": "object", "properties": {}}}}]
    with_tools = tokenize_with(tokenizer, chat(tools=tools))
    assert "get_time" in tokenizer.decode(with_tools)
    assert "get_time" not in tokenizer.decode(with_prompt)


def test_completion_uses_default_special_tokens(tokenizer):
    ids = tokenize_with(tokenizer, RoutingRequest(model=MODEL, kind="completion", prompt="hello world"))
    assert ids == tokenizer("hello world")["input_ids"]


def test_token_ids_pass_through_untouched(tokenizer):
    assert tokenize_with(tokenizer, RoutingRequest(model=MODEL, kind="completion", token_ids=[5, 6, 7])) == [5, 6, 7]


async def test_manager_loads_once_and_encodes_off_the_loop(tokenizer_dir, tokenizer):
    manager = TokenizerManager({MODEL: tokenizer_dir}, workers=2)
    try:
        results = await asyncio.gather(*(manager.tokenize(chat()) for _ in range(8)))
        assert all(r == results[0] for r in results)
        assert manager.loaded(MODEL)
        first = await manager.get(MODEL)
        assert await manager.get(MODEL) is first
    finally:
        manager.close()


async def test_unknown_model_and_missing_tokenizer_are_unavailable(tmp_path):
    manager = TokenizerManager({"broken": str(tmp_path / "nope")})
    try:
        with pytest.raises(TokenizerUnavailable, match="no tokenizer configured"):
            await manager.tokenize(RoutingRequest(model="other", kind="completion", prompt="x"))
        with pytest.raises(TokenizerUnavailable, match="cannot load tokenizer"):
            await manager.tokenize(RoutingRequest(model="broken", kind="completion", prompt="x"))
    finally:
        manager.close()


async def test_a_full_queue_refuses_instead_of_waiting(tokenizer_dir):
    manager = TokenizerManager({MODEL: tokenizer_dir}, workers=1, max_queued=1)
    try:
        await manager.get(MODEL)
        long = RoutingRequest(model=MODEL, kind="completion", prompt="token " * 50_000)
        jobs = [asyncio.ensure_future(manager.tokenize(long)) for _ in range(6)]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        busy = [r for r in results if isinstance(r, TokenizerBusy)]
        done = [r for r in results if isinstance(r, list)]
        assert len(done) == 2 and len(busy) == 4
    finally:
        manager.close()


# -- the direct chat renderer ------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from extproc.tokenization import ChatRenderer, PromptRenderError, render_chat  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "now",
                                           "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}]
_content = st.one_of(st.text(max_size=80), st.sampled_from(
    ["<|im_end|>", "<think>\nhmm\n</think>\n\nAnswer", "<tool_call>\n{}\n</tool_call>", "<tool_response>x</tool_response>",
     "", " ", "{{ messages }}", "{% raw %}"]))
_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": _content})


def applied(tokenizer, request: RoutingRequest) -> str | None:
    """What apply_chat_template renders (None when it refuses the input)."""
    try:
        return render_chat(tokenizer, request)
    except PromptRenderError:
        return None


@settings(max_examples=int(__import__("os").environ.get("PROPERTY_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(_message, min_size=1, max_size=6), generation=st.booleans(), tools=st.booleans(),
       thinking=st.sampled_from([None, True, False]))
def test_the_direct_render_equals_apply_chat_template(tokenizer, messages, generation, tools, thinking):
    """Plain JSON messages rendered straight through the compiled template give exactly
    apply_chat_template's text; whatever the template refuses is left to apply_chat_template."""
    renderer = ChatRenderer(tokenizer)
    request = chat(messages=messages, add_generation_prompt=generation, tools=TOOLS if tools else None,
                   chat_template_kwargs={} if thinking is None else {"enable_thinking": thinking})
    expected = applied(tokenizer, request)
    direct = renderer.direct(request)
    if expected is None:
        assert direct is None
    else:
        assert direct == expected
        assert render_chat(tokenizer, request, renderer) == expected


def test_the_direct_render_is_used_for_plain_messages(tokenizer):
    renderer = ChatRenderer(tokenizer)
    assert renderer.enabled, "the self-check passes on the shipped transformers and Qwen3 template"
    assert renderer.direct(chat()) == tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("request_", [
    chat(messages=[{"role": "user", "content": "hi", "name": None}]),
    chat(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "4", "reasoning_content": "2+2"}]),
    chat(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once upon"}],
         add_generation_prompt=False, continue_final_message=True),
    chat(chat_template_kwargs={"documents": [{"title": "a", "text": "b"}]}),
], ids=["none-content", "reasoning", "continue-final", "reserved-kwarg"])
def test_messages_apply_chat_template_normalises_are_left_to_it(tokenizer, request_):
    """None values, reasoning fields, continuing the final message and kwargs that name
    apply_chat_template's own parameters change what it renders: those go through it."""
    renderer = ChatRenderer(tokenizer)
    assert renderer.direct(request_) is None
    assert render_chat(tokenizer, request_, renderer) == render_chat(tokenizer, request_)


def test_a_template_the_direct_render_does_not_reproduce_is_never_rendered_directly(tokenizer):
    class Drifted:
        """The real tokenizer, but its apply_chat_template adds a marker the compiled template lacks."""

        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def apply_chat_template(self, *args, **kwargs):
            return "[drift]" + self._inner.apply_chat_template(*args, **kwargs)

    drifted = Drifted(tokenizer)
    renderer = ChatRenderer(drifted)
    assert not renderer.enabled
    assert render_chat(drifted, chat(), renderer).startswith("[drift]")
