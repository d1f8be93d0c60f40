"""`vbatch.LLM`: the offline Python API, with vLLM's names."""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence as SequenceABC

from vbatch.engine.config import EngineConfig
from vbatch.engine.llm_engine import LLMEngine
from vbatch.engine.outputs import RequestOutput
from vbatch.engine.sampling_params import SamplingParams


class LLM:
    """An engine for offline generation.

    >>> llm = LLM(model="smollm2", dtype="float32")
    >>> out = llm.generate(["The capital of France is"], SamplingParams(temperature=0))
    >>> out[0].outputs[0].text

    The keyword arguments are the fields of `EngineConfig`, with vLLM's names: model,
    tensor_parallel_size, pipeline_parallel_size, distributed_executor_backend, dtype, seed,
    max_model_len, max_num_seqs, max_num_batched_tokens, kv_cache_memory_gb (the KV cache's
    fixed budget), block_size, enable_prefix_caching, device, trust_remote_code, allow_pickle
    (pickle checkpoints are refused unless True). An unknown name raises TypeError.
    """

    def __init__(self, model: str | None = None, **engine_options):
        self.llm_engine = LLMEngine(EngineConfig(model=model, **engine_options))

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in input order.

        `prompts`: a string, a list of strings, or dicts {"prompt": str} /
        {"prompt_token_ids": [...]}. `sampling_params`: one for all, or one per prompt.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        encoded = []
        for prompt in prompts:
            if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
                encoded.append((prompt.get("prompt"), list(prompt["prompt_token_ids"])))
            else:
                text = prompt["prompt"] if isinstance(prompt, dict) else prompt
                encoded.append((text, self.llm_engine.encode_prompt(prompt=text)))
        return self._run(encoded, sampling_params)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} dicts) or to a list
        of conversations, with the tokenizer's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        encoded = [(None, self.llm_engine.encode_prompt(messages=conv)) for conv in conversations]
        return self._run(encoded, sampling_params)

    def _run(self, encoded: list[tuple[str | None, list[int]]], sampling_params
             ) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SequenceABC):
            if len(sampling_params) != len(encoded):
                raise ValueError("pass one SamplingParams, or exactly one per prompt")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params] * len(encoded)
        engine = self.llm_engine
        for index, ((text, token_ids), params) in enumerate(zip(encoded, params_list)):
            try:
                engine.add_request(str(index), token_ids, params, prompt=text)
            except ValueError as error:
                raise ValueError(f"prompt {index}: {error}") from None
        outputs: dict[str, RequestOutput] = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                outputs[output.request_id] = output
        return [outputs[str(i)] for i in range(len(encoded))]


# help(LLM) and editors show the keyword arguments the declaration gives it.
LLM.__init__.__signature__ = inspect.Signature([
    inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    *[inspect.Parameter(field.name,
                        inspect.Parameter.POSITIONAL_OR_KEYWORD if field.name == "model"
                        else inspect.Parameter.KEYWORD_ONLY,
                        default=field.default, annotation=field.type)
      for field in dataclasses.fields(EngineConfig)]])
