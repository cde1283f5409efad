"""The prefix store gives exactly the tokens (and so the block keys) a full tokenization gives,
whatever the text, and tokenizes no further than the blocks that can match.

Property-based: random and adversarial texts (split words, runs of spaces and newlines,
combining marks, emoji, CJK, digits, contractions, special-token strings whole and cut)
with the real Qwen3 tokenizer, tiny chunks so that boundaries fall everywhere. Blocks of one
token make the keys name every token, so equal keys mean equal tokens.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.blocks import block_keys
from extproc.config import PrefixStoreConfig
from extproc.prefixcache import PrefixStore, Splitter
from extproc.requests import RoutingRequest
from extproc.tokenization import TokenizerManager, encode_off_loop, render_chat

MODEL = "Qwen/Qwen3-0.6B"
EVERY = 10**9

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


def keys_of(tokens: list[int], block: int = 1, max_blocks: int = EVERY) -> list[int]:
    return block_keys(tokens, block, max_blocks)


def store(chunk_chars: int = 16, *, block: int = 1, max_blocks: int = EVERY, anchored: bool = False,
          **config) -> PrefixStore:
    """A store cutting everywhere; ``anchored`` also anchors every prefix (not only long ones)."""
    anchors = {"min_anchor_chars": 1, "anchor_head": 4} if anchored else {}
    return PrefixStore(PrefixStoreConfig(block_size=chunk_chars, **config), block_size=block, max_blocks=max_blocks,
                       keyer=lambda tokens, parent, n: block_keys(tokens, block, n, "chained", parent),
                       min_window_chars=8, **anchors)


SETTINGS = settings(max_examples=int(__import__("os").environ.get("PROPERTY_EXAMPLES", "300")), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(first=any_text, second=any_text, cut=st.integers(0, 200), chunk=st.sampled_from([8, 16, 64]),
       off_loop=st.booleans())
def test_cached_tokens_equal_a_full_tokenization(tokenizer, first, second, cut, chunk, off_loop):
    """Cache one text, then tokenize another sharing a prefix of any length with it (on the
    event loop's encode, or a worker's, which releases the GIL)."""
    c = store(chunk)
    c.tokenize(tokenizer, first, MODEL, add_special_tokens=False, off_loop=off_loop)
    other = first[:cut] + second
    result = c.tokenize(tokenizer, other, MODEL, add_special_tokens=False, off_loop=off_loop)
    truth = full(tokenizer, other)
    assert result.keys == keys_of(truth)
    assert (result.tokens, result.cut) == (len(truth), False)
    assert result.cached_tokens <= len(truth)


@SETTINGS
@given(text=any_text, special=st.booleans())
def test_a_worker_encodes_exactly_what_the_event_loop_encodes(tokenizer, text, special):
    """Workers encode a batch of one (the Rust tokenizer releases the GIL for batches only)."""
    backend = tokenizer.backend_tokenizer
    off_loop = encode_off_loop(backend, text, add_special_tokens=special)
    on_loop = backend.encode(text, add_special_tokens=special)
    assert (off_loop.ids, off_loop.offsets) == (on_loop.ids, on_loop.offsets)


@SETTINGS
@given(text=any_text, chunk=st.sampled_from([8, 16]))
def test_the_same_text_twice_comes_back_from_the_cache(tokenizer, text, chunk):
    c = store(chunk)
    first = c.tokenize(tokenizer, text, MODEL, add_special_tokens=False)
    second = c.tokenize(tokenizer, text, MODEL, add_special_tokens=False)
    assert first.keys == second.keys == keys_of(full(tokenizer, text))


@SETTINGS
@given(first=any_text, text=any_text, need=st.integers(1, 40), block=st.sampled_from([1, 2, 4]),
       chunk=st.sampled_from([8, 16, 64]))
def test_tokenizing_stops_at_the_cut_with_exact_tokens(tokenizer, first, text, need, block, chunk):
    """Only the blocks that can match are keyed, and the tokens counted up to the cut are
    exactly the first tokens of a whole tokenization."""
    c = store(chunk, block=block, max_blocks=need)
    c.tokenize(tokenizer, first, MODEL, add_special_tokens=False)
    text = first[: len(first) // 2] + text
    result = c.tokenize(tokenizer, text, MODEL, add_special_tokens=False)
    truth = full(tokenizer, text)
    assert result.keys == keys_of(truth, block, need)
    assert result.tokens >= min(need * block, len(truth))
    assert full(tokenizer, text[: result.chars]) == truth[: result.tokens], "the cut is a split point"
    assert result.cut == (result.chars < len(text))
    if not result.cut:
        assert result.tokens == len(truth)


@pytest.fixture(scope="module")
def spread():
    """The tokenizer manager's piece pool, counting the texts it was given at once."""
    manager = TokenizerManager({}, workers=2)

    def counted(backend, texts, special_first=False):
        counted.batches.append(len(texts))
        return manager.spread(backend, texts, special_first)
    counted.batches = []
    yield counted
    manager.close()


@SETTINGS
@given(first=any_text, text=any_text, need=st.integers(1, 300), piece=st.sampled_from([1, 3, 16]),
       pieces=st.integers(2, 4), chunk=st.sampled_from([8, 16, 64]), special=st.booleans())
def test_pieces_encoded_side_by_side_keep_exact_tokens(tokenizer, spread, first, text, need, piece, pieces, chunk,
                                                       special):
    """A stretch cut again at split points and encoded on several threads gives the tokens a
    whole tokenization gives, up to the cut and with the special tokens of a completion."""
    c = PrefixStore(PrefixStoreConfig(block_size=chunk), block_size=1, max_blocks=need,
                    keyer=lambda tokens, parent, n: block_keys(tokens, 1, n, "chained", parent),
                    min_window_chars=8, min_piece_chars=piece, max_pieces=pieces)
    c.tokenize(tokenizer, first, MODEL, add_special_tokens=special, off_loop=True, spread=spread)
    text = first[: len(first) // 2] + text
    result = c.tokenize(tokenizer, text, MODEL, add_special_tokens=special, off_loop=True, spread=spread)
    truth = full(tokenizer, text, special)
    assert result.keys == keys_of(truth, 1, need)
    assert full(tokenizer, text[: result.chars], special) == truth[: result.tokens], "the cut is a split point"


def test_a_long_stretch_is_encoded_in_pieces_side_by_side(tokenizer, spread):
    block, max_blocks = 16, 1024  # 16k tokens: stretches of 32k characters and more, 8k at least per piece
    c = PrefixStore(PrefixStoreConfig(), block_size=block, max_blocks=max_blocks,
                    keyer=lambda tokens, parent, n: block_keys(tokens, block, n, "chained", parent), max_pieces=2)
    document = "Section {}: the quarterly figures for region {} rose by {} percent. ".format
    text = "".join(document(i, i % 7, i % 13) for i in range(5_000))
    del spread.batches[:]
    result = c.tokenize(tokenizer, text, MODEL, add_special_tokens=False, off_loop=True, spread=spread)
    assert spread.batches and set(spread.batches) == {2}, "every stretch in two pieces, one per core"
    assert result.keys == keys_of(full(tokenizer, text[:120_000]), block, max_blocks)
    assert len(result.keys) == max_blocks


def test_a_spread_during_shutdown_encodes_the_pieces_the_pool_dropped(tokenizer):
    """Pieces cancelled by close() before they ran, or refused after it, are encoded by the
    caller: a request in flight at shutdown still gets its tokens, not an exception."""
    import threading
    backend = tokenizer.backend_tokenizer
    texts = ["The first piece, ", "the second one, ", "and the third."]
    truth = [backend.encode(t, add_special_tokens=False).ids for t in texts]
    manager = TokenizerManager({}, workers=1)
    hold, busy = threading.Event(), []
    for _ in range(manager._pieces._max_workers):  # every piece thread busy: the spread's pieces queue
        busy.append(manager._pieces.submit(hold.wait, 10))
    result = []
    caller = threading.Thread(target=lambda: result.append(manager.spread(backend, texts)))
    caller.start()
    while manager._pieces._work_queue.qsize() < len(texts) - 1:
        pass
    manager.close()  # cancels the queued pieces
    hold.set()
    caller.join(10)
    assert [e.ids for e in result[0]] == truth
    assert [e.ids for e in manager.spread(backend, texts)] == truth, "after shutdown, all on the caller"


conversation = st.lists(
    st.tuples(st.sampled_from(["system", "user", "assistant"]), any_text), min_size=1, max_size=5
)


@SETTINGS
@given(history=conversation, follow_up=any_text, chunk=st.sampled_from([16, 64, 256]))
def test_multi_turn_chats_rendered_with_the_chat_template(tokenizer, history, follow_up, chunk):
    c = store(chunk)
    messages = [{"role": r, "content": t} for r, t in history]
    first = render_chat(tokenizer, RoutingRequest(model=MODEL, kind="chat", messages=messages))
    c.tokenize(tokenizer, first, MODEL, add_special_tokens=False)
    longer = messages + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": follow_up}]
    second = render_chat(tokenizer, RoutingRequest(model=MODEL, kind="chat", messages=longer))
    assert c.tokenize(tokenizer, second, MODEL, add_special_tokens=False).keys == keys_of(full(tokenizer, second))


@SETTINGS
@given(first=texts, second=texts)
def test_completions_with_special_tokens(tokenizer, first, second):
    c = store(16)
    c.tokenize(tokenizer, first + second, MODEL, add_special_tokens=True)
    result = c.tokenize(tokenizer, first + "tail", MODEL, add_special_tokens=True)
    assert result.keys == keys_of(full(tokenizer, first + "tail", special=True))


def chat_text(tokenizer, system: str, question: str) -> str:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return render_chat(tokenizer, RoutingRequest(model=MODEL, kind="chat", messages=messages))


def test_a_long_shared_system_prompt_is_mostly_served_from_the_cache(tokenizer):
    c = store(256, block=16)
    system = "You are a meticulous assistant for a logistics company. " * 60
    for question in ("Where is parcel 17?", "Cancel order 9", "What are your hours?"):
        text = chat_text(tokenizer, system, question)
        result = c.tokenize(tokenizer, text, MODEL, add_special_tokens=False)
        assert result.keys == keys_of(full(tokenizer, text), 16)
    assert result.cached_tokens > len(full(tokenizer, system)), "the whole system message came from the cache"


def test_a_new_turn_encodes_only_the_new_message(tokenizer):
    """Chunks end after every added token, so the next turn reuses every earlier message whole."""
    c = store(256, block=16)
    system = "You answer questions about invoices, refunds and shipping, briefly and politely. " * 20
    c.tokenize(tokenizer, chat_text(tokenizer, system, "first question"), MODEL, add_special_tokens=False)
    text = chat_text(tokenizer, system, "What is the refund window for damaged goods?")
    plan = c.plan(tokenizer, text, MODEL, add_special_tokens=False)
    new_turn = text[text.index("user\nWhat is the refund"):]
    assert plan.to_encode == len(new_turn)


def test_block_keys_of_a_known_prefix_are_not_hashed_again(tokenizer):
    hashed: list[int] = []

    def counting_keyer(tokens, parent, n):
        keys = block_keys(tokens, 16, n, "chained", parent)
        hashed.append(len(keys))
        return keys

    c = PrefixStore(PrefixStoreConfig(), block_size=16, max_blocks=1000, keyer=counting_keyer)
    system = "Summarize each customer email in one sentence and tag its urgency. " * 40
    first = c.tokenize(tokenizer, chat_text(tokenizer, system, "q1"), MODEL, add_special_tokens=False)
    second = c.tokenize(tokenizer, chat_text(tokenizer, system, "q2"), MODEL, add_special_tokens=False)
    assert hashed[0] == len(first.keys) > 30
    assert hashed[1] <= 2, "only the blocks of the new turn are keyed"
    assert second.keys == keys_of(full(tokenizer, chat_text(tokenizer, system, "q2")), 16)


def test_a_huge_document_is_tokenized_only_up_to_the_cut(tokenizer):
    block, max_blocks = 16, 64
    c = PrefixStore(PrefixStoreConfig(), block_size=block, max_blocks=max_blocks,
                    keyer=lambda tokens, parent, n: block_keys(tokens, block, n, "chained", parent))
    document = "Section {}: the quarterly figures for region {} rose by {} percent. ".format
    text = "".join(document(i, i % 7, i % 13) for i in range(20_000))  # ~1.3 MB
    result = c.tokenize(tokenizer, text, MODEL, add_special_tokens=False)
    head = full(tokenizer, text[:20_000])
    assert result.keys == keys_of(head, block, max_blocks)
    assert result.cut and result.chars < 100_000, "far less than the document was tokenized"
    estimate = result.estimated_total(len(text))
    truth = len(full(tokenizer, text))
    assert 0.8 * truth < estimate < 1.25 * truth


def test_the_splitter_finds_word_and_added_token_splits_for_qwen(tokenizer):
    splitter = Splitter(tokenizer)
    assert splitter.word_splits
    assert splitter.special_prefix == []
    text = "hello world<|im_end|>\nabc"
    assert splitter.last_split(text, 0, len(text)) == len("hello world<|im_end|>")
    assert splitter.last_split("hello world and more", 0, 12) == len("hello world")
    assert splitter.last_split("helloworld", 0, 10) == 0


def test_no_word_split_inside_an_added_token_that_crosses_the_end(tokenizer):
    splitter = Splitter(tokenizer)
    splitter._added_by_first["["] = ["[a b]"]  # an added token with a space between letters
    text = "one two [a b] three"
    end = text.index("[a b]") + 2  # inside the added token, right after its space
    assert splitter.last_split(text, 0, end) == len("one"), "not the space inside [a b]"


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


@pytest.mark.parametrize("entries", [5, 50])
def test_the_store_is_bounded_by_max_entries_and_max_prompts(tokenizer, entries):
    c = PrefixStore(
        PrefixStoreConfig(block_size=16, max_entries=entries, max_prompts=entries), block_size=4, max_blocks=EVERY,
        keyer=lambda tokens, parent, n: block_keys(tokens, 4, n, "chained", parent))
    for i in range(200):
        text = f"prompt number {i} with some words that make several chunks of text"
        result = c.tokenize(tokenizer, text, MODEL, add_special_tokens=False)
        c.put_prompt(c.prompt_key(text, MODEL, False), result)
    assert len(c) <= entries and c.prompts <= entries
    assert c.evictions > 0


# -- anchors: a long known prefix is checked with two hashes, not cut and looked up again ----


@SETTINGS
@given(base=any_text, tails=st.lists(any_text, min_size=3, max_size=5), cuts=st.lists(st.integers(0, 200), min_size=5,
       max_size=5), chunk=st.sampled_from([8, 16, 64]), block=st.sampled_from([1, 3]))
def test_prompts_started_from_an_anchor_keep_exact_tokens(tokenizer, base, tails, cuts, chunk, block):
    """Prompts sharing prefixes of any length, one after another in one store that anchors
    every prefix it has seen twice: every prompt's keys and counts equal a full tokenization."""
    c = store(chunk, block=block, anchored=True)
    for tail, cut in zip(tails, cuts):
        text = base[:cut] + tail if cut < len(base) else base + tail
        result = c.tokenize(tokenizer, text, MODEL, add_special_tokens=False)
        truth = full(tokenizer, text)
        assert result.keys == keys_of(truth, block)
        assert (result.tokens, result.cut) == (len(truth), False)


@SETTINGS
@given(history=conversation, replies=st.lists(any_text, min_size=2, max_size=4), chunk=st.sampled_from([16, 64, 256]))
def test_a_growing_chat_started_from_anchors_keeps_exact_tokens(tokenizer, history, replies, chunk):
    c = store(chunk, anchored=True)
    messages = [{"role": r, "content": t} for r, t in history]
    for reply in replies:
        text = render_chat(tokenizer, RoutingRequest(model=MODEL, kind="chat", messages=messages))
        assert c.tokenize(tokenizer, text, MODEL, add_special_tokens=False).keys == keys_of(full(tokenizer, text))
        messages = messages + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": reply}]


def test_a_new_question_after_a_long_system_prompt_starts_from_its_anchor(tokenizer):
    """The second question anchors the shared system prompt; from the third on, only the text
    after it is cut, hashed and looked up (with the store's default thresholds)."""
    c = store(256, block=16)
    system = "You answer questions about invoices, refunds and shipping, briefly and politely. " * 40
    for question in ("first question", "second question"):
        c.tokenize(tokenizer, chat_text(tokenizer, system, question), MODEL, add_special_tokens=False)
    text = chat_text(tokenizer, system, "What is the refund window for damaged goods?")
    plan = c.plan(tokenizer, text, MODEL, add_special_tokens=False)
    new_turn = text.index("user\nWhat is the refund")
    assert plan.run.anchor and plan.chunks.start == new_turn, "cut only after the shared system prompt"
    result = c.finish(plan)
    assert result.keys == keys_of(full(tokenizer, text), 16)
    assert result.tokens == len(full(tokenizer, text))


def test_an_anchor_is_not_taken_when_the_text_before_it_differs(tokenizer):
    """Same beginning, same length, same last characters before the anchor: the whole-prefix
    hash still tells them apart."""
    c = store(256, block=16)
    rules = "You help with invoices and refunds, politely. " * 30
    system = rules + "Region: north. " + rules
    for question in ("q one", "q two"):
        c.tokenize(tokenizer, chat_text(tokenizer, system, question), MODEL, add_special_tokens=False)
    assert c.plan(tokenizer, chat_text(tokenizer, system, "q three"), MODEL, add_special_tokens=False).run.anchor
    other = rules + "Region: south. " + rules
    text = chat_text(tokenizer, other, "q three")
    plan = c.plan(tokenizer, text, MODEL, add_special_tokens=False)
    assert not plan.run.anchor
    assert c.finish(plan).keys == keys_of(full(tokenizer, text), 16)


def test_a_changed_tokenizer_never_starts_from_an_old_anchor(tokenizer):
    c = store(256, block=16)
    system = "You answer questions about invoices, refunds and shipping, briefly and politely. " * 40
    for question in ("first question", "second question"):
        c.tokenize(tokenizer, chat_text(tokenizer, system, question), MODEL, add_special_tokens=False)
    assert c.plan(tokenizer, chat_text(tokenizer, system, "third"), MODEL, add_special_tokens=False).run.anchor
    c.forget_model(MODEL)
    assert not c.plan(tokenizer, chat_text(tokenizer, system, "third"), MODEL, add_special_tokens=False).run.anchor


def test_anchors_are_bounded_by_max_prompts(tokenizer):
    """maxPrompts / 4 beginnings (LRU), 4 anchors each."""
    c = store(64, block=4, anchored=True, max_prompts=8)
    c.anchor_head = 32  # each tenant's prompts begin differently
    for i in range(40):
        system = f"Tenant {i:02d}. " + "Be brief and cite sources. " * 4
        for question in ("one", "two"):
            c.tokenize(tokenizer, chat_text(tokenizer, system, question), MODEL, add_special_tokens=False)
    assert 0 < c.anchors <= 8
    assert c.evictions > 0
    tenant = "Tenant 39. " + "Be brief and cite sources. " * 4
    assert c.plan(tokenizer, chat_text(tokenizer, tenant, "three"), MODEL, add_special_tokens=False).run.anchor
    tenant = "Tenant 00. " + "Be brief and cite sources. " * 4
    assert not c.plan(tokenizer, chat_text(tokenizer, tenant, "three"), MODEL, add_special_tokens=False).run.anchor
