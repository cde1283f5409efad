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
