"""Detokenizer: incremental, UTF-8 safe decoding; stop strings; stream hold-back; per-step cost.

Two tokenizers, both through heron.models.tokenizer.Tokenizer:
  * the bundled SmolLM2 (byte-level BPE built from its GGUF metadata): multi-byte characters are
    split across tokens, sometimes with one token straddling two characters;
  * a tiny SentencePiece-style BPE trained here (▁ spaces, `<0xNN>` byte fallback, a decoder that
    strips the first token's leading space), which is what makes prompt context matter.
No model runs; everything is CPU and fast once the GGUF metadata is read (once per module).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from heron.engine.detokenizer import Detokenizer
from heron.models.gguf import GGUFFile
from heron.models.tokenizer import Tokenizer

FFFD = "\ufffd"

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It wasn't me, he said -- twice!",
    'def fib(n: int) -> int:\n    """Fibonacci."""\n    if n < 2:\n\treturn n\n    return fib(n - 1) + fib(n - 2)\n',
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot product\n#include <stdio.h>",
    "中文的文本处理是一个很有意思的问题。日本語のテキストも試してみましょう。한국어 텍스트도 있습니다.",
    "Family 👨‍👩‍👧‍👦, thumbs 👍🏽👍🏿, flags 🏳️‍🌈 🇯🇵 🇫🇷, faces 😀😂🥲 and 🧑🏾‍💻 at work.",
    "Café naïve résumé façade jalapeño Ångström Øre Straße ĳ e\u0301 (combining) Ωμέγα Привет мир",
    "   leading spaces,\n\n\n\ttabs\t\tand   runs    of     whitespace \r\n trailing   ",
    "Mixed: price €42.50 ≈ ¥6,000 ≤ ∞; arrows → ⇒ ↔; math ∑∫√π; العربية עברית हिन्दी ไทย",
]


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def smollm(smollm2_gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(GGUFFile(smollm2_gguf_path).metadata)


def _build_spm_tokenizer() -> Tokenizer:
    """A small SentencePiece-style BPE: Metaspace split, `<0xNN>` byte fallback, Llama's decoder.

    Trained on ASCII-ish text with a tiny alphabet so CJK and emoji fall back to single-byte
    tokens: a 4-byte emoji becomes 4 tokens.
    """
    backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60, show_progress=False
    )
    backend.train_from_iterator([CORPUS[0] * 3, CORPUS[1], CORPUS[2], "Hello world, hello there."], trainer)
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
    return Tokenizer(
        backend,
        special_tokens={"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
        add_bos_token=False,
    )


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    return _build_spm_tokenizer()


@pytest.fixture(params=["smollm", "spm"])
def tok(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


class CountingTokenizer:
    """Wraps a tokenizer and records how many token ids each decode call was given."""

    def __init__(self, inner: Tokenizer):
        self.inner = inner
        self.all_special_ids = inner.all_special_ids
        self.calls: list[int] = []

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.calls.append(len(token_ids))
        return self.inner.decode(token_ids, skip_special_tokens=skip_special_tokens)


# ------------------------------------------------------------------------------------- helpers


def _encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _chunks(ids: list[int], rng: random.Random | None, max_chunk: int = 7) -> list[list[int]]:
    if rng is None:
        return [[i] for i in ids]
    out, pos = [], 0
    while pos < len(ids):
        size = rng.randint(1, max_chunk)
        out.append(ids[pos : pos + size])
        pos += size
    return out


class Stream:
    """Drives a Detokenizer the way the engine does and records what a client would see."""

    def __init__(self, detok: Detokenizer):
        self.detok = detok
        self.deltas: list[str] = []
        self.stop: str | None = None
        self.stop_step: int | None = None
        # (output_text, streamed text) after every step, to check the hold-back.
        self.snapshots: list[tuple[str, str]] = []

    def run(self, chunks: list[list[int]]) -> Stream:
        for step, chunk in enumerate(chunks):
            stop = self.detok.update(chunk)
            if stop is not None:
                self.stop, self.stop_step = stop, step
                break
            self.deltas.append(self.detok.get_delta())
            self.snapshots.append((self.detok.output_text, self.streamed))
        self.deltas.append(self.detok.get_delta(finished=True))
        return self

    @property
    def streamed(self) -> str:
        return "".join(self.deltas)


def _expected_after_prompt(tok: Tokenizer, prompt_ids: list[int], output_ids: list[int]) -> str:
    """What the output's text is when it follows the prompt (keeps a SentencePiece leading space)."""
    prompt_text = tok.decode(prompt_ids)
    full_text = tok.decode(prompt_ids + output_ids)
    assert full_text.startswith(prompt_text)
    return full_text[len(prompt_text) :]


# ----------------------------------------------------------------------- incremental decoding


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_token_by_token_reproduces_decode(tok, text):
    ids = _encode(tok, text)
    # The corpus round-trips (a SentencePiece decoder drops one leading space).
    assert tok.decode(ids) in (text, text.removeprefix(" "))
    stream = Stream(Detokenizer(tok, [])).run(_chunks(ids, None))
    assert stream.streamed == stream.detok.output_text == tok.decode(ids)
    assert all(FFFD not in d for d in stream.deltas)
    # output_text only ever grows: nothing emitted is later taken back.
    texts = [t for t, _ in stream.snapshots]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))


@pytest.mark.parametrize("seed", range(6))
def test_random_chunks_after_prompt_reproduce_decode(tok, seed):
    rng = random.Random(seed)
    prompt_ids = _encode(tok, "Answer briefly. Question: what is this?\nAnswer:")
    output_ids = _encode(tok, " " + "\n".join(rng.sample(CORPUS, len(CORPUS))))
    stream = Stream(Detokenizer(tok, prompt_ids)).run(_chunks(output_ids, rng))
    expected = _expected_after_prompt(tok, prompt_ids, output_ids)
    assert stream.streamed == stream.detok.output_text == expected
    assert all(FFFD not in d for d in stream.deltas)


def test_smollm_splits_characters_across_tokens(smollm):
    """The byte-level corpus really exercises the hard case: tokens that are part of a character."""
    ids = _encode(smollm, CORPUS[3] + CORPUS[4])
    partial = [i for i in ids if FFFD in smollm.decode([i])]
    assert len(partial) > 10


def test_chat_prompt_with_special_tokens_at_its_tail(smollm):
    prompt_ids = _encode(smollm, "<|im_start|>user\nHi 😀<|im_end|>\n<|im_start|>assistant\n")
    assert smollm.all_special_ids & set(prompt_ids[-4:])
    output_ids = _encode(smollm, "Hello! 👋 你好")
    stream = Stream(Detokenizer(smollm, prompt_ids)).run(_chunks(output_ids, None))
    assert stream.streamed == "Hello! 👋 你好"


def test_sentencepiece_leading_space_kept_with_prompt_context(spm):
    ids = _encode(spm, "Hello world")
    assert spm.decode(ids[1:]) == "world"  # decoding the output on its own loses the space
    prompt_ids, output_ids = ids[:1], ids[1:]

    with_prompt = Stream(Detokenizer(spm, prompt_ids)).run(_chunks(output_ids, None))
    assert with_prompt.streamed == " world"
    # Without a prompt there is nothing before the first token: decode() strips its space too.
    without_prompt = Stream(Detokenizer(spm, [])).run(_chunks(output_ids, None))
    assert without_prompt.streamed == "world"


def test_long_prompt_context_is_only_its_tail(spm):
    counting = CountingTokenizer(spm)
    prompt_ids = _encode(spm, CORPUS[0] * 50)
    detok = Detokenizer(counting, prompt_ids)
    detok.update(_encode(spm, " ok"))
    assert detok.get_delta(finished=True) == " ok"
    assert max(counting.calls) <= 10


def test_emoji_held_until_complete(spm):
    ids = _encode(spm, "😀")[-4:]
    assert [spm.decode([i]) for i in ids] == [FFFD] * 4  # four byte-fallback tokens
    detok = Detokenizer(spm, _encode(spm, "Hello"))
    deltas = []
    for token_id in ids:
        detok.update([token_id])
        deltas.append(detok.get_delta())
    assert deltas == ["", "", "", "😀"]


def test_max_tokens_mid_character_flushes_replacement_char(tok):
    ids = _encode(tok, "ok 😀")
    assert FFFD in tok.decode(ids[:-1])  # cut inside the emoji
    detok = Detokenizer(tok, [])
    detok.update(ids[:-1])
    assert FFFD not in detok.get_delta()
    detok.get_delta(finished=True)
    # The final flush gives what a one-shot decode of the same ids gives.
    assert detok.output_text == tok.decode(ids[:-1])
    assert detok.output_text.endswith(FFFD)


def test_invalid_bytes_never_complete_but_stay_bounded(spm):
    """A stream of lone UTF-8 lead bytes never forms a character; the window must not grow."""
    lead_byte = spm.token_to_id("<0xF0>")
    counting = CountingTokenizer(spm)
    detok = Detokenizer(counting, [])
    per_step = []
    for _ in range(200):
        counting.calls.clear()
        detok.update([lead_byte])
        per_step.append(sum(counting.calls))
    detok.get_delta(finished=True)
    assert detok.output_text == spm.decode([lead_byte] * 200) == FFFD * 200
    assert max(per_step) <= 40


# ------------------------------------------------------------------------------ special tokens


def test_special_tokens_skipped(smollm):
    ids = _encode(smollm, "Hi there<|im_end|>\n<|im_start|>more")
    assert smollm.eos_token_id in ids
    stream = Stream(Detokenizer(smollm, [], skip_special_tokens=True)).run(_chunks(ids, None))
    assert stream.streamed == smollm.decode(ids, skip_special_tokens=True) == "Hi there\nmore"


def test_special_tokens_kept(smollm):
    ids = _encode(smollm, "Hi there<|im_end|>\n<|im_start|>more")
    stream = Stream(Detokenizer(smollm, [], skip_special_tokens=False)).run(_chunks(ids, None))
    assert stream.streamed == smollm.decode(ids, skip_special_tokens=False)
    assert stream.streamed == "Hi there<|im_end|>\n<|im_start|>more"


def test_only_special_tokens_gives_no_text(smollm):
    detok = Detokenizer(smollm, [], stop=["x"])
    assert detok.update([smollm.eos_token_id]) is None
    assert detok.get_delta(finished=True) == ""
    assert detok.output_text == ""


# ------------------------------------------------------------------------------ per-step cost


@pytest.mark.parametrize("chunked", [False, True])
def test_per_step_decode_cost_is_bounded(tok, chunked):
    """Count the ids each decode call sees: per step it stays small however long the output is."""
    counting = CountingTokenizer(tok)
    prompt_ids = _encode(tok, CORPUS[0] * 20)
    output_ids = _encode(tok, "".join(CORPUS) * 8)
    assert len(output_ids) > 1500
    detok = Detokenizer(counting, prompt_ids, stop=["never appears here"])
    rng = random.Random(0) if chunked else None
    per_step, per_step_input = [], []
    for chunk in _chunks(output_ids, rng):
        counting.calls.clear()
        detok.update(chunk)
        detok.get_delta()
        per_step.append(sum(counting.calls))
        per_step_input.append(len(chunk))
    detok.get_delta(finished=True)
    assert detok.output_text == _expected_after_prompt(tok, prompt_ids, output_ids)
    if chunked:
        # The window is about two chunks; a chunk ending inside a character costs a few more
        # decodes of it (looking for the last clean boundary).
        assert max(per_step) <= 5 * (2 * max(per_step_input) + 3)
    else:
        # One token per step: the previous token (or the 5-token prompt tail on the first step) as
        # context, plus the new one, plus the odd held byte; decoded with and without the new one.
        assert max(per_step) <= 12
    # And the late steps cost no more than the early ones: nothing grows with the output.
    third = len(per_step) // 3
    assert sum(per_step[-third:]) <= 1.5 * sum(per_step[:third])


# ----------------------------------------------------------------------------------- stop strings


def _assert_held_back(stream: Stream) -> None:
    """Nothing streamed before the end may go beyond the final output (so no part of the stop)."""
    final = stream.detok.output_text
    for _, streamed in stream.snapshots:
        assert final.startswith(streamed)
    assert stream.streamed == final


def test_stop_spanning_two_and_three_tokens(smollm):
    text = "The quick brown fox jumps over the lazy dog"
    ids = _encode(smollm, text)
    for stop, min_tokens in [("brown fox", 2), ("k brown f", 3)]:
        pieces = [smollm.decode([i]) for i in ids]
        start = text.index(stop)
        # The stop string really crosses token boundaries.
        bounds = [len("".join(pieces[:k])) for k in range(len(pieces) + 1)]
        spanned = [k for k in range(len(pieces)) if bounds[k] < start + len(stop) and bounds[k + 1] > start]
        assert len(spanned) >= min_tokens

        stream = Stream(Detokenizer(smollm, [], stop=[stop])).run(_chunks(ids, None))
        assert stream.stop == stop
        assert stream.stop_step == spanned[-1]  # reported on the token that completes it
        assert stream.detok.output_text == text[:start]
        _assert_held_back(stream)
        # The hold-back was actually needed: at some step output_text ended with a prefix of the
        # stop string that had not been streamed.
        assert any(
            t.endswith(stop[:k]) and len(s) <= len(t) - k
            for t, s in stream.snapshots
            for k in range(1, len(stop))
        )


def test_stop_inside_multibyte_sequences(smollm, spm):
    cases = [
        (smollm, "Family: 👨‍👩‍👧‍👦 end", "👩", "Family: 👨\u200d"),
        (smollm, CORPUS[3], "文本", "中文的"),
        (smollm, "thumbs 👍🏽 up", "🏽", "thumbs 👍"),
        (spm, "say 😀 now", "😀", "say "),
    ]
    for tokenizer, text, stop, expected in cases:
        ids = _encode(tokenizer, text)
        stream = Stream(Detokenizer(tokenizer, [], stop=[stop])).run(_chunks(ids, None))
        assert stream.stop == stop
        assert stream.detok.output_text == expected
        assert all(FFFD not in d for d in stream.deltas)
        _assert_held_back(stream)


def test_earliest_stop_wins_when_completed_together(smollm):
    text = "The quick brown fox jumps over the lazy dog"
    ids = _encode(smollm, text)
    # All tokens in one update: both stops complete at once; "fox" starts first though listed last.
    detok = Detokenizer(smollm, [], stop=["lazy", "fox"])
    assert detok.update(ids) == "fox"
    assert detok.get_delta(finished=True) == "The quick brown "
    # Same start: the shorter one, which was complete first.
    detok = Detokenizer(smollm, [], stop=["quick brown", "quick"], include_stop_str_in_output=True)
    assert detok.update(ids) == "quick"
    assert detok.output_text == "The quick"


def test_first_completed_stop_wins_token_by_token(smollm):
    text = "The quick brown fox jumps over the lazy dog"
    ids = _encode(smollm, text)
    stream = Stream(Detokenizer(smollm, [], stop=["over the lazy", "jumps"])).run(_chunks(ids, None))
    assert stream.stop == "jumps"
    assert stream.detok.output_text == "The quick brown fox "
    _assert_held_back(stream)


def test_stop_at_very_first_token(smollm):
    ids = _encode(smollm, "Hello world")
    detok = Detokenizer(smollm, [], stop=["Hello"])
    assert detok.update(ids[:1]) == "Hello"
    assert detok.get_delta() == ""
    assert detok.get_delta(finished=True) == ""
    assert detok.output_text == ""
    # Anything fed afterwards is ignored: the request is finished.
    assert detok.update(ids[1:]) is None
    assert detok.output_text == ""


def test_include_stop_str_in_output(smollm):
    ids = _encode(smollm, "Hello world. Goodbye world.")
    stream = Stream(Detokenizer(smollm, [], stop=["world"], include_stop_str_in_output=True)).run(
        _chunks(ids, None)
    )
    assert stream.stop == "world"
    assert stream.detok.output_text == "Hello world"
    _assert_held_back(stream)


def test_stop_in_the_middle_of_a_token_cuts_the_token(smollm):
    ids = _encode(smollm, "Hello world")
    detok = Detokenizer(smollm, [], stop=["ell"])
    assert detok.update(ids[:1]) == "ell"
    assert detok.get_delta(finished=True) == "H"


def test_unmatched_stop_prefix_is_released(smollm):
    text = "wait for it, waiting, then the end"
    ids = _encode(smollm, text)
    stop = "wait here"
    stream = Stream(Detokenizer(smollm, [], stop=[stop])).run(_chunks(ids, None))
    assert stream.stop is None
    assert stream.streamed == stream.detok.output_text == text
    # While running, exactly the last (len(stop) - 1) characters are held back.
    for output_text, streamed in stream.snapshots:
        assert streamed == output_text[: max(0, len(output_text) - (len(stop) - 1))]


def test_no_stop_strings_no_hold_back(smollm):
    detok = Detokenizer(smollm, [])
    deltas = []
    for token_id in _encode(smollm, "Hello world"):
        detok.update([token_id])
        deltas.append(detok.get_delta())
    assert deltas == ["Hello", " world"]


def test_stop_is_not_matched_in_the_prompt(smollm):
    prompt_ids = _encode(smollm, "Say STOP when done. ST")
    ids = _encode(smollm, "OP ok")
    stream = Stream(Detokenizer(smollm, prompt_ids, stop=["STOP"])).run(_chunks(ids, None))
    assert stream.stop is None
    assert stream.streamed == "OP ok"


def test_empty_stop_string_ignored(smollm):
    stream = Stream(Detokenizer(smollm, [], stop=["", "zzz"])).run(_chunks(_encode(smollm, "abc"), None))
    assert stream.stop is None
    assert stream.streamed == "abc"


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("include", [False, True])
def test_random_stops_random_chunks(tok, seed, include):
    """Property: a stop string taken from the text cuts it at its first occurrence, whatever the chunking."""
    rng = random.Random(seed)
    text = rng.choice(CORPUS) + " " + rng.choice(CORPUS)
    ids = _encode(tok, text)
    full = tok.decode(ids)
    start = rng.randrange(len(full) - 6)
    stop = full[start : start + rng.randint(1, 6)]
    if FFFD in stop:
        pytest.skip("stop would contain a replacement character")
    distractor = "§never§"
    stream = Stream(
        Detokenizer(tok, [], stop=[distractor, stop], include_stop_str_in_output=include)
    ).run(_chunks(ids, rng))
    first = full.index(stop)
    assert stream.stop == stop
    assert stream.detok.output_text == full[: first + (len(stop) if include else 0)]
    assert all(FFFD not in d for d in stream.deltas)
    _assert_held_back(stream)
