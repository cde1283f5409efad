"""The prefix store returns exactly the tokens a full tokenization gives, whatever the text.

Property-based: random and adversarial texts (split words, runs of spaces and newlines,
combining marks, emoji, CJK, digits, contractions, special-token strings whole and cut)
with the real Qwen3 tokenizer, tiny chunks so that boundaries fall everywhere.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.config import PrefixStoreConfig
from extproc.prefixcache import PrefixStore, Splitter
from extproc.requests import RoutingRequest
from extproc.tokenization import render_chat

MODEL = "Qwen/Qwen3-0.6B"

FRAGMENTS = [
    "hello", " world", "It", "'s", " they'd", "  ", "   ", "\n", "\n\n", " \n", "\t", "e\u0301", "caf\u00e9",
    "\u00df", "\U0001F600", "\u4f60\u597d", "123", "4", " 5", ".", ",", "!?", "...", "(", ")", "-", "_", "/",
    "<|im_end|>", "<|im_start|>", "<|im_", "end|>", "<tool_call>", "</tool_call>", "<think>", "a", "B", "z",
    " the", " cache", "KV", "\u00a0", "\r\n", "#", "'", '"', "ab cd", "x y", "Q: ", "A:",
]

texts = st.lists(st.sampled_from(FRAGMENTS), min_size=0, max_size=60).map("".join)
any_text = st.one_of(texts, st.text(max_size=200), st.text(alphabet="ab \n'é<|>", max_size=200))


def full(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=special).ids


def cache(chunk_chars: int = 16) -> PrefixStore:
    return PrefixStore(PrefixStoreConfig(block_size=chunk_chars))


SETTINGS = settings(max_examples=int(__import__("os").environ.get("PROPERTY_EXAMPLES", "300")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(first=any_text, second=any_text, cut=st.integers(0, 200), chunk=st.sampled_from([8, 16, 64]))
def test_cached_tokens_equal_a_full_tokenization(tokenizer, first, second, cut, chunk):
    """Cache one text, then tokenize another sharing a prefix of any length with it."""
    c = cache(chunk)
    c.tokenize(tokenizer, first, MODEL, add_special_tokens=False)
    other = first[:cut] + second
    tokens, cached = c.tokenize(tokenizer, other, MODEL, add_special_tokens=False)
    assert tokens == full(tokenizer, other)
    assert cached.tokens == full(tokenizer, other)[: len(cached.tokens)], "the cached run is a prefix of the truth"


@SETTINGS
@given(text=any_text, chunk=st.sampled_from([8, 16]))
def test_the_same_text_twice_comes_back_from_the_cache(tokenizer, text, chunk):
    c = cache(chunk)
    first, _ = c.tokenize(tokenizer, text, MODEL, add_special_tokens=False)
    second, cached = c.tokenize(tokenizer, text, MODEL, add_special_tokens=False)
    assert first == second == full(tokenizer, text)


conversation = st.lists(
    st.tuples(st.sampled_from(["system", "user", "assistant"]), any_text), min_size=1, max_size=5
)


@SETTINGS
@given(history=conversation, follow_up=any_text, chunk=st.sampled_from([16, 64, 256]))
def test_multi_turn_chats_rendered_with_the_chat_template(tokenizer, history, follow_up, chunk):
    c = cache(chunk)
    messages = [{"role": r, "content": t} for r, t in history]
    first = render_chat(tokenizer, RoutingRequest(model=MODEL, kind="chat", messages=messages))
    c.tokenize(tokenizer, first, MODEL, add_special_tokens=False)
    longer = messages + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": follow_up}]
    second = render_chat(tokenizer, RoutingRequest(model=MODEL, kind="chat", messages=longer))
    tokens, cached = c.tokenize(tokenizer, second, MODEL, add_special_tokens=False)
    assert tokens == full(tokenizer, second)


@SETTINGS
@given(first=texts, second=texts)
def test_completions_with_special_tokens(tokenizer, first, second):
    c = cache(16)
    c.tokenize(tokenizer, first + second, MODEL, add_special_tokens=True)
    tokens, _ = c.tokenize(tokenizer, first + "tail", MODEL, add_special_tokens=True)
    assert tokens == full(tokenizer, first + "tail", special=True)


def test_a_long_shared_system_prompt_is_mostly_served_from_the_cache(tokenizer):
    c = cache(256)
    system = "You are a meticulous assistant for a logistics company. " * 60
    for question in ("Where is parcel 17?", "Cancel order 9", "What are your hours?"):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        text = render_chat(tokenizer, RoutingRequest(model=MODEL, kind="chat", messages=messages))
        tokens, cached = c.tokenize(tokenizer, text, MODEL, add_special_tokens=False)
        assert tokens == full(tokenizer, text)
    assert len(cached.tokens) > 0.9 * len(full(tokenizer, system)), "the system prompt came from the cache"


def test_the_splitter_finds_word_and_added_token_splits_for_qwen(tokenizer):
    splitter = Splitter(tokenizer)
    assert splitter.word_splits
    assert splitter.special_prefix == []
    text = "hello world<|im_end|>\nabc"
    assert splitter.last_split(text, 0, len(text)) == len("hello world<|im_end|>")
    assert splitter.last_split("hello world and more", 0, 12) == len("hello world")
    assert splitter.last_split("helloworld", 0, 10) == 0


def test_a_tokenizer_without_word_boundaries_splits_on_added_tokens_only(tokenizer):
    class NoWordSplits:
        """Wraps the real tokenizer but glues words across a space: word splits must be refused."""

        def __init__(self, inner):
            self.backend_tokenizer = _Backend(inner.backend_tokenizer)

    class _Backend:
        def __init__(self, inner):
            self._inner = inner

        def get_added_tokens_decoder(self):
            return self._inner.get_added_tokens_decoder()

        def encode(self, text, add_special_tokens=False):
            return self._inner.encode(text.replace(" ", ""), add_special_tokens=add_special_tokens)

    assert Splitter(NoWordSplits(tokenizer)).word_splits is False
