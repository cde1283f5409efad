"""Request parsing: what routing reads from OpenAI bodies, and 400s for what it cannot."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.requests import RequestError, is_routed_path, parse


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_routed_paths_are_completions_and_chat_only():
    assert is_routed_path("/v1/completions")
    assert is_routed_path("/v1/chat/completions?stream=true")
    assert not is_routed_path("/v1/models")
    assert not is_routed_path("/health")
    assert not is_routed_path("/v1/embeddings")


def test_completion_prompt_string():
    r = parse("/v1/completions", body(model="m", prompt="hello"))
    assert (r.model, r.kind, r.prompt, r.token_ids) == ("m", "completion", "hello", None)


def test_completion_prompt_list_routes_by_the_first():
    r = parse("/v1/completions", body(model="m", prompt=["first", "second"]))
    assert r.prompt == "first"


def test_completion_token_ids_need_no_tokenizer():
    assert parse("/v1/completions", body(model="m", prompt=[1, 2, 3])).token_ids == [1, 2, 3]
    assert parse("/v1/completions", body(model="m", prompt=[[4, 5], [6]])).token_ids == [4, 5]


def test_chat_content_parts_flatten_to_text_joined_by_newlines():
    r = parse(
        "/v1/chat/completions",
        body(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                               {"type": "image_url", "image_url": {"url": "x"}},
                                                               {"type": "text", "text": "b"}]}]),
    )
    assert r.messages == [{"role": "user", "content": "a\nb"}]


def test_chat_keeps_tools_and_template_options():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    r = parse(
        "/v1/chat/completions",
        body(model="m", messages=[{"role": "user", "content": "hi"}], tools=tools,
             add_generation_prompt=False, chat_template_kwargs={"enable_thinking": False}),
    )
    assert r.tools == tools
    assert r.add_generation_prompt is False
    assert r.chat_template_kwargs == {"enable_thinking": False}


@pytest.mark.parametrize(
    "path, raw, param",
    [
        ("/v1/completions", b"{not json", None),
        ("/v1/completions", b'{"model": "\x80", "prompt": "x"}', None),  # invalid UTF-8 (found by the fuzzer)
        ("/v1/completions", b"[1, 2]", None),
        ("/v1/completions", body(prompt="x"), "model"),
        ("/v1/completions", body(model="", prompt="x"), "model"),
        ("/v1/completions", body(model="m"), "prompt"),
        ("/v1/completions", body(model="m", prompt=[]), "prompt"),
        ("/v1/completions", body(model="m", prompt=[1, "a"]), "prompt"),
        ("/v1/completions", body(model="m", prompt=[-1]), "prompt"),
        ("/v1/chat/completions", body(model="m"), "messages"),
        ("/v1/chat/completions", body(model="m", messages=[]), "messages"),
        ("/v1/chat/completions", body(model="m", messages=["hi"]), "messages[0]"),
        ("/v1/chat/completions", body(model="m", messages=[{"role": "user", "content": 5}]), "messages[0]"),
        ("/v1/chat/completions", body(model="m", messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages[0]"),
    ],
)
def test_invalid_bodies_are_400_with_openai_error(path, raw, param):
    with pytest.raises(RequestError) as err:
        parse(path, raw)
    assert err.value.status == 400
    payload = json.loads(err.value.body())
    assert payload["error"]["type"] == "invalid_request_error"
    assert payload["error"]["param"] == param
    assert payload["error"]["message"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=40,
)
fields = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.text(max_size=10), json_values), "prompt": json_values, "messages": json_values,
    "tools": json_values, "chat_template_kwargs": json_values, "add_generation_prompt": json_values,
})


@settings(max_examples=int(__import__("os").environ.get("PROPERTY_EXAMPLES", "400")), deadline=None)
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), data=st.one_of(fields, json_values))
def test_fuzzed_bodies_parse_or_fail_with_a_request_error(path, data):
    try:
        raw = json.dumps(data).encode()
    except (ValueError, OverflowError):
        return
    try:
        parse(path, raw)
    except RequestError as exc:
        assert exc.status == 400 and json.loads(exc.body())["error"]["message"]


@settings(max_examples=int(__import__("os").environ.get("PROPERTY_EXAMPLES", "400")), deadline=None)
@given(raw=st.binary(max_size=300))
def test_fuzzed_bytes_parse_or_fail_with_a_request_error(raw):
    try:
        parse("/v1/chat/completions", raw)
    except RequestError:
        pass


def test_too_many_messages_is_a_400():
    with pytest.raises(RequestError) as err:
        parse("/v1/chat/completions", body(model="m", messages=[{"role": "user", "content": "x"}] * 5), max_messages=4)
    assert err.value.code == "too_many_messages"
