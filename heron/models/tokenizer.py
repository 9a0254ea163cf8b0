"""The tokenizer: text <-> token ids, built on the Rust `tokenizers` library.

Two sources feed it:

- GGUF metadata (`GGUFFile(path).metadata`): llama.cpp stores the vocabulary, merges, token types
  and special ids but no pipeline, so we rebuild the pipeline the model was trained with, following
  llama.cpp where it and transformers' GGUF converter disagree. Byte-level BPE ('gpt2') picks its
  pre-tokenizer from `tokenizer.ggml.pre`; SentencePiece-style BPE ('llama') gets merges derived
  from the token scores, `<0xNN>` byte fallback, and the `▁` space marker with sentencepiece's
  dummy prefix.
- A Hugging Face directory: `tokenizer.json` as the pipeline, `tokenizer_config.json` /
  `special_tokens_map.json` for the named special tokens and flags, and the chat template.

Out come `Tokenizer` objects whose `encode`/`decode` sit on the request hot path, plus what the rest
of Heron needs around them: special token ids and strings, the chat template, and `token_bytes` (the
raw bytes behind one token, for OpenAI logprobs).

Special tokens written in text are control tokens by default. Text a client sent can be kept from
producing them: `encode(..., parse_special=False)` for a whole string, and for a rendered chat
template `escape_special` on each client string before rendering plus `encode_rendered` after, so
that the template's own control tokens stay while the client's spellings become plain text.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

logger = logging.getLogger(__name__)

__all__ = ["Tokenizer", "UnsupportedTokenizerError"]


class UnsupportedTokenizerError(ValueError):
    """The metadata or directory describes a tokenizer Heron cannot build."""


# llama.cpp's token attributes as stored in `tokenizer.ggml.token_type`.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_SPM_SPACE = "\u2581"  # '▁': SentencePiece's visible space


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, NBSP, soft
    hyphen...) are shifted to code points from 256 up, in byte order, so that every byte has a
    visible, non-whitespace spelling a BPE vocabulary can hold.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {ch: b for b, ch in _byte_to_unicode().items()}


# ---------------------------------------------------------------------------------------------
# Pre-tokenizers for byte-level BPE, keyed by GGUF `tokenizer.ggml.pre`.
#
# Each family is the split its merges were learned on. The names and the split each one gets follow
# llama.cpp's llama-vocab (which is what converted the file), written here in the syntax of the
# `tokenizers` regex engine (Oniguruma: `(?i:...)` works, so llama.cpp's case-expanded contractions
# are not needed).

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenizerSpec:
    """How one `tokenizer.ggml.pre` family splits text before BPE."""

    split: str | None  # a regex run ahead of a regex-free ByteLevel; None: ByteLevel's own GPT-2 regex
    digits_first: bool = False  # isolate every digit first (StarCoder-style vocabularies)
    ignore_merges: bool = False  # a word already in the vocabulary is emitted whole (Llama 3)
    default_add_bos: bool = False  # llama.cpp adds BOS for this family when the file does not say


_GPT2 = _PreTokenizerSpec(split=None)
_STARCODER = _PreTokenizerSpec(split=None, digits_first=True)
_LLAMA3 = _PreTokenizerSpec(split=_LLAMA3_SPLIT, ignore_merges=True, default_add_bos=True)
_LLAMA3_REGEX_ONLY = _PreTokenizerSpec(split=_LLAMA3_SPLIT)
_QWEN2 = _PreTokenizerSpec(split=_QWEN2_SPLIT)
_QWEN35 = _PreTokenizerSpec(split=_QWEN35_SPLIT)
_TEKKEN = _PreTokenizerSpec(split=_TEKKEN_SPLIT, ignore_merges=True, default_add_bos=True)
_GPT4O = _PreTokenizerSpec(split=_GPT4O_SPLIT)


def _family(spec: _PreTokenizerSpec, *names: str) -> dict[str, _PreTokenizerSpec]:
    return dict.fromkeys(names, spec)


_PRE_TOKENIZERS: dict[str, _PreTokenizerSpec] = {
    **_family(
        _GPT2,
        "default",
        "gpt-2",
        "gpt2",
        "phi-2",
        "mpt",
        "olmo",
        "jais",
        "jina-es",
        "jina-de",
        "jina-v2-es",
        "jina-v2-de",
        "jina-v1-en",
        "jina-v2-code",
        "roberta-bpe",
        "gigachat",
        "a.x-4.0",
        "mellum",
        "modern-bert",
        "exaone4",
        "trillion",
        "granite-docling",
    ),
    **_family(
        _STARCODER,
        "starcoder",
        "smollm",
        "refact",
        "command-r",
        "codeshell",
        "exaone",
        "minerva-7b",
    ),
    **_family(
        _LLAMA3,
        "llama3",
        "llama-v3",
        "llama-bpe",
        "falcon3",
        "falcon-h1",
        "pixtral",
        "midm-2.0",
        "lfm2",
        "jina-v5-nano",
    ),
    **_family(_LLAMA3_REGEX_ONLY, "dbrx", "smaug-bpe", "chatglm-bpe", "glm4"),
    **_family(
        _QWEN2,
        "qwen2",
        "deepseek-r1-qwen",
        "kormo",
        "f2llmv2",
        "megrez",
        "stablelm2",
        "hunyuan",
    ),
    **_family(_QWEN35, "qwen35"),
    **_family(_TEKKEN, "tekken"),
    **_family(_GPT4O, "gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"),
}


def _byte_level_pre_tokenizer(spec: _PreTokenizerSpec) -> pre_tokenizers.PreTokenizer:
    if spec.split is not None:
        # The family's own regex does the splitting; ByteLevel only re-spells bytes.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(spec.split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if spec.digits_first:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


# ---------------------------------------------------------------------------------------------
# Building the backend from GGUF metadata.


def _special_added_token(content: str) -> AddedToken:
    return AddedToken(content, special=True, normalized=False)


def _plain_added_token(content: str) -> AddedToken:
    return AddedToken(content, special=False, normalized=False)


def _vocab_dict(tokens: Sequence[str]) -> dict[str, int]:
    """token -> id; a spelling listed twice keeps its first id (llama.cpp files do repeat a few)."""
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    if len(vocab) != len(tokens):
        logger.warning(
            "GGUF vocabulary repeats %d token spellings; keeping the first id of each",
            len(tokens) - len(vocab),
        )
    return vocab


def _split_merges(merges: Iterable[str]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) == 2:
            pairs.append((parts[0], parts[1]))
        else:
            logger.warning("skipping malformed GGUF merge %r", merge)
    return pairs


def _usable_merges(merges: list[tuple[str, str]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Drop merges whose halves or result the vocabulary lacks: `tokenizers` refuses to build a BPE
    with any, while llama.cpp simply never applies them."""
    usable = [(a, b) for a, b in merges if a in vocab and b in vocab and a + b in vocab]
    if len(usable) != len(merges):
        logger.warning(
            "ignoring %d GGUF merges that produce or use tokens outside the vocabulary",
            len(merges) - len(usable),
        )
    return usable


def _derive_spm_merges(
    tokens: Sequence[str], scores: Sequence[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies, best first.

    SentencePiece merges greedily by the score of the merged piece, so every split of a piece into
    two in-vocabulary halves becomes a merge ranked by that piece's score. Ties go to the longer
    left half, then the longer right half, then the lower piece id: the order transformers uses, so
    that both build the same BPE.
    """
    candidates: list[tuple[float, int, int, int, str, str]] = []
    for index, (token, score) in enumerate(zip(tokens, scores, strict=True)):
        if vocab[token] != index:
            continue  # a repeated spelling: its first id already contributed
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                candidates.append((-score, -len(left), -len(right), index, left, right))
    candidates.sort(key=lambda c: c[:4])
    return [(c[4], c[5]) for c in candidates]


def _token_types(metadata: dict[str, Any], num_tokens: int) -> list[int]:
    types = metadata.get("tokenizer.ggml.token_type")
    if types is None:
        return [_NORMAL] * num_tokens
    if len(types) != num_tokens:
        raise UnsupportedTokenizerError(f"GGUF token_type has {len(types)} entries for {num_tokens} tokens")
    return [int(t) for t in types]


def _optional_id(metadata: dict[str, Any], key: str, num_tokens: int) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    value = int(value)
    # Some converters write -1 / 0xFFFFFFFF for "none".
    return value if 0 <= value < num_tokens else None


def _template_processor(
    bos: tuple[str, int] | None, eos: tuple[str, int] | None
) -> processors.TemplateProcessing:
    """A post-processor that wraps each sequence in the BOS/EOS the model expects."""
    head = f"{bos[0]}:0 " if bos else ""
    tail = f" {eos[0]}:0" if eos else ""
    head_b = f" {bos[0]}:1" if bos else ""
    tail_b = f" {eos[0]}:1" if eos else ""
    special = [t for t in (bos, eos) if t is not None]
    return processors.TemplateProcessing(
        single=f"{head}$A:0{tail}",
        pair=f"{head}$A:0{tail}{head_b} $B:1{tail_b}",
        special_tokens=list(dict.fromkeys(special)),
    )


def _byte_level_backend(
    tokens: list[str], types: list[int], metadata: dict[str, Any], keep_literal: set[int]
) -> tuple[tokenizers.Tokenizer, list[str], dict[str, int]]:
    """Byte-level BPE ('gpt2' files): the backend, each id's vocabulary spelling, and the vocabulary."""
    pre_name = metadata.get("tokenizer.ggml.pre")
    spec = _PRE_TOKENIZERS.get(pre_name or "default")
    if spec is None:
        logger.warning("unknown GGUF pre-tokenizer %r; splitting text the GPT-2 way", pre_name)
        spec = _GPT2

    to_unicode = _byte_to_unicode()
    alphabet = set(to_unicode.values())
    spellings: list[str] = []
    for index, (token, token_type) in enumerate(zip(tokens, types, strict=True)):
        if (
            token_type in (_NORMAL, _UNUSED, _UNKNOWN)
            and index not in keep_literal
            and not set(token) <= alphabet
        ):
            # A vocabulary entry written as plain text: BPE only ever sees the byte alphabet, so
            # re-spell it there or it could never be produced.
            token = "".join(to_unicode[b] for b in token.encode("utf-8"))
        spellings.append(token)

    vocab = _vocab_dict(spellings)
    merges = _usable_merges(_split_merges(metadata.get("tokenizer.ggml.merges") or ()), vocab)
    model = BPE(
        vocab=vocab,
        merges=merges,
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=spec.ignore_merges,
    )
    backend = tokenizers.Tokenizer(model)
    backend.normalizer = None
    backend.pre_tokenizer = _byte_level_pre_tokenizer(spec)
    backend.decoder = decoders.ByteLevel()
    return backend, spellings, vocab


def _spm_backend(
    tokens: list[str], metadata: dict[str, Any], unk_id: int | None
) -> tuple[tokenizers.Tokenizer, list[str], dict[str, int]]:
    """SentencePiece-style BPE ('llama' files): ▁ for spaces, `<0xNN>` byte fallback."""
    scores = metadata.get("tokenizer.ggml.scores")
    vocab = _vocab_dict(tokens)
    if metadata.get("tokenizer.ggml.merges"):
        merges = _usable_merges(_split_merges(metadata["tokenizer.ggml.merges"]), vocab)
    elif scores is not None and len(scores) == len(tokens):
        merges = _derive_spm_merges(tokens, scores, vocab)
    else:
        raise UnsupportedTokenizerError("a 'llama' GGUF vocabulary needs tokenizer.ggml.scores or merges")

    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    model = BPE(
        vocab=vocab,
        merges=merges,
        dropout=None,
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = tokenizers.Tokenizer(model)
    # SentencePiece marks spaces with ▁ and (add_dummy_prefix) puts one before the text. Doing it
    # in the normalizer rather than a Metaspace pre-tokenizer repeats the prefix on every stretch of
    # text after a special token, as sentencepiece-trained models saw it and as llama.cpp and
    # Llama 2's own tokenizer.json do (so "<s>[INST]" gives "▁[", not "[").
    steps_in: list[normalizers.Normalizer] = [normalizers.Replace(" ", _SPM_SPACE)]
    if add_space_prefix:
        steps_in.insert(0, normalizers.Prepend(_SPM_SPACE))
    backend.normalizer = normalizers.Sequence(steps_in)
    backend.pre_tokenizer = None
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend, list(tokens), vocab


# ---------------------------------------------------------------------------------------------
# Per-token bytes, for logprobs.


def _bytes_byte_level(token: str) -> bytes:
    to_byte = _unicode_to_byte()
    try:
        return bytes(to_byte[ch] for ch in token)
    except KeyError:
        # Not in the byte alphabet: a token stored as plain text (added or user-defined).
        return token.encode("utf-8")


def _bytes_spm(token: str) -> bytes:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    return token.replace(_SPM_SPACE, " ").encode("utf-8")


def _bytes_wordpiece(token: str) -> bytes:
    return (token[2:] if token.startswith("##") else token).encode("utf-8")


def _bytes_plain(token: str) -> bytes:
    return token.encode("utf-8")


def _decoder_kind(backend: tokenizers.Tokenizer) -> str:
    """Which spelling scheme the vocabulary uses, read off the backend's decoder."""
    if backend.decoder is None:
        return "plain"
    state = json.loads(backend.decoder.__getstate__())
    kinds: set[str] = set()

    def walk(node: dict[str, Any]) -> None:
        kinds.add(node.get("type", ""))
        for child in node.get("decoders") or ():
            walk(child)

    walk(state)
    if "ByteLevel" in kinds:
        return "byte_level"
    if "ByteFallback" in kinds or "Metaspace" in kinds:
        return "spm"
    if "WordPiece" in kinds:
        return "wordpiece"
    return "plain"


_BYTES_BY_KIND = {
    "byte_level": _bytes_byte_level,
    "spm": _bytes_spm,
    "wordpiece": _bytes_wordpiece,
    "plain": _bytes_plain,
}


# ---------------------------------------------------------------------------------------------
# Hugging Face directory helpers.


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        value = json.load(f)
    return value if isinstance(value, dict) else {}


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config / special_tokens_map write it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _pick_chat_template(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        template = named.get("default")
        return template if isinstance(template, str) else None
    return None


_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """A model's tokenizer: a `tokenizers.Tokenizer` plus the facts around it Heron needs."""

    backend: tokenizers.Tokenizer
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    bos_token: str | None
    eos_token: str | None
    special_tokens: dict[str, str]
    all_special_ids: frozenset[int]
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None
    model_max_length: int | None

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: dict[str, str],
        add_bos_token: bool,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        model_max_length: int | None = None,
        special_token_ids: dict[str, int] | None = None,
        token_spellings: list[str] | None = None,
        bytes_kind: str | None = None,
    ) -> None:
        self.backend = backend
        self.special_tokens = dict(special_tokens)
        # GGUF files give ids outright; a lookup by spelling could land on a repeated spelling.
        known_ids = dict(special_token_ids or {})
        for name, token in special_tokens.items():
            if name not in known_ids and (found := backend.token_to_id(token)) is not None:
                known_ids[name] = found
        self.bos_token = special_tokens.get("bos_token")
        self.eos_token = special_tokens.get("eos_token")
        self.bos_token_id = known_ids.get("bos_token")
        self.eos_token_id = known_ids.get("eos_token")
        self.pad_token_id = known_ids.get("pad_token")
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.chat_template = chat_template
        self.model_max_length = model_max_length

        added = backend.get_added_tokens_decoder()
        self.all_special_ids = frozenset(
            {i for i, tok in added.items() if tok.special} | set(known_ids.values())
        )
        self._added_ids = frozenset(added)
        self.vocab_size = max(
            backend.get_vocab_size(with_added_tokens=True),
            len(token_spellings) if token_spellings else 0,
            max(added, default=-1) + 1,
        )
        self._token_spellings = token_spellings
        self._bytes_kind = bytes_kind or _decoder_kind(backend)
        self._id_to_token: list[str] | None = None
        self._id_to_bytes: list[bytes] | None = None

        # Special tokens are matched longest first, as the backend's own matcher does.
        self._special_added = {tok.content: tok for tok in added.values() if tok.special}
        spellings = sorted(self._special_added, key=len, reverse=True)
        self._special_pattern = re.compile("|".join(map(re.escape, spellings))) if spellings else None
        self._special_spellings = spellings
        self._special_index = {spelling: i for i, spelling in enumerate(spellings)}
        # Escape marks stand in for a client's special spellings while a chat template renders. The
        # private-use brackets survive what templates do to text (trim, tojson), and the random
        # part keeps a client from writing a mark, or a sentinel below, itself.
        self._mark_prefix = f"\ue000{secrets.token_hex(8)}"
        self._mark_pattern = re.compile(re.escape(self._mark_prefix) + r"(\d+)\ue001")
        self._plain: tuple[tokenizers.Tokenizer, dict[tuple, str], frozenset[int]] | None = None

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any]) -> Tokenizer:
        """Rebuild the tokenizer a GGUF file describes from its metadata."""
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not tokens:
            raise UnsupportedTokenizerError("GGUF metadata has no tokenizer.ggml.tokens")
        tokens = list(tokens)
        num_tokens = len(tokens)
        types = _token_types(metadata, num_tokens)
        kind = metadata.get("tokenizer.ggml.model")

        ids = {
            name: _optional_id(metadata, f"tokenizer.ggml.{key}", num_tokens)
            for name, key in (
                ("bos_token", "bos_token_id"),
                ("eos_token", "eos_token_id"),
                ("unk_token", "unknown_token_id"),
                ("pad_token", "padding_token_id"),
            )
        }

        if kind == "gpt2":
            # Named special tokens are matched as written, so they keep their literal spelling.
            named = {i for i in ids.values() if i is not None}
            backend, spellings, vocab = _byte_level_backend(tokens, types, metadata, named)
            spec = _PRE_TOKENIZERS.get(metadata.get("tokenizer.ggml.pre") or "default", _GPT2)
            default_add_bos = spec.default_add_bos
            bytes_kind = "byte_level"
        elif kind == "llama":
            backend, spellings, vocab = _spm_backend(tokens, metadata, ids["unk_token"])
            default_add_bos = True  # SentencePiece models are trained with BOS; llama.cpp adds it
            bytes_kind = "spm"
        else:
            raise UnsupportedTokenizerError(f"GGUF tokenizer model {kind!r} is not supported (gpt2, llama)")

        # Control tokens are matched whole and never split; llama.cpp matches user-defined ones
        # whole too, but they read back as ordinary text. Named special ids count as control.
        # A spelling listed twice is addressable only by its first id, so only that one is added.
        control_ids = sorted(
            {i for i, t in enumerate(types) if t == _CONTROL} | {i for i in ids.values() if i is not None}
        )
        control = [spellings[i] for i in control_ids if vocab[spellings[i]] == i]
        control_set = set(control)
        user_defined = [
            spellings[i]
            for i, t in enumerate(types)
            if t == _USER_DEFINED and spellings[i] not in control_set and vocab[spellings[i]] == i
        ]
        backend.add_special_tokens([_special_added_token(t) for t in control])
        if user_defined:
            backend.add_tokens([_plain_added_token(t) for t in user_defined])

        special_tokens = {name: tokens[i] for name, i in ids.items() if i is not None}
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", default_add_bos))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        bos = (
            (tokens[ids["bos_token"]], ids["bos_token"]) if add_bos and ids["bos_token"] is not None else None
        )
        eos = (
            (tokens[ids["eos_token"]], ids["eos_token"]) if add_eos and ids["eos_token"] is not None else None
        )
        backend.post_processor = _template_processor(bos, eos)

        return cls(
            backend,
            special_tokens=special_tokens,
            add_bos_token=bos is not None,
            add_eos_token=eos is not None,
            chat_template=metadata.get("tokenizer.chat_template"),
            model_max_length=None,
            special_token_ids={name: i for name, i in ids.items() if i is not None},
            token_spellings=spellings,
            bytes_kind=bytes_kind,
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` and its companions from a Hugging Face model directory."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise UnsupportedTokenizerError(f"{path} has no tokenizer.json")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        # tokenizer.json may carry training-time truncation/padding (MiniLM's pads every input to
        # 128); lengths are the engine's business.
        backend.no_truncation()
        backend.no_padding()

        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")

        # tokenizer_config.json may list added tokens tokenizer.json lacks.
        for index, entry in sorted(
            (config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])
        ):
            content = _token_content(entry)
            if content is None or backend.token_to_id(content) is not None:
                continue
            token = AddedToken(
                content,
                special=bool(entry.get("special", False)),
                normalized=bool(entry.get("normalized", not entry.get("special", False))),
                lstrip=bool(entry.get("lstrip", False)),
                rstrip=bool(entry.get("rstrip", False)),
                single_word=bool(entry.get("single_word", False)),
            )
            if token.special:
                backend.add_special_tokens([token])
            else:
                backend.add_tokens([token])
            if backend.token_to_id(content) != int(index):
                logger.warning(
                    "added token %r got id %s, tokenizer_config.json says %s",
                    content,
                    backend.token_to_id(content),
                    index,
                )

        special_tokens: dict[str, str] = {}
        for name in _NAMED_SPECIALS:
            content = _token_content(config.get(name)) or _token_content(special_map.get(name))
            if content is not None:
                special_tokens[name] = content
        extra = config.get("additional_special_tokens") or special_map.get("additional_special_tokens") or []
        extra_contents = [c for c in (_token_content(t) for t in extra) if c is not None]

        # Named special tokens must be matched whole even when tokenizer.json only has them as
        # ordinary vocabulary entries.
        added_special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        to_add = [c for c in (*special_tokens.values(), *extra_contents) if c not in added_special]
        if to_add:
            backend.add_special_tokens([_special_added_token(c) for c in dict.fromkeys(to_add)])

        bos_token, eos_token = special_tokens.get("bos_token"), special_tokens.get("eos_token")
        if backend.post_processor is None and ("add_bos_token" in config or "add_eos_token" in config):
            # tokenizer.json's own post-processor, when it has one, is the pipeline (transformers 5
            # reads it the same way); only without one do the config's flags say what to add.
            want_bos, want_eos = bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
            bos_id = backend.token_to_id(bos_token) if want_bos and bos_token else None
            eos_id = backend.token_to_id(eos_token) if want_eos and eos_token else None
            bos = (bos_token, bos_id) if bos_token and bos_id is not None else None
            eos = (eos_token, eos_id) if eos_token and eos_id is not None else None
            backend.post_processor = _template_processor(bos, eos)
            add_bos, add_eos = bos is not None, eos is not None
        else:
            add_bos, add_eos = _post_processor_adds(backend, bos_token, eos_token)

        chat_template = None
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            chat_template = jinja_file.read_text(encoding="utf-8")
        if chat_template is None:
            chat_template = _pick_chat_template(config.get("chat_template"))
        if chat_template is None:
            chat_template = _pick_chat_template(_read_json(path / "chat_template.json").get("chat_template"))

        max_length = config.get("model_max_length")
        # transformers writes a huge sentinel (1e30) when the length is unknown.
        model_max_length = (
            int(max_length) if isinstance(max_length, (int, float)) and max_length < 1e9 else None
        )

        return cls(
            backend,
            special_tokens=special_tokens,
            add_bos_token=add_bos,
            add_eos_token=add_eos,
            chat_template=chat_template,
            model_max_length=model_max_length,
        )

    # -- the hot path --------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True, *, parse_special: bool = True) -> list[int]:
        """Token ids for `text`. With `parse_special`, special tokens written in the text are control
        tokens; without, their spellings are tokenized as plain text. `add_special_tokens` only
        controls the BOS/EOS (or CLS/SEP) the post-processor adds."""
        if parse_special or not self.spells_special(text):
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self._plain_backend()[0].encode(text, add_special_tokens=add_special_tokens).ids

    def spells_special(self, text: str) -> bool:
        """Whether `text` contains the spelling of a special token."""
        return self._special_pattern is not None and self._special_pattern.search(text) is not None

    def escape_special(self, text: str) -> str:
        """`text` with every special token's spelling replaced by a mark that `encode_rendered`
        tokenizes as that spelling in plain text. Text without one comes back unchanged."""
        if not self.spells_special(text):
            return text
        index = self._special_index
        return self._special_pattern.sub(lambda m: f"{self._mark_prefix}{index[m.group()]}\ue001", text)

    def encode_rendered(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids for a rendered prompt: the special tokens written in `text` are control tokens,
        the marks `escape_special` left are their spellings as plain text. Without marks this is
        exactly `encode(text)`."""
        if self._mark_prefix not in text:
            return self.encode(text, add_special_tokens)
        plain, sentinels, sentinel_ids = self._plain_backend()
        # One call to a backend that does not match special tokens, with each control token of
        # the template swapped for a sentinel added token of the same strip/normalize flags: the
        # text is split exactly where the real backend splits it (a segment-by-segment encode
        # would give SentencePiece models a word-start marker after every control token).
        control_ids: list[int] = []

        def to_sentinel(match: re.Match) -> str:
            token = self._special_added[match.group()]
            control_ids.append(self.backend.token_to_id(token.content))
            return sentinels[_added_flags(token)]

        swapped = self._special_pattern.sub(to_sentinel, text)
        spelled = self._mark_pattern.sub(lambda m: self._special_spellings[int(m.group(1))], swapped)
        ids = plain.encode(spelled, add_special_tokens=add_special_tokens).ids
        controls = iter(control_ids)
        out = [next(controls) if i in sentinel_ids else i for i in ids]
        if next(controls, None) is not None:
            raise ValueError("a rendered prompt lost a control token while encoding")
        return out

    def _plain_backend(self) -> tuple[tokenizers.Tokenizer, dict[tuple, str], frozenset[int]]:
        """A copy of the backend that tokenizes special spellings as text, with one sentinel
        added token per kind of special token; built on first use (~0.15 s for a 50k vocab)."""
        if self._plain is None:
            plain = tokenizers.Tokenizer.from_str(self.backend.to_str())
            plain.encode_special_tokens = True
            sentinels: dict[tuple, str] = {}
            for token in self._special_added.values():
                flags = _added_flags(token)
                if flags not in sentinels:
                    sentinels[flags] = f"\ue000{secrets.token_hex(8)}\ue001"
                    lstrip, rstrip, single_word, normalized = flags
                    plain.add_tokens(
                        [AddedToken(sentinels[flags], special=False, lstrip=lstrip, rstrip=rstrip,
                                    single_word=single_word, normalized=normalized)]
                    )
            sentinel_ids = frozenset(plain.token_to_id(s) for s in sentinels.values())
            self._plain = (plain, sentinels, sentinel_ids)
        return self._plain

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    # -- per-token views -----------------------------------------------------------------------

    def _tokens_by_id(self) -> list[str]:
        if self._id_to_token is None:
            table = [""] * self.vocab_size
            if self._token_spellings is not None:
                table[: len(self._token_spellings)] = self._token_spellings
            for token, index in self.backend.get_vocab(with_added_tokens=True).items():
                table[index] = token
            self._id_to_token = table
        return self._id_to_token

    def convert_ids_to_tokens(self, token_ids: Iterable[int]) -> list[str]:
        """Vocabulary spellings (e.g. 'Ġhello', '▁hello'); '' for ids past the vocabulary, which a
        model whose embedding table is padded can still sample."""
        table = self._tokens_by_id()
        size = len(table)
        return [table[i] if 0 <= i < size else "" for i in token_ids]

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes `token_id` stands for: byte-level spellings mapped back to bytes, `▁` to a
        space, `<0xNN>` to that byte; added and special tokens as their UTF-8 text. A token may be
        part of a multi-byte character, so these bytes need not be valid UTF-8 on their own."""
        table = self._id_to_bytes
        if table is None:
            table = self._id_to_bytes = self._build_bytes_table()
        return table[token_id] if 0 <= token_id < len(table) else b""

    def _build_bytes_table(self) -> list[bytes]:
        spell = _BYTES_BY_KIND[self._bytes_kind]
        added = self._added_ids
        return [
            token.encode("utf-8") if index in added else spell(token)
            for index, token in enumerate(self._tokens_by_id())
        ]

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"add_bos_token={self.add_bos_token})"
        )


def _added_flags(token: AddedToken) -> tuple[bool, bool, bool, bool]:
    return (token.lstrip, token.rstrip, token.single_word, token.normalized)


def _post_processor_adds(
    backend: tokenizers.Tokenizer, bos: str | None, eos: str | None
) -> tuple[bool, bool]:
    """Whether tokenizer.json's own post-processor puts BOS first / EOS last."""
    bos_id = backend.token_to_id(bos) if bos else None
    eos_id = backend.token_to_id(eos) if eos else None
    with_specials = backend.encode("a", add_special_tokens=True).ids
    without = backend.encode("a", add_special_tokens=False).ids
    if len(with_specials) == len(without):
        return False, False
    adds_bos = (
        bos_id is not None
        and bool(with_specials)
        and with_specials[0] == bos_id
        and (not without or without[0] != bos_id)
    )
    adds_eos = (
        eos_id is not None
        and bool(with_specials)
        and with_specials[-1] == eos_id
        and (not without or without[-1] != eos_id)
    )
    return adds_bos, adds_eos
