"""EngineCore correctness on the bundled SmolLM2-135M (fp32 on CPU): what batching, paging and
scheduling do must never change what a request generates.

Every test runs on each CPU path this machine has: the default (Heron's kernels, the best build for
this CPU), the kernels off (PyTorch's float32 path), and the AVX2 build forced where the default is
the AVX-512 one; see `engine_path`.

The reference for every scheduling test is the same prompt generated alone, greedily, with prefix
caching off, so any difference comes from the machinery under test: continuous batching of mixed
lengths, prefix-cache hits, preemption and recompute, chunked prefill. Logprobs are checked against
a cache-free full forward of the whole sequence, which shares no paging code with the engine.
Sampling knobs, stops, n > 1, abort, input validation and the offline `LLM` API follow.

The model is loaded once per module and shared by every EngineCore built here; each core gets an
explicit, small KV budget (the default 1 GiB per core would add up across tests).
"""

from __future__ import annotations

import math

import pytest
import torch

from heron import kernels
from heron.config import CacheConfig, SchedulerConfig
from heron.engine.core import EngineCore
from heron.models.chat_template import ChatTemplate
from heron.models.loader import LoadedModel, load_model
from heron.outputs import FinishReason, RequestOutput
from heron.sampling_params import SamplingParams
from heron.worker.forward_batch import ForwardBatch

MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)

# Varied sources, so that batched requests do not all continue the same text. Prompts are token
# slices of these, which gives exact control over their lengths.
PASSAGES = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press. Within fifty years printers were active in "
    "more than two hundred European cities, and the price of books fell sharply. Scholars could compare "
    "identical copies of a text for the first time, pamphlets spread news and arguments quickly, and "
    "literacy rose among merchants and craftsmen. Historians still debate how much the press caused the "
    "Reformation and the scientific revolution, but few doubt that it changed how ideas travelled. ",
    "def merge_sort(items):\n    if len(items) <= 1:\n        return items\n    middle = len(items) // 2\n"
    "    left = merge_sort(items[:middle])\n    right = merge_sort(items[middle:])\n    merged = []\n"
    "    i = j = 0\n    while i < len(left) and j < len(right):\n        if left[i] <= right[j]:\n"
    "            merged.append(left[i])\n            i += 1\n        else:\n            merged.append(right[j])\n"
    "            j += 1\n    merged.extend(left[i:])\n    merged.extend(right[j:])\n    return merged\n\n"
    "def binary_search(items, target):\n    low, high = 0, len(items) - 1\n    while low <= high:\n",
    "Recipe for a simple tomato soup. Ingredients: two tablespoons of olive oil, one onion, two cloves of "
    "garlic, a kilogram of ripe tomatoes, half a litre of vegetable stock, salt, pepper and a handful of "
    "fresh basil. Step one: chop the onion and garlic and soften them in the oil over a low heat for ten "
    "minutes. Step two: add the tomatoes, roughly chopped, and cook until they collapse. Step three: pour "
    "in the stock, simmer for twenty minutes, then blend until smooth. Step four: season to taste and "
    "serve with the torn basil leaves and a slice of crusty bread. Variations include adding",
    "Dear hiring committee, I am writing to apply for the position of junior data analyst advertised on "
    "your website. Over the past two years I have worked with spreadsheets, SQL databases and Python to "
    "clean, summarise and visualise data for a regional logistics company. In that role I built a weekly "
    "dashboard that reduced late deliveries by tracking routes with repeated delays. I enjoy explaining "
    "numbers to people who do not work with them every day, and I would welcome the chance to",
    "Q: What is the boiling point of water at sea level?\nA: 100 degrees Celsius.\nQ: How many legs does a "
    "spider have?\nA: Eight.\nQ: Which planet is closest to the Sun?\nA: Mercury.\nQ: What gas do plants "
    "absorb from the air?\nA: Carbon dioxide.\nQ: Who wrote the play Romeo and Juliet?\nA: William "
    "Shakespeare.\nQ: What is the largest ocean on Earth?\nA: The Pacific Ocean.\nQ: How many continents "
    "are there?\nA: Seven.\nQ: What is the chemical symbol for gold?\nA:",
    "The mountain village woke slowly. Smoke rose from the chimneys, a dog barked somewhere below the "
    "church, and the baker pushed open his shutters to let out the smell of bread. Old Marta sat on her "
    "bench as she had every morning for forty years, watching the road that wound down into the valley. "
    "Nobody had come up that road since the storm, and nobody expected anyone to. So when she saw the "
    "figure of a stranger climbing through the mist, leaning on a long stick, she stood up and",
]

# Prompt lengths in tokens: short, medium and long mixed, 5 to 300.
PROMPT_LENGTHS = [5, 300, 7, 64, 129, 12, 250, 33, 9, 180, 16, 17, 95, 270, 6, 48,
                  200, 11, 31, 150, 8, 110, 290, 20, 75, 15, 222, 40, 10, 160, 63, 100]  # fmt: skip


def kv_bytes_per_block(loaded: LoadedModel, block_size: int) -> int:
    arch = loaded.arch_config
    # K and V, every layer, in the dtype the model runs in here.
    element = torch.empty((), dtype=loaded.dtype).element_size()
    return 2 * arch.num_hidden_layers * block_size * arch.num_key_value_heads * arch.head_dim * element


def engine_paths() -> list[str | None]:
    """The kernel builds to run the engine tests on (None: kernels off), the default first."""
    default = kernels.status().isa
    paths = [default]
    if default is not None:
        paths.append(None)
    if default == "avx512":
        paths.append("avx2")
    return paths


ENGINE_PATHS = engine_paths()


def make_core(
    loaded: LoadedModel,
    *,
    num_blocks: int = 256,
    block_size: int = 16,
    prefix_caching: bool = True,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 512,
    max_model_len: int = 2048,
) -> EngineCore:
    budget = num_blocks * kv_bytes_per_block(loaded, block_size)
    core = EngineCore(
        loaded,
        CacheConfig(block_size, budget, prefix_caching),
        SchedulerConfig(max_num_seqs, max_num_batched_tokens),
        max_model_len,
    )
    assert core.kv_cache.num_blocks == num_blocks  # the byte formula above matches the engine's
    return core


def run(core: EngineCore, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, RequestOutput]:
    """Add every request, step until all finish; return each request's final output.

    Also checks what every caller relies on: each request finishes exactly once, the streamed
    deltas add up to the final text and token ids, and all KV blocks are free again at the end.
    """
    for request_id, (prompt, params) in requests.items():
        core.add_request(request_id, prompt, params)
    return drain(core, expected=set(requests))


def drain(
    core: EngineCore,
    expected: set[str],
    first_token_step: dict[str, int] | None = None,
    earlier: list[RequestOutput] = (),
) -> dict[str, RequestOutput]:
    """Step until idle (see `run`). `earlier`: outputs of steps the caller took itself, so that the
    delta checks see every delta. `first_token_step`, if given, gets the step index of each
    request's first generated token."""
    finished: dict[str, RequestOutput] = {}
    texts: dict[tuple[str, int], str] = {}
    token_ids: dict[tuple[str, int], list[int]] = {}
    for step in range(-1, 10_000):
        if step >= 0 and not core.has_unfinished():
            break
        for output in core.step() if step >= 0 else earlier:
            assert output.request_id not in finished, f"{output.request_id} reported after it finished"
            if first_token_step is not None:
                first_token_step.setdefault(output.request_id, step)
            for completion in output.outputs:
                key = (output.request_id, completion.index)
                texts[key] = texts.get(key, "") + completion.delta_text
                token_ids.setdefault(key, []).extend(completion.delta_token_ids)
            if output.finished:
                finished[output.request_id] = output
    else:
        pytest.fail("the engine did not finish within 10,000 steps")
    assert set(finished) == expected
    for request_id, output in finished.items():
        for completion in output.outputs:
            key = (request_id, completion.index)
            assert texts[key] == completion.text, f"{key}: deltas do not add up to the final text"
            assert token_ids[key] == completion.token_ids, f"{key}: delta tokens do not add up"
    assert core.kv_cache.num_free_blocks == core.kv_cache.num_blocks, "blocks leaked after all requests finished"
    return finished


def run_one(core: EngineCore, prompt: list[int], params: SamplingParams) -> RequestOutput:
    return run(core, {"only": (prompt, params)})["only"]


def token_lists(outputs: dict[str, RequestOutput]) -> dict[str, list[int]]:
    return {request_id: output.outputs[0].token_ids for request_id, output in outputs.items()}


def assert_same_tokens(got: dict[str, list[int]], want: dict[str, list[int]]) -> None:
    assert got.keys() == want.keys()
    mismatched = {rid: (got[rid], want[rid]) for rid in want if got[rid] != want[rid]}
    assert not mismatched, f"{len(mismatched)} requests differ (got, want): {mismatched}"


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=ENGINE_PATHS, ids=lambda isa: f"kernels-{isa or 'off'}")
def engine_path(request) -> str | None:
    """The kernel build this module's tests run on (None: PyTorch's path)."""
    return request.param


@pytest.fixture(autouse=True)
def _on_engine_path(engine_path):
    with kernels.using(engine_path):
        yield


@pytest.fixture(scope="module")
def loaded(engine_path) -> LoadedModel:
    # Loaded under the path: with the kernels off, the weights are dequantized at load time, and
    # float32 is asked for because that is the path the README's table promises these properties
    # for (`auto` picks bf16 on a native-bf16 CPU; test_dtype_paths.py covers that one).
    with kernels.using(engine_path):
        return load_model(None, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def tokenizer(loaded):
    return loaded.tokenizer


@pytest.fixture(scope="module")
def passages_ids(tokenizer) -> list[list[int]]:
    # Each source starts with its own passage and goes on through the others, so long prompts
    # are natural text rather than one passage repeated.
    rotations = ["".join(PASSAGES[i:] + PASSAGES[:i]) for i in range(len(PASSAGES))]
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in rotations]
    assert all(len(p) >= 600 for p in ids)
    return ids


@pytest.fixture(scope="module")
def prompts(passages_ids) -> dict[str, list[int]]:
    """32 prompts of mixed lengths; start offsets vary so that no two share a block-sized prefix."""
    out = {}
    for i, length in enumerate(PROMPT_LENGTHS):
        source = passages_ids[i % len(passages_ids)]
        start = (i // len(passages_ids)) * 3
        out[f"p{i:02d}-{length}"] = source[start : start + length]
    assert len({tuple(p) for p in out.values()}) == len(out)
    return out


@pytest.fixture(scope="module")
def reference(engine_path, loaded, prompts) -> dict[str, list[int]]:
    """Greedy tokens of each prompt generated alone, prefix caching off: the ground truth."""
    with kernels.using(engine_path):
        core = make_core(loaded, num_blocks=32, prefix_caching=False)
        return {rid: run_one(core, prompt, GREEDY).outputs[0].token_ids for rid, prompt in prompts.items()}


@pytest.fixture(scope="module")
def chat_prompt(loaded, tokenizer) -> list[int]:
    template = ChatTemplate(loaded.chat_template, special_tokens=tokenizer.special_tokens)
    text = template.render([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def core(loaded) -> EngineCore:
    """A roomy shared core for tests that do not care about its configuration."""
    return make_core(loaded, num_blocks=128)


@pytest.fixture
def idle_core(core) -> EngineCore:
    # Each test starts from an idle core with every block free (prefix-cached blocks count as free).
    assert not core.has_unfinished()
    assert core.kv_cache.num_free_blocks == core.kv_cache.num_blocks
    return core


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=True)


# -- 1-4: scheduling never changes greedy outputs ---------------------------------------------


def test_batched_equals_alone(loaded, prompts, reference):
    # Room for all 32 at once, so they really run together: decodes of some beside prefills of others.
    core = make_core(loaded, num_blocks=512)
    outputs = run(core, {rid: (prompt, GREEDY) for rid, prompt in prompts.items()})
    assert core.scheduler.num_preemptions == 0
    assert_same_tokens(token_lists(outputs), reference)
    for output in outputs.values():
        assert len(output.outputs[0].token_ids) <= MAX_TOKENS
        assert output.outputs[0].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)


def test_prefix_caching_on_and_off_agree(loaded, tokenizer):
    # A long shared system preamble (several full blocks) and distinct questions after it.
    preamble = encode(tokenizer, PASSAGES[0] + PASSAGES[3])[:170]
    questions = [
        " Summarise this in one sentence:",
        " What year did this begin?",
        " Translate the first sentence into French:",
        " List three key words:",
        " Is this text formal or informal?",
        " Write a title for it:",
    ]
    shared = {f"q{i}": preamble + tokenizer.encode(q, add_special_tokens=False) for i, q in enumerate(questions)}

    off_core = make_core(loaded, num_blocks=128, prefix_caching=False)
    off = token_lists(run(off_core, {rid: (p, GREEDY) for rid, p in shared.items()}))
    assert off_core.kv_cache.prefix_cache_hits == 0

    on_core = make_core(loaded, num_blocks=128, prefix_caching=True)
    # Half first, the rest once the first half is decoding: the later ones hit blocks that are in
    # use; then a second round after everything finished hits cached, unreferenced blocks.
    ids = list(shared)
    for rid in ids[:3]:
        on_core.add_request(rid, shared[rid], GREEDY)
    earlier = on_core.step()
    for rid in ids[3:]:
        on_core.add_request(rid, shared[rid], GREEDY)
    first = drain(on_core, set(ids), earlier=earlier)
    assert_same_tokens(token_lists(first), off)
    assert on_core.kv_cache.prefix_cache_hits > 0
    assert all(first[rid].num_cached_tokens >= 160 for rid in ids[3:])

    hits_before = on_core.kv_cache.prefix_cache_hits
    second = run(on_core, {f"again-{rid}": (p, GREEDY) for rid, p in shared.items()})
    assert_same_tokens({rid.removeprefix("again-"): t for rid, t in token_lists(second).items()}, off)
    assert on_core.kv_cache.prefix_cache_hits > hits_before
    assert all(o.num_cached_tokens >= 160 for o in second.values())


def test_preemption_keeps_outputs(loaded, prompts, reference):
    # 40 blocks of 16 = 640 token slots for 32 requests needing ~5,000: admission fills the pool
    # with prefills, the decodes that follow need fresh blocks, and the newest requests get preempted.
    core = make_core(loaded, num_blocks=40)
    outputs = run(core, {rid: (prompt, GREEDY) for rid, prompt in prompts.items()})
    assert core.scheduler.num_preemptions > 0
    assert_same_tokens(token_lists(outputs), reference)


def test_preemption_keeps_seeded_samples_and_prompt_logprobs(loaded, passages_ids):
    # What a recompute must not redo: draw a seeded request's earlier tokens again (its generator
    # would advance and later draws change), or report prompt logprobs a second time. Caching is
    # off so the recompute really runs the whole sequence again.
    requests = {
        f"r{i}": (
            passages_ids[i][: 60 + 10 * i],
            SamplingParams(
                temperature=1.0, seed=100 + i, max_tokens=24, ignore_eos=True, logprobs=0, prompt_logprobs=0
            ),
        )
        for i in range(6)
    }
    tight = make_core(loaded, num_blocks=20, prefix_caching=False)
    preempted: list[tuple[str, int]] = []
    preempt = tight.scheduler._preempt

    def spy(request):
        preempted.append((request.request_id, request.num_output_tokens))
        preempt(request)

    tight.scheduler._preempt = spy
    squeezed = run(tight, requests)
    # At least one request was preempted after it had drawn tokens, so its generator had advanced.
    assert any(num_output > 1 for _, num_output in preempted), preempted

    roomy = make_core(loaded, num_blocks=64, prefix_caching=False)
    for rid, (prompt, params) in requests.items():
        alone = run_one(roomy, prompt, params)
        got = squeezed[rid]
        assert got.outputs[0].token_ids == alone.outputs[0].token_ids, rid
        assert len(got.outputs[0].logprobs) == 24
        assert len(got.prompt_logprobs) == len(prompt), f"{rid}: prompt logprobs reported twice"
        assert got.prompt_logprobs[0] is None
        torch.testing.assert_close(
            torch.tensor([lp.logprob for lp in got.prompt_logprobs[1:]]),
            torch.tensor([lp.logprob for lp in alone.prompt_logprobs[1:]]),
            atol=1e-4,
            rtol=0,
        )


def test_chunked_prefill_matches_whole_prefill(loaded, passages_ids):
    prompt = passages_ids[2][:460]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0)
    whole = run_one(make_core(loaded, num_blocks=64, max_num_batched_tokens=2048), prompt, params)
    chunked_core = make_core(loaded, num_blocks=64, max_num_batched_tokens=32)
    chunked_core.add_request("long", prompt, params)
    first_token_step: dict[str, int] = {}
    chunked = drain(chunked_core, {"long"}, first_token_step)["long"]
    # 460 prompt tokens at 32 a step: the first token comes only with the 15th step (index 14).
    assert first_token_step["long"] == -(-460 // 32) - 1
    assert chunked.outputs[0].token_ids == whole.outputs[0].token_ids
    # Not only the argmax: the distributions agree closely too.
    for a, b in zip(chunked.outputs[0].logprobs, whole.outputs[0].logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


# -- 5: paged attention against a cache-free forward ------------------------------------------


@torch.inference_mode()
def full_forward_logprobs(loaded: LoadedModel, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of the logits at every position of one whole sequence, no KV cache involved."""
    model = loaded.model
    batch = ForwardBatch.for_sequences([token_ids], device=loaded.device)
    hidden = model(batch)
    return model.compute_logits(hidden).float().log_softmax(dim=-1).cpu()


def test_logprobs_match_cache_free_forward(loaded, prompts):
    # A chunk budget of 64 splits the longer prompts, so chunks attend to cached context of earlier
    # chunks, and several requests decode side by side from their paged blocks.
    core = make_core(loaded, num_blocks=128, max_num_batched_tokens=64)
    chosen = {rid: prompts[rid] for rid in list(prompts)[:5]}  # lengths 5, 300, 7, 64, 129
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0, prompt_logprobs=0, ignore_eos=True)
    outputs = run(core, {rid: (p, params) for rid, p in chosen.items()})

    for rid, prompt in chosen.items():
        output = outputs[rid]
        generated = output.outputs[0].token_ids
        assert len(generated) == MAX_TOKENS
        full = full_forward_logprobs(loaded, prompt + generated)
        n = len(prompt)

        # Generated token t sits at position n + t and was predicted by row n + t - 1.
        reported = torch.tensor([lp.logprob for lp in output.outputs[0].logprobs])
        expected = full[torch.arange(n - 1, n - 1 + len(generated)), torch.tensor(generated)]
        torch.testing.assert_close(reported, expected, atol=1e-4, rtol=0)
        # Greedy picked the argmax of the cache-free distribution (rank 1) at every step.
        assert all(lp.rank == 1 for lp in output.outputs[0].logprobs)
        assert [lp.token_id for lp in output.outputs[0].logprobs] == generated

        # Prompt logprobs: None for the first token (nothing predicts it), then row i - 1 for token i.
        plp = output.prompt_logprobs
        assert plp is not None and len(plp) == n and plp[0] is None
        reported_prompt = torch.tensor([lp.logprob for lp in plp[1:]])
        expected_prompt = full[torch.arange(0, n - 1), torch.tensor(prompt[1:])]
        torch.testing.assert_close(reported_prompt, expected_prompt, atol=1e-4, rtol=0)
        assert [lp.token_id for lp in plp[1:]] == prompt[1:]


# -- 6: seeds ---------------------------------------------------------------------------------


def test_seeded_sampling_replays(idle_core, tokenizer):
    core = idle_core
    prompt = encode(tokenizer, "Once upon a time, in a small town by the sea,")
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=MAX_TOKENS, ignore_eos=True)
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=MAX_TOKENS, ignore_eos=True)

    alone = run_one(core, prompt, seeded).outputs[0]
    again = run_one(core, prompt, seeded).outputs[0]
    assert again.token_ids == alone.token_ids and again.text == alone.text

    # Inside a batch of unrelated requests, greedy and sampled with other seeds, in other positions.
    others = {
        "greedy": (encode(tokenizer, "The capital of France is"), GREEDY),
        "seed-7": (encode(tokenizer, "My favourite food is"), SamplingParams(temperature=0.8, seed=7, max_tokens=20)),
        "unseeded": (encode(tokenizer, "List three colors:"), SamplingParams(temperature=1.0, max_tokens=12)),
        "same-prompt-other-seed": (prompt, other_seed),
    }
    batch = run(core, {**others, "target": (prompt, seeded)})
    assert batch["target"].outputs[0].token_ids == alone.token_ids
    assert batch["target"].outputs[0].text == alone.text
    # Another seed on the same prompt (almost surely) gives another text.
    assert batch["same-prompt-other-seed"].outputs[0].text != alone.text

    # n=3: three different samples (per-sample streams), and the whole set replays exactly.
    n3 = SamplingParams(n=3, temperature=1.0, seed=42, max_tokens=MAX_TOKENS, ignore_eos=True)
    first = run_one(core, prompt, n3)
    second = run_one(core, prompt, n3)
    texts = [c.text for c in first.outputs]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert len(set(texts)) == 3
    assert [c.token_ids for c in second.outputs] == [c.token_ids for c in first.outputs]


# -- 7: stops ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def greedy_story(core, tokenizer):
    """A greedy continuation that runs to max_tokens (EOS ignored), with its per-token texts."""
    prompt = encode(tokenizer, "The old lighthouse keeper climbed the stairs and")
    out = run_one(core, prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)).outputs[0]
    assert out.finish_reason == FinishReason.LENGTH and len(out.token_ids) == 24
    return prompt, out


def test_stop_string_across_token_boundary(idle_core, tokenizer, greedy_story):
    core = idle_core
    prompt, full = greedy_story
    ids, text = full.token_ids, full.text
    # A stop string made of the end of one token and the start of the next, from the middle.
    stop = None
    for k in range(len(ids) // 2, len(ids) - 2):
        left = tokenizer.decode(ids[: k + 1])
        right = tokenizer.decode(ids[: k + 2])
        piece = right[len(left) - 2 : len(left) + 2]
        if left == text[: len(left)] and len(piece) == 4 and piece.strip() == piece and len(left) >= 2:
            stop = piece
            break
    assert stop is not None, f"no usable token boundary in {text!r}"
    cut = text.find(stop)
    assert cut > 0
    # The token on which the stop string is first complete: generation must end right there.
    completing = next(j for j in range(len(ids)) if stop in tokenizer.decode(ids[: j + 1]))

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    out = run_one(core, prompt, params).outputs[0]
    assert out.text == text[:cut]
    assert out.finish_reason == FinishReason.STOP
    assert out.stop_reason == stop
    assert out.token_ids == ids[: completing + 1]

    params = SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
    )
    kept = run_one(core, prompt, params).outputs[0]
    assert kept.text == text[: cut + len(stop)]
    assert kept.finish_reason == FinishReason.STOP and kept.stop_reason == stop


def test_stop_token_ids_and_max_tokens(idle_core, tokenizer, greedy_story):
    core = idle_core
    prompt, full = greedy_story
    ids = full.token_ids
    # The first token whose id did not appear earlier in the output, from position 5 on.
    position = next(i for i in range(5, len(ids)) if ids[i] not in ids[:i])
    stop_id = ids[position]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_id])
    out = run_one(core, prompt, params).outputs[0]
    assert out.finish_reason == FinishReason.STOP
    assert out.stop_reason == stop_id
    assert out.token_ids == ids[: position + 1]  # the stop token is generated ...
    assert out.text == tokenizer.decode(ids[:position])  # ... but its text is not shown

    short = run_one(core, prompt, SamplingParams(temperature=0, max_tokens=5)).outputs[0]
    assert short.finish_reason == FinishReason.LENGTH
    assert short.stop_reason is None
    assert short.token_ids == ids[:5]
    assert short.text == tokenizer.decode(ids[:5])


def test_eos_ignore_eos_and_min_tokens(idle_core, loaded, tokenizer, chat_prompt):
    core = idle_core
    eos = loaded.eos_token_ids
    natural = run_one(core, chat_prompt, SamplingParams(temperature=0, max_tokens=64)).outputs[0]
    # The instruct model answers briefly and ends its turn with EOS (<|im_end|>).
    assert natural.finish_reason == FinishReason.STOP
    assert natural.token_ids[-1] in eos
    assert all(t not in eos for t in natural.token_ids[:-1])
    assert "<|im_end|>" not in natural.text
    assert natural.text == tokenizer.decode(natural.token_ids[:-1])
    eos_at = len(natural.token_ids) - 1

    params = SamplingParams(temperature=0, max_tokens=eos_at + 6, ignore_eos=True)
    run_on = run_one(core, chat_prompt, params).outputs[0]
    assert run_on.finish_reason == FinishReason.LENGTH
    assert len(run_on.token_ids) == eos_at + 6
    assert run_on.token_ids[: eos_at + 1] == natural.token_ids  # same path, EOS just not obeyed

    min_tokens = eos_at + 3
    held = run_one(core, chat_prompt, SamplingParams(temperature=0, max_tokens=64, min_tokens=min_tokens)).outputs[0]
    assert len(held.token_ids) >= min_tokens
    assert all(t not in eos for t in held.token_ids[:min_tokens])
    assert held.token_ids[:eos_at] == natural.token_ids[:eos_at]


# -- 8: sampler knobs -------------------------------------------------------------------------


def test_sampler_knobs(idle_core, tokenizer):
    core = idle_core
    prompt = encode(tokenizer, "The best way to learn a new language is")
    greedy = run_one(core, prompt, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)).outputs[0]

    def sampled(**kwargs) -> SamplingParams:
        return SamplingParams(temperature=1.0, seed=5, max_tokens=MAX_TOKENS, ignore_eos=True, **kwargs)

    # One batch, so each row must get its own filter settings (a per-row threshold broadcast wrongly
    # across rows once crashed here). Filters that leave only the most likely token make it greedy.
    filtered = token_lists(
        run(
            core,
            {
                "top_k=1": (prompt, sampled(top_k=1)),
                "top_p=1e-6": (prompt, sampled(top_p=1e-6)),
                "min_p=1": (prompt, sampled(min_p=1.0)),
                "mild filters": (prompt, sampled(top_k=50, top_p=0.99, min_p=0.001)),
                "no filter": (prompt, sampled()),
            },
        )
    )
    assert filtered["top_k=1"] == greedy.token_ids
    assert filtered["top_p=1e-6"] == greedy.token_ids
    assert filtered["min_p=1"] == greedy.token_ids
    # ... and without them this seed does sample something else, so the three checks above bite.
    assert filtered["no filter"] != greedy.token_ids
    assert filtered["mild filters"] != greedy.token_ids
    # temperature 0 with top_k=1 on top changes nothing either.
    both = SamplingParams(temperature=0, top_k=1, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert run_one(core, prompt, both).outputs[0].token_ids == greedy.token_ids

    # A +100 bias forces its token at every step.
    forced = tokenizer.encode(" banana", add_special_tokens=False)[0]
    biased = run_one(core, prompt, SamplingParams(temperature=0, max_tokens=4, logit_bias={forced: 100})).outputs[0]
    assert biased.token_ids == [forced] * 4


def test_penalties(idle_core, tokenizer):
    core = idle_core
    # A prompt the model continues by repeating itself, so the penalties have something to act on.
    prompt = encode(tokenizer, "one two three one two three one two three one two three")
    base = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    plain = run_one(core, prompt, base).outputs[0].token_ids
    assert len(set(plain)) < len(plain), "the unpenalised output should repeat tokens"

    for knob in ({"repetition_penalty": 1.5}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalised = run_one(core, prompt, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **knob))
        assert penalised.outputs[0].token_ids != plain, f"{knob} changed nothing"

    # A huge repetition penalty pushes every seen token (prompt or output) below unseen ones.
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, repetition_penalty=1e4)
    strict = run_one(core, prompt, params)
    tokens = strict.outputs[0].token_ids
    assert len(set(tokens)) == len(tokens)
    assert not set(tokens) & set(prompt)


def test_top_logprobs(idle_core, tokenizer):
    core = idle_core
    prompt = encode(tokenizer, "The weather today is")
    requests = {
        "greedy": (prompt, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=5)),
        "sampled": (
            prompt,
            SamplingParams(temperature=1.5, seed=3, max_tokens=MAX_TOKENS, logprobs=5, ignore_eos=True),
        ),
    }
    outputs = run(core, requests)
    for rid, output in outputs.items():
        completion = output.outputs[0]
        assert len(completion.logprobs) == len(completion.token_ids)
        for token_id, lp in zip(completion.token_ids, completion.logprobs):
            assert lp.token_id == token_id
            assert len(lp.top) == 5
            values = [v for _, v in lp.top]
            assert values == sorted(values, reverse=True)
            assert all(v <= 0 for v in values)
            # The top alternatives are the start of the full distribution, which sums to 1.
            assert sum(math.exp(v) for v in values) <= 1 + 1e-5
            assert lp.rank >= 1
            assert lp.logprob <= values[0] + 1e-6
            if lp.rank <= 5:
                top_id, top_value = lp.top[lp.rank - 1]
                assert top_id == token_id and top_value == pytest.approx(lp.logprob, abs=1e-6)
            else:
                assert token_id not in [t for t, _ in lp.top] and lp.logprob <= values[-1]
        if rid == "greedy":
            assert all(lp.rank == 1 for lp in completion.logprobs)
    # At temperature 1.5 some draw lands off the argmax, so the rank path above is exercised.
    assert any(lp.rank > 1 for lp in outputs["sampled"].outputs[0].logprobs)


# -- 9-10: n > 1 block sharing, abort ---------------------------------------------------------


def test_n_shares_prompt_blocks(loaded, passages_ids):
    prompt = passages_ids[4][:64]
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=MAX_TOKENS, ignore_eos=True)

    def blocks_after_first_step(p: SamplingParams) -> int:
        core = make_core(loaded, num_blocks=64)
        core.add_request("r", prompt, p)
        core.step()  # the prefill of every sample is scheduled in this first step
        used = core.kv_cache.num_blocks - core.kv_cache.num_free_blocks
        core.abort_request("r")
        return used

    single = blocks_after_first_step(SamplingParams(temperature=1.0, seed=11, max_tokens=MAX_TOKENS))
    shared = blocks_after_first_step(params)
    assert single == 64 // 16
    # Four private copies would take 4 * 4 = 16; sharing leaves each extra sample only the last block
    # (the final prompt token is always recomputed so that it yields logits).
    assert shared < 4 * single
    assert shared == single + 3 * 1

    output = run_one(make_core(loaded, num_blocks=64), prompt, params)
    assert [c.index for c in output.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == MAX_TOKENS and c.finish_reason == FinishReason.LENGTH for c in output.outputs)
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1


def test_abort_frees_blocks_and_engine_keeps_serving(idle_core, prompts, reference):
    core = idle_core
    initial_free = core.kv_cache.num_free_blocks
    victims = ["p01-300", "p06-250"]
    survivors = ["p03-64", "p08-9"]
    for rid in victims + survivors:
        core.add_request(rid, prompts[rid], GREEDY)
    earlier = core.step() + core.step()
    assert core.kv_cache.num_free_blocks < initial_free - 30  # the two long prompts hold 35 blocks

    held_before = core.kv_cache.num_free_blocks
    num_held = len(core.kv_cache.get_block_ids("p01-300"))
    assert num_held == -(-(300 + 1) // 16)  # the prompt and the first generated token's KV
    assert core.abort_request("p01-300") is True
    # All of its blocks at once (the cached full ones become evictable, which counts as free).
    assert core.kv_cache.num_free_blocks - held_before == num_held
    assert core.kv_cache.get_block_ids("p01-300") == []
    assert core.abort_request("p01-300") is False  # unknown now
    core.add_request("p06-250-n3", prompts["p06-250"], SamplingParams(n=3, temperature=0, max_tokens=MAX_TOKENS))
    earlier += core.step()
    assert core.abort_request("p06-250") is True
    assert core.abort_request("p06-250-n3") is True  # every child of an n > 1 request

    outputs = drain(core, set(survivors), earlier=earlier)
    assert core.kv_cache.num_free_blocks == initial_free
    assert_same_tokens(token_lists(outputs), {rid: reference[rid] for rid in survivors})
    # Nothing of the aborted requests comes back, and a new request after the aborts is still right.
    again = run(core, {"p08-9": (prompts["p08-9"], GREEDY)})
    assert again["p08-9"].outputs[0].token_ids == reference["p08-9"]


# -- 11: invalid input ------------------------------------------------------------------------


def test_invalid_requests_rejected(loaded):
    core = make_core(loaded, num_blocks=16, max_model_len=128)
    vocab = loaded.arch_config.vocab_size
    with pytest.raises(ValueError):
        core.add_request("empty", [], GREEDY)
    with pytest.raises(ValueError):
        core.add_request("too-long", [100] * 200, GREEDY)
    with pytest.raises(ValueError):
        core.add_request("exactly-max", [100] * 128, GREEDY)  # no room left for a single new token
    with pytest.raises(ValueError):
        core.add_request("out-of-vocab", [100, vocab], GREEDY)
    with pytest.raises(ValueError):
        core.add_request("negative-id", [100, -1], GREEDY)
    # Nothing half-added: the engine is idle and every block is free.
    assert not core.has_unfinished()
    assert core.kv_cache.num_free_blocks == core.kv_cache.num_blocks
    # A request id in use is refused while it runs; the engine still serves after all that.
    core.add_request("ok", [100, 200, 300], GREEDY)
    with pytest.raises(ValueError):
        core.add_request("ok", [100, 200, 300], GREEDY)
    assert drain(core, {"ok"})["ok"].outputs[0].token_ids


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"logprobs": 21},
        {"prompt_logprobs": -1},
        {"min_tokens": 10, "max_tokens": 5},
        {"max_tokens": 0},
        {"n": 0},
        {"top_k": -2},
        {"min_p": 1.5},
        {"presence_penalty": 3.0},
        {"repetition_penalty": 0.0},
        {"logit_bias": {5: 101.0}},
    ],
)
def test_sampling_params_validation(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


# -- 12: offline LLM API ----------------------------------------------------------------------


def test_llm_generate_and_chat():
    from heron import LLM

    llm = LLM(progress=False, kv_cache_memory_bytes=64 << 20)
    # The same limits `heron serve` takes on this device when none is given.
    assert llm.engine.scheduler.config == SchedulerConfig.for_device(llm.loaded.device)
    params = SamplingParams(temperature=0, max_tokens=8)
    texts = ["The capital of France is", "def add(a, b):", "Water boils at", "Roses are red,"]
    token_prompt = llm.tokenizer.encode("1, 2, 3, 4,", add_special_tokens=True)
    outputs = llm.generate([*texts, token_prompt], params)
    # Input order, each prompt tied to its own output (short prompts finish in other orders inside).
    assert [o.prompt for o in outputs] == [*texts, None]
    for prompt, output in zip([*texts, token_prompt], outputs):
        expected_ids = llm.tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else prompt
        assert output.prompt_token_ids == expected_ids
        assert output.finished and output.outputs[0].token_ids
    # Generating one prompt alone gives the same as inside the list.
    assert llm.generate(texts[2], params)[0].outputs[0].token_ids == outputs[2].outputs[0].token_ids
    assert llm.generate(token_prompt, params)[0].outputs[0].token_ids == outputs[4].outputs[0].token_ids

    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = llm.chat(question, SamplingParams(temperature=0, max_tokens=32))
    assert len(answer) == 1
    assert "Paris" in answer[0].outputs[0].text
