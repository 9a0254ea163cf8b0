"""LLM: the offline batch API (`from heron import LLM, SamplingParams`), on the same EngineCore.

`LLM(model=None)` loads the embedded default. `generate` takes strings or token-id lists and returns
RequestOutputs in input order; `chat` applies the model's chat template first. Engine limits left
unset take the same defaults as `heron serve` for the device the model runs on (heron.config).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from heron.config import DEFAULT_MAX_NUM_SEQS, CacheConfig, SchedulerConfig
from heron.engine.core import EngineCore
from heron.env import env_settings
from heron.models.chat_template import ChatTemplate
from heron.models.loader import load_model
from heron.outputs import RequestOutput
from heron.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
        max_num_batched_tokens: int | None = None,  # None: the device's default (heron.config)
        kv_cache_memory_bytes: int | None = None,
        block_size: int = CacheConfig.block_size,
        enable_prefix_caching: bool = CacheConfig.enable_prefix_caching,
        chat_template: str | None = None,
        progress: bool = True,
        tensor_parallel_size: int = 1,
        distributed_executor_backend: str = "mp",
    ):
        """tensor_parallel_size > 1 splits the model over that many worker processes (or Ray actors
        with distributed_executor_backend="ray"); call `shutdown()` to stop them."""
        from heron.engine.executor.factory import make_executor

        env_settings()  # the environment switches, read now: a bad value fails here on any device
        in_process = tensor_parallel_size == 1 and distributed_executor_backend == "mp"
        self.loaded = load_model(model, dtype=dtype, device=device, progress=progress, with_weights=in_process)
        self.tokenizer = self.loaded.tokenizer
        executor = make_executor(self.loaded, tensor_parallel_size, distributed_executor_backend)
        self.engine = EngineCore(
            self.loaded,
            CacheConfig(block_size, kv_cache_memory_bytes, enable_prefix_caching),
            SchedulerConfig.for_device(
                self.loaded.device, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
            ),
            max_model_len,
            executor=executor,
        )
        if chat_template is not None:
            self.chat_template: ChatTemplate | None = ChatTemplate.from_file(chat_template, special_tokens=self.tokenizer.special_tokens)
        elif self.loaded.chat_template:
            self.chat_template = ChatTemplate(self.loaded.chat_template, special_tokens=self.tokenizer.special_tokens)
        else:
            self.chat_template = None
        self._ids = itertools.count()

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return list(prompt)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One final output per prompt, in order. A request the engine could not complete comes back
        with `error` set (a RequestFailedError; its samples end ABORT) beside the others' results."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt given bare
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (
            [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        )
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling params")
        request_ids = []
        for prompt, params in zip(prompts, params_list):
            request_id = f"offline-{next(self._ids)}"
            self.engine.add_request(request_id, self._encode(prompt), params)
            request_ids.append(request_id)
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        results = []
        for prompt, request_id in zip(prompts, request_ids):
            output = finished[request_id]
            if isinstance(prompt, str):
                output.prompt = prompt
            results.append(output)
        return results

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        if self.chat_template is None:
            raise ValueError("this model has no chat template; pass chat_template=PATH")
        kwargs.setdefault("add_generation_prompt", True)
        return self.chat_template.render(messages, **kwargs)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conversation in conversations:
            text = self.apply_chat_template(conversation, **template_kwargs)
            # The template already wrote any BOS it wants; don't add another.
            prompts.append(self.tokenizer.encode(text, add_special_tokens=False))
        return self.generate(prompts, sampling_params)

    def shutdown(self) -> None:
        """Release the engine's workers (tensor-parallel processes, the KV cache); idempotent."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
