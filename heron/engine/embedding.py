"""The encoder path: token ids in, one pooled float32 vector per input out.

`EmbeddingEngine` owns a loaded encoder model (BERT) with its tokenizer and sentence-transformers
pooling pipeline. `tokenize()` turns strings into ids with the model's special tokens (as
sentence-transformers does); `embed()` validates and truncates token-id inputs, runs them through
the encoder in length-sorted, token-bounded batches (padding-free: see `heron.models.bert`), pools,
normalises and applies Matryoshka `dimensions`, and returns one `EmbeddingOutput` per input, in
input order.

`AsyncEmbeddingEngine` is its asyncio face for the HTTP layer: one dedicated thread (the same
heron.engine.driver that runs the generation engine: lifecycle, queue, death) runs every forward,
so the event loop never stalls on torch, and inputs of requests that arrive while a batch runs are
merged into the next batch (micro-batching), up to `max_batch_tokens` tokens per forward.

Truncation follows vLLM's `truncate_prompt_tokens`: None rejects an over-long input
(`EmbeddingInputError`, a ValueError meant for a 400, like every input problem here), -1 truncates
to the model's maximum, k keeps the last k tokens. For strings the special tokens survive
truncation ([CLS] ... [SEP]), as a Hugging Face tokenizer with `truncation=True` does; token-id
inputs are cut as given.

Scores (/v1/rerank, /v1/score) run on the same engine, as vLLM computes them: `tokenize_score()`
pairs `text_1` with `text_2` (1:1, 1:N or N:N) into `ScoreInputs`, and `score()` turns their
encoder rows into one float per pair. An embedding model embeds every text once (a 1:N query
once) and scores a pair by the cosine of its two vectors. A cross-encoder
(BertForSequenceClassification) reads each pair as one sequence, `[CLS] a [SEP] b [SEP]` with
token types 0 then 1 as the Hugging Face tokenizer makes it, and scores it by its logit passed
through the model's activation: sigmoid for one label unless config.json names another
(`sentence_transformers.activation_fn`), as vLLM does; `use_activation=False` gives the raw
logit. Over-long pairs follow the same `truncate_prompt_tokens` rule, cut the way vLLM's call of
the Hugging Face tokenizer cuts them (`longest_first`, from the right).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tokenizers
import torch
import torch.nn.functional as F

from heron.engine.driver import EngineDriver, call_in_loop
from heron.engine.errors import EngineDeadError
from heron.models.bundled import default_embedding_model_path
from heron.models.loader import LoadedModel, load_model
from heron.models.pooling import Pooler, PoolingConfig
from heron.outputs import EmbeddingOutput

logger = logging.getLogger(__name__)

# Tokens per encoder forward. On the bundled MiniLM (2 CPU cores, fp32, 64 inputs of 10-250
# tokens) the forward is GEMM-bound and its speed is flat from about 2k tokens per forward up
# (best of 4 runs on a busy machine: 512 -> 2.8 s, 1024 -> 2.4, 2048 -> 2.1, 4096 -> 2.25,
# 16384 -> 2.35), while activation memory and the wait of a request queued behind a batch grow
# with it.
DEFAULT_MAX_BATCH_TOKENS = 4096

TruncationSide = Literal["left", "right"]

# Truncating tokenizer copies kept for cross-encoder pairs (one per truncate_prompt_tokens value).
_MAX_PAIR_TRUNCATORS = 4


class EmbeddingInputError(ValueError):
    """A request the engine cannot embed as asked: an HTTP 400. `param` names the request field at
    fault (`input`, `truncate_prompt_tokens` or `dimensions`); the message says why, with numbers."""

    def __init__(self, message: str, param: str = "input"):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ScoreInputs:
    """A score request, tokenized: the encoder inputs it runs and how their rows pair up.

    Cross-encoder: input j is pair j, and `segment_starts[j]` is where its second text (token type
    1) begins. Embedding model: the first `num_queries` inputs are text_1's (1, or one per pair),
    the next `num_pairs` text_2's; `segment_starts` is None.
    """

    token_ids: list[list[int]]
    segment_starts: list[int] | None
    num_pairs: int
    num_queries: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        """The tokens the encoder runs (a 1:N query once on an embedding model)."""
        return sum(len(ids) for ids in self.token_ids)


# Cross-encoder activations by the torch.nn class a config names (vLLM reads the same keys). With
# one label, Softmax means sigmoid to vLLM (its PoolerClassify), so it does here.
_ACTIVATIONS = {
    "Sigmoid": torch.sigmoid,
    "Softmax": torch.sigmoid,
    "Identity": lambda logits: logits,
    "Tanh": torch.tanh,
}


def _read_score_activation(hf_config: dict) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The activation a cross-encoder's config asks for: sentence-transformers writes
    `sentence_transformers.activation_fn` (older versions `sbert_ce_default_activation_function`);
    without either, sigmoid (one label), as vLLM and sentence-transformers' CrossEncoder apply."""
    st = hf_config.get("sentence_transformers")
    name = st.get("activation_fn") if isinstance(st, dict) else None
    name = name or hf_config.get("sbert_ce_default_activation_function") or "torch.nn.modules.activation.Sigmoid"
    short = str(name).rsplit(".", 1)[-1]
    if not str(name).startswith("torch.nn.modules.") or short not in _ACTIVATIONS:
        raise ValueError(
            f"cross-encoder activation {name!r} is not supported; Heron applies one of "
            f"{', '.join('torch.nn.' + n for n in _ACTIVATIONS)}"
        )
    return short, _ACTIVATIONS[short]


class EmbeddingEngine:
    """A loaded encoder model that turns token-id inputs into embeddings, or text pairs into
    scores, synchronously."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        pooling: PoolingConfig | None = None,
        max_model_len: int | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    ):
        if not loaded.is_embedding:
            raise ValueError(f"{loaded.source} is not an embedding model")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.pooling = pooling or PoolingConfig.from_sentence_transformers_dir(loaded.source)
        self.pooler = Pooler(self.pooling)
        self.max_batch_tokens = max_batch_tokens

        # The model's limit is its position table; a sentence-transformers max_seq_length (256 for
        # MiniLM, whose table has 512) is the length it was trained and is served at, as vLLM does.
        position_limit = self.model.max_position_embeddings
        if max_model_len is not None:
            if not 0 < max_model_len <= position_limit:
                raise ValueError(
                    f"max_model_len {max_model_len} must be between 1 and the model's "
                    f"max_position_embeddings {position_limit}"
                )
        else:
            max_model_len = min(position_limit, self.pooling.max_seq_length or position_limit)
        self.max_model_len = max_model_len
        self.hidden_size = self.model.hidden_size
        self.vocab_size = self.model.arch.vocab_size
        self.is_cross_encoder = loaded.is_cross_encoder
        # Width of one encoder output row: a pooled vector, or a cross-encoder's logits.
        self.output_size = self.model.num_labels if self.is_cross_encoder else self.hidden_size
        self.score_activation_name, self._score_activation = (
            _read_score_activation(loaded.hf_config or {}) if self.is_cross_encoder else ("cosine", None)
        )
        # Pair truncation needs the tokenizer's own longest_first cut (vLLM's), which the Rust
        # tokenizer applies only as a setting: truncating copies for the lengths last asked.
        self._pair_truncators: OrderedDict[int, tokenizers.Tokenizer] = OrderedDict()
        self._pair_truncators_lock = threading.Lock()

        hf_config = loaded.hf_config or {}
        # Matryoshka models say so in config.json, as vLLM reads it: a list of the dimensions they
        # were trained to truncate to, or a flag meaning any prefix works.
        dims = hf_config.get("matryoshka_dimensions")
        self.matryoshka_dimensions: tuple[int, ...] | None = tuple(int(d) for d in dims) if dims else None
        self.is_matryoshka = bool(hf_config.get("is_matryoshka")) or self.matryoshka_dimensions is not None
        self._num_special_tokens = self.tokenizer.backend.num_special_tokens_to_add(False)
        self._num_pair_special_tokens = self.tokenizer.backend.num_special_tokens_to_add(True)

    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        progress: bool = False,
        **kwargs,
    ) -> EmbeddingEngine:
        """Load an encoder directory (None: the bundled all-MiniLM-L6-v2) and wrap it."""
        path = default_embedding_model_path() if model is None else model
        return cls(load_model(path, dtype=dtype, device=device, progress=progress), **kwargs)

    # ----------------------------------------------------------------- input preparation

    def tokenize(
        self,
        texts: Sequence[str],
        truncate_prompt_tokens: int | None = None,
        truncation_side: TruncationSide = "left",
    ) -> list[list[int]]:
        """Token ids of each text, with the model's special tokens, truncated as asked.

        Truncation keeps the special tokens and cuts the text between them: "left" (vLLM's
        `truncate_prompt_tokens`) keeps the end of the text, "right" (sentence-transformers) its
        start. Without truncation an over-long text comes back whole; `embed` rejects it.
        """
        limit = self._truncation_limit(truncate_prompt_tokens)
        encodings = self.tokenizer.backend.encode_batch_fast(list(texts), add_special_tokens=True)
        ids = [e.ids for e in encodings]
        if limit is None:
            return ids
        room = limit - self._num_special_tokens
        if room < 1:
            raise EmbeddingInputError(
                f"truncate_prompt_tokens {truncate_prompt_tokens} leaves no room for text beside "
                f"the model's {self._num_special_tokens} special tokens",
                param="truncate_prompt_tokens",
            )
        backend = self.tokenizer.backend
        for i, token_ids in enumerate(ids):
            if len(token_ids) > limit:
                # Rare (only over-long texts): re-encode without special tokens, cut, then let the
                # tokenizer's own post-processor put them back.
                bare = backend.encode(texts[i], add_special_tokens=False)
                bare.truncate(room, direction="left" if truncation_side == "left" else "right")
                ids[i] = backend.post_process(bare, add_special_tokens=True).ids
        return ids

    def _truncation_limit(self, truncate_prompt_tokens: int | None) -> int | None:
        if truncate_prompt_tokens is None:
            return None
        if truncate_prompt_tokens == -1:
            return self.max_model_len
        if truncate_prompt_tokens < 1:
            raise EmbeddingInputError(
                f"truncate_prompt_tokens must be -1 (the model's maximum) or a positive count, "
                f"got {truncate_prompt_tokens}",
                param="truncate_prompt_tokens",
            )
        if truncate_prompt_tokens > self.max_model_len:
            raise EmbeddingInputError(
                f"truncate_prompt_tokens {truncate_prompt_tokens} is greater than this model's "
                f"maximum input length of {self.max_model_len} tokens",
                param="truncate_prompt_tokens",
            )
        return truncate_prompt_tokens

    def check_dimensions(self, dimensions: int | None) -> None:
        # The full size is always fine: some clients send `dimensions` on every request.
        if dimensions is None or dimensions == self.hidden_size:
            return
        if not self.is_matryoshka:
            raise EmbeddingInputError(
                f"this model does not support 'dimensions' other than its full size "
                f"{self.hidden_size} (it was not trained for Matryoshka truncation)",
                param="dimensions",
            )
        if self.matryoshka_dimensions is not None:
            if dimensions not in self.matryoshka_dimensions:
                raise EmbeddingInputError(
                    f"dimensions {dimensions} is not supported by this model; "
                    f"choose one of {list(self.matryoshka_dimensions)}",
                    param="dimensions",
                )
        elif not 1 <= dimensions <= self.hidden_size:
            raise EmbeddingInputError(
                f"dimensions must be between 1 and {self.hidden_size}, got {dimensions}",
                param="dimensions",
            )

    def prepare(
        self,
        inputs: Sequence[Sequence[int]],
        truncate_prompt_tokens: int | None = None,
        dimensions: int | None = None,
    ) -> list[list[int]]:
        """Validate token-id inputs and apply truncation; raises EmbeddingInputError naming the
        culprit.

        Cheap (Python over the ids), so the async engine runs it on the caller's side and a bad
        request fails at once instead of after the batch ahead of it.
        """
        if self.is_cross_encoder:
            raise EmbeddingInputError(
                "this model is a cross-encoder: it scores text pairs (/v1/rerank, /v1/score) and does not embed",
                param="model",
            )
        if not inputs:
            raise EmbeddingInputError("input must not be empty", param="input")
        self.check_dimensions(dimensions)
        limit = self._truncation_limit(truncate_prompt_tokens)
        prepared: list[list[int]] = []
        for index, token_ids in enumerate(inputs):
            token_ids = list(token_ids)
            if not token_ids:
                raise EmbeddingInputError(
                    f"input {index} is empty; every input needs at least one token", param="input"
                )
            if limit is not None and len(token_ids) > limit:
                token_ids = token_ids[-limit:]  # vLLM keeps the last k tokens
            elif len(token_ids) > self.max_model_len:
                raise EmbeddingInputError(
                    f"this model's maximum input length is {self.max_model_len} tokens, but input "
                    f"{index} has {len(token_ids)} tokens; shorten it or set truncate_prompt_tokens",
                    param="input",
                )
            low, high = min(token_ids), max(token_ids)
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise EmbeddingInputError(
                    f"input {index} has token id {bad}, outside this model's vocabulary "
                    f"of {self.vocab_size} tokens",
                    param="input",
                )
            prepared.append(token_ids)
        return prepared

    # ----------------------------------------------------------------- encoding

    def embed(
        self,
        inputs: Sequence[Sequence[int]],
        truncate_prompt_tokens: int | None = None,
        dimensions: int | None = None,
        request_id: str = "",
    ) -> list[EmbeddingOutput]:
        """Embed token-id inputs; output i belongs to input i."""
        token_ids = self.prepare(inputs, truncate_prompt_tokens, dimensions)
        vectors = torch.empty(len(token_ids), self.hidden_size, dtype=torch.float32)
        for batch in self.plan_batches([len(ids) for ids in token_ids]):
            vectors[batch] = self.encode([token_ids[i] for i in batch])
        return self.outputs(vectors, token_ids, dimensions, request_id)

    def plan_batches(self, seq_lens: Sequence[int], budget: int | None = None) -> list[list[int]]:
        """Input indices, longest first, cut into batches of at most `budget` tokens.

        Sorting keeps each batch's lengths close, so its attention buckets pad little; a single
        input longer than the budget still gets a batch of its own.
        """
        budget = budget or self.max_batch_tokens
        batches: list[list[int]] = []
        num_tokens = budget + 1
        for i in sorted(range(len(seq_lens)), key=lambda i: -seq_lens[i]):
            if num_tokens + seq_lens[i] > budget:
                batches.append([])
                num_tokens = 0
            batches[-1].append(i)
            num_tokens += seq_lens[i]
        return batches

    @torch.inference_mode()
    def encode(
        self, token_ids: Sequence[list[int]], segment_starts: Sequence[int] | None = None
    ) -> torch.Tensor:
        """One forward over already prepared inputs -> `[num_inputs, output_size]` float32 on the
        CPU: pooled and normalised as the model's pipeline says, or a cross-encoder's logits.
        `segment_starts[i]`: where input i's token type 1 begins (None: all type 0)."""
        seq_lens = [len(ids) for ids in token_ids]
        lens = torch.tensor(seq_lens)
        num_tokens = int(lens.sum())
        input_ids = torch.tensor(list(itertools.chain.from_iterable(token_ids)), dtype=torch.long)
        # Position of each token within its own sequence, built without a per-sequence loop.
        starts = torch.cumsum(lens, 0) - lens
        positions = torch.arange(num_tokens) - torch.repeat_interleave(starts, lens, output_size=num_tokens)
        device = self.device
        token_type_ids = None
        if segment_starts is not None and self.model.arch.type_vocab_size > 1:
            split = torch.repeat_interleave(torch.tensor(list(segment_starts)), lens, output_size=num_tokens)
            token_type_ids = (positions >= split).long().to(device)
        hidden = self.model(input_ids.to(device), positions.to(device), seq_lens, token_type_ids)
        if self.is_cross_encoder:
            return self.model.classify(hidden, seq_lens).float().cpu()
        return self.pooler(hidden, seq_lens).float().cpu()

    def outputs(
        self,
        vectors: torch.Tensor,
        token_ids: Sequence[list[int]],
        dimensions: int | None,
        request_id: str,
    ) -> list[EmbeddingOutput]:
        if dimensions is not None and dimensions < vectors.shape[1]:
            vectors = vectors[:, :dimensions]
            if self.pooling.normalize:
                # A Matryoshka prefix of a unit vector is not one; the model promised unit vectors.
                vectors = F.normalize(vectors, p=2.0, dim=-1)
        # One tolist() for the whole batch: Python floats are what both response encodings start
        # from (JSON numbers directly; base64 via one float32 array per row).
        rows = vectors.tolist()
        return [
            EmbeddingOutput(request_id=request_id, embedding=row, num_prompt_tokens=len(ids))
            for row, ids in zip(rows, token_ids, strict=True)
        ]


    # ----------------------------------------------------------------- scores

    def tokenize_score(
        self,
        text_1: Sequence[str],
        text_2: Sequence[str],
        truncate_prompt_tokens: int | None = None,
        params: tuple[str, str] = ("text_1", "text_2"),
    ) -> ScoreInputs:
        """Tokenize a score request: text_1[0] with every text_2 (1:N), or text_1[j] with text_2[j]
        (N:N). `params` name the two fields in errors (rerank calls them query and documents)."""
        num_1, num_2 = len(text_1), len(text_2)
        if num_1 == 0 or num_2 == 0:
            raise EmbeddingInputError(f"{params[0] if num_1 == 0 else params[1]} must not be empty",
                                      param=params[0] if num_1 == 0 else params[1])
        if num_1 > 1 and num_1 != num_2:
            raise EmbeddingInputError(
                f"{params[0]} has {num_1} texts and {params[1]} has {num_2}: pair one {params[0]} with "
                f"any number of {params[1]} (1:N), or give as many of each (N:N)",
                param=params[1],
            )
        limit = self._truncation_limit(truncate_prompt_tokens)
        if not self.is_cross_encoder:
            token_ids = self.tokenize([*text_1, *text_2], truncate_prompt_tokens, truncation_side="right")
            for index, ids in enumerate(token_ids):
                param, i = (params[0], index) if index < num_1 else (params[1], index - num_1)
                if len(ids) > self.max_model_len:
                    raise EmbeddingInputError(
                        f"this model's maximum input length is {self.max_model_len} tokens, but "
                        f"{param}[{i}] has {len(ids)} tokens; shorten it or set truncate_prompt_tokens",
                        param=param,
                    )
                self._check_vocabulary(ids, param)
            return ScoreInputs(token_ids, None, num_pairs=num_2, num_queries=num_1)

        queries = list(text_1) if num_1 > 1 else [text_1[0]] * num_2
        if limit is not None and limit - self._num_pair_special_tokens < 2:
            raise EmbeddingInputError(
                f"truncate_prompt_tokens {truncate_prompt_tokens} leaves no room for both texts of a "
                f"pair beside the model's {self._num_pair_special_tokens} special tokens",
                param="truncate_prompt_tokens",
            )
        backend = self.tokenizer.backend if limit is None else self._pair_truncator(limit)
        encodings = backend.encode_batch_fast(list(zip(queries, text_2)), add_special_tokens=True)
        token_ids: list[list[int]] = []
        segment_starts: list[int] = []
        for j, encoding in enumerate(encodings):
            ids = encoding.ids
            if len(ids) > self.max_model_len:
                first = f"{params[0]}[{j}]" if num_1 > 1 else params[0]
                raise EmbeddingInputError(
                    f"this model's maximum input length is {self.max_model_len} tokens, but the pair of "
                    f"{first} and {params[1]}[{j}] has {len(ids)} tokens; shorten it or set "
                    "truncate_prompt_tokens",
                    param=params[1],
                )
            self._check_vocabulary(ids, params[1])
            type_ids = encoding.type_ids
            # The pair template types [CLS] a [SEP] 0 and b [SEP] 1: where the 1s start.
            segment_starts.append(type_ids.index(1) if 1 in type_ids else len(type_ids))
            token_ids.append(ids)
        return ScoreInputs(token_ids, segment_starts, num_pairs=num_2)

    def _check_vocabulary(self, ids: list[int], param: str) -> None:
        # A tokenizer bigger than the model's embedding table is a broken checkpoint; an id past
        # the table would be a device-side assert on CUDA, which poisons the whole process.
        if ids and max(ids) >= self.vocab_size:
            raise EmbeddingInputError(
                f"the tokenizer gave token id {max(ids)}, outside this model's vocabulary of "
                f"{self.vocab_size} tokens",
                param=param,
            )

    def _pair_truncator(self, max_length: int) -> tokenizers.Tokenizer:
        with self._pair_truncators_lock:
            truncator = self._pair_truncators.get(max_length)
            if truncator is None:
                # A copy takes ~10 ms and a few MB: a few are kept (-1, the model's maximum, is the
                # usual ask), so clients cycling through lengths cannot pile them up.
                truncator = tokenizers.Tokenizer.from_str(self.tokenizer.backend.to_str())
                truncator.enable_truncation(max_length, strategy="longest_first", direction="right")
                self._pair_truncators[max_length] = truncator
                while len(self._pair_truncators) > _MAX_PAIR_TRUNCATORS:
                    self._pair_truncators.popitem(last=False)
            self._pair_truncators.move_to_end(max_length)
            return truncator

    def score(self, inputs: ScoreInputs, use_activation: bool | None = None) -> list[float]:
        """One score per pair, in pair order (the synchronous path; the server uses the async one)."""
        token_ids, starts = inputs.token_ids, inputs.segment_starts
        rows = torch.empty(len(token_ids), self.output_size, dtype=torch.float32)
        for batch in self.plan_batches([len(ids) for ids in token_ids]):
            rows[batch] = self.encode(
                [token_ids[i] for i in batch], None if starts is None else [starts[i] for i in batch]
            )
        return self.pair_scores(rows, inputs, use_activation)

    def pair_scores(self, rows: torch.Tensor, inputs: ScoreInputs, use_activation: bool | None = None) -> list[float]:
        """Encoder output rows of `inputs` -> one score per pair.

        Cross-encoder: the logit, through the model's activation unless `use_activation` is False.
        Embedding model: the cosine similarity of the pair's two vectors (`use_activation` does not
        apply).
        """
        if self.is_cross_encoder:
            logits = rows[:, 0]
            if use_activation is not False:
                logits = self._score_activation(logits)
            return logits.tolist()
        queries, documents = rows[: inputs.num_queries], rows[inputs.num_queries :]
        if inputs.num_queries == 1:
            queries = queries.expand_as(documents)
        return F.cosine_similarity(queries.double(), documents.double(), dim=-1).tolist()


# ------------------------------------------------------------------------------------------------
# Async micro-batching.


@dataclass(frozen=True)
class EmbeddingStats:
    """Counters the worker thread publishes after every batch (a whole snapshot, never torn)."""

    num_batches: int = 0
    num_inputs: int = 0
    num_tokens: int = 0
    num_waiting_requests: int = 0


@dataclass(eq=False)
class _Job:
    """One request on its way through the worker: prepared inputs and where its rows land."""

    token_ids: list[list[int]]
    # Rows of every input, once all are encoded -> what the caller gets (EmbeddingOutputs, scores).
    finish: Callable[[torch.Tensor], object]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    order: list[int]  # input indices, longest first: the order the worker takes them in
    vectors: torch.Tensor
    segment_starts: list[int] | None = None  # cross-encoder pairs: where token type 1 begins
    next: int = 0  # how many of `order` have been handed to a batch
    num_done: int = 0
    # Set from the event loop when the caller goes away; the worker then skips what is left.
    cancelled: bool = False

    @property
    def num_left(self) -> int:
        return len(self.order) - self.next


def _settle(future: asyncio.Future, result: object) -> None:
    """Runs on the job's event loop. A caller that was cancelled meanwhile no longer wants it."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class AsyncEmbeddingEngine:
    """Runs an EmbeddingEngine on its own thread and merges concurrent requests into batches.

    Each batch takes inputs first-come first-served (a request's own inputs longest first) until
    `max_batch_tokens` is reached; a request bigger than that spans several batches, and requests
    that arrive meanwhile join the batches after it. Validation (lengths, ids, truncation,
    dimensions) runs in `embed()` on the caller's side, so bad input raises ValueError at once.
    A failed forward fails the requests in it and the worker goes on; a failure outside one kills
    the worker: every request waiting, and every later one, gets EngineDeadError (`dead_error`).
    """

    def __init__(self, engine: EmbeddingEngine, max_batch_tokens: int | None = None):
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens or engine.max_batch_tokens
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be positive, got {self.max_batch_tokens}")
        self._driver: EngineDriver[_Job] = EngineDriver(
            thread_name="heron-embedding",
            engine_name="the embedding engine",
            owner="AsyncEmbeddingEngine",
            serve=self._serve,
            fail=self._fail_all,
            refuse=self._deliver,
        )
        self._stats = EmbeddingStats()
        # Touched only by the worker thread: requests with inputs still to embed, oldest first.
        self._pending: deque[_Job] = deque()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the worker thread (idempotent); EngineDeadError after shutdown."""
        self._driver.start()

    async def shutdown(self) -> None:
        """Stop the worker; requests still waiting fail with EngineDeadError."""
        self._driver.close()
        await self._driver.join()  # the worker may be mid-batch

    async def __aenter__(self) -> AsyncEmbeddingEngine:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    @property
    def stats(self) -> EmbeddingStats:
        return self._stats

    @property
    def is_running(self) -> bool:
        """Started, not shut down and not dead."""
        return self._driver.is_running

    @property
    def dead_error(self) -> BaseException | None:
        """The exception that killed the worker loop, if it died."""
        return self._driver.dead_error

    # ----------------------------------------------------------------- requests

    async def tokenize(
        self,
        texts: Sequence[str],
        truncate_prompt_tokens: int | None = None,
        truncation_side: TruncationSide = "left",
    ) -> list[list[int]]:
        """`EmbeddingEngine.tokenize` off the event loop (a long input list takes milliseconds)."""
        return await asyncio.get_running_loop().run_in_executor(
            None, self.engine.tokenize, list(texts), truncate_prompt_tokens, truncation_side
        )

    async def embed(
        self,
        inputs: Sequence[Sequence[int]],
        truncate_prompt_tokens: int | None = None,
        dimensions: int | None = None,
        request_id: str = "",
    ) -> list[EmbeddingOutput]:
        """Embed token-id inputs; output i belongs to input i. Raises ValueError on bad input."""
        token_ids = self.engine.prepare(inputs, truncate_prompt_tokens, dimensions)
        engine = self.engine
        return await self._run(
            token_ids, None, lambda rows: engine.outputs(rows, token_ids, dimensions, request_id)
        )

    async def tokenize_score(
        self,
        text_1: Sequence[str],
        text_2: Sequence[str],
        truncate_prompt_tokens: int | None = None,
        params: tuple[str, str] = ("text_1", "text_2"),
    ) -> ScoreInputs:
        """`EmbeddingEngine.tokenize_score` off the event loop; raises EmbeddingInputError."""
        return await asyncio.get_running_loop().run_in_executor(
            None, self.engine.tokenize_score, list(text_1), list(text_2), truncate_prompt_tokens, params
        )

    async def score(self, inputs: ScoreInputs, use_activation: bool | None = None) -> list[float]:
        """One score per pair of `inputs`, its forwards micro-batched with everyone else's."""
        engine = self.engine
        return await self._run(
            inputs.token_ids, inputs.segment_starts, lambda rows: engine.pair_scores(rows, inputs, use_activation)
        )

    async def _run(
        self,
        token_ids: list[list[int]],
        segment_starts: list[int] | None,
        finish: Callable[[torch.Tensor], object],
    ) -> object:
        loop = asyncio.get_running_loop()
        job = _Job(
            token_ids=token_ids,
            finish=finish,
            loop=loop,
            future=loop.create_future(),
            order=sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i])),
            vectors=torch.empty(len(token_ids), self.engine.output_size, dtype=torch.float32),
            segment_starts=segment_starts,
        )
        self._driver.submit(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True  # the worker drops its remaining inputs
            raise

    # ----------------------------------------------------------------- worker thread

    def _serve(self) -> None:
        pending = self._pending
        while True:
            # Idle: block until a request comes. Busy: take whatever arrived during the last batch.
            jobs, stopping = self._driver.take(block=not pending)
            pending.extend(jobs)
            if stopping:
                self._fail_pending("the embedding engine has been shut down")
                return
            self._drop_done(pending)  # callers that left while they waited
            if pending:
                self._run_batch(self._take_batch(pending), pending)

    def _take_batch(self, pending: deque[_Job]) -> list[tuple[_Job, list[int]]]:
        """(job, input indices) pairs for the next forward, within the token budget."""
        budget = self.max_batch_tokens
        num_tokens = 0
        batch: list[tuple[_Job, list[int]]] = []
        for job in pending:
            if job.cancelled:
                continue
            taken: list[int] = []
            while job.num_left:
                index = job.order[job.next]
                n = len(job.token_ids[index])
                if num_tokens + n > budget and (num_tokens or taken):
                    break
                taken.append(index)
                num_tokens += n
                job.next += 1
            if taken:
                batch.append((job, taken))
            if job.num_left:  # the budget ran out inside this job
                break
        return batch

    def _run_batch(self, batch: list[tuple[_Job, list[int]]], pending: deque[_Job]) -> None:
        token_ids = [job.token_ids[i] for job, indices in batch for i in indices]
        segment_starts = None
        if any(job.segment_starts is not None for job, _ in batch):
            segment_starts = [
                job.segment_starts[i] if job.segment_starts is not None else len(job.token_ids[i])
                for job, indices in batch
                for i in indices
            ]
        try:
            vectors = self.engine.encode(token_ids, segment_starts)
        except Exception as exc:  # e.g. out of memory: it fails these requests, not the engine
            logger.exception("embedding batch of %d inputs failed", len(token_ids))
            for job, _ in batch:
                job.cancelled = True
                self._deliver(job, exc)
            self._drop_done(pending)
            return
        row = 0
        finished: list[_Job] = []
        for job, indices in batch:
            job.vectors[indices] = vectors[row : row + len(indices)]
            row += len(indices)
            job.num_done += len(indices)
            if job.num_done == len(job.token_ids):
                finished.append(job)
        # Published before any caller hears back, so a caller sees its own batch counted.
        stats = self._stats
        self._stats = EmbeddingStats(
            num_batches=stats.num_batches + 1,
            num_inputs=stats.num_inputs + len(token_ids),
            num_tokens=stats.num_tokens + sum(len(ids) for ids in token_ids),
            num_waiting_requests=sum(
                1 for job in pending if not job.cancelled and job.num_done < len(job.token_ids)
            ),
        )
        for job in finished:
            try:
                result: object = job.finish(job.vectors)
            except Exception as exc:  # a bug, but it belongs to that caller alone
                result = exc
            self._deliver(job, result)
        self._drop_done(pending)

    @staticmethod
    def _drop_done(pending: deque[_Job]) -> None:
        # Jobs finish in roughly FIFO order; rebuild only when something ended.
        if any(job.cancelled or job.num_done == len(job.token_ids) for job in pending):
            kept = [j for j in pending if not j.cancelled and j.num_done < len(j.token_ids)]
            pending.clear()
            pending.extend(kept)

    @staticmethod
    def _deliver(job: _Job, result: object) -> None:
        call_in_loop(job.loop, _settle, job.future, result)

    def _fail_pending(self, message: str, cause: Exception | None = None) -> None:
        for job in self._pending:
            # One instance per request: an exception raised in several tasks would share a traceback.
            error = EngineDeadError(message)
            error.__cause__ = cause
            self._deliver(job, error)
        self._pending.clear()

    def _fail_all(self, exc: Exception) -> None:
        """The loop died (the driver has marked the engine dead): fail every request waiting."""
        self._fail_pending(f"the embedding engine loop failed: {exc!r}", exc)
