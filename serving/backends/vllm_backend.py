"""vLLM in-process (GPUs; `pip install -e '.[gpu]'`): prefix caching on, labels by structured
(guided) choice with the first position's log-probabilities for the distribution, JSON by
structured json with the answer's cumulative log-probability. vLLM is imported only when this
backend is built."""

from __future__ import annotations

from pathlib import Path

from serving.backends.base import ChoiceResult, JsonResult, distribution_from_logprobs, json_result


def _choice_params(choices: list[str], logprobs: int):
    from vllm import SamplingParams

    try:  # vLLM >= 0.10.2
        from vllm.sampling_params import StructuredOutputsParams

        return SamplingParams(temperature=0.0, max_tokens=32, logprobs=logprobs,
                              structured_outputs=StructuredOutputsParams(choice=choices))
    except ImportError:  # older releases
        from vllm.sampling_params import GuidedDecodingParams

        return SamplingParams(temperature=0.0, max_tokens=32, logprobs=logprobs,
                              guided_decoding=GuidedDecodingParams(choice=choices))


def _json_params(schema: dict, max_tokens: int):
    """Greedy JSON under `schema`, with the sampled tokens' logprobs (logprobs=0) so that
    vLLM fills `cumulative_logprob`."""
    from vllm import SamplingParams

    try:  # vLLM >= 0.10.2
        from vllm.sampling_params import StructuredOutputsParams

        return SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0,
                              structured_outputs=StructuredOutputsParams(json=schema))
    except ImportError:  # older releases
        from vllm.sampling_params import GuidedDecodingParams

        return SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0,
                              guided_decoding=GuidedDecodingParams(json=schema))


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_dir: str | Path, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, max_logprobs: int = 20, **llm_options):
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ImportError("backend 'vllm' needs vLLM: pip install -e '.[gpu]' (GPU machines only)") from exc
        self.max_logprobs = max_logprobs
        self.llm = LLM(model=str(model_dir), enable_prefix_caching=True, tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       max_logprobs=max_logprobs, **llm_options)

    def choose(self, prompts: list[str], choices: list[str]) -> list[ChoiceResult]:
        k = min(self.max_logprobs, len(choices))
        outs = self.llm.generate(list(prompts), _choice_params(list(choices), k), use_tqdm=False)
        results = []
        for out in outs:
            c = out.outputs[0]
            first = c.logprobs[0] if c.logprobs else {}
            top = {lp.decoded_token: lp.logprob for lp in first.values() if lp.decoded_token is not None}
            results.append(distribution_from_logprobs(c.text, top, list(choices), c.cumulative_logprob))
        return results

    def generate_json(self, prompts: list[str], schemas: list[dict], max_tokens: int) -> list[JsonResult]:
        """One vLLM batch, a schema per prompt (greedy). `logprob` is vLLM's
        `cumulative_logprob`: v1 masks the logits with the grammar bitmask before its sampler
        takes logprobs from them, so it should be the constrained distribution's (not run
        here: no vLLM on the CPU machines); 0.0 if vLLM returns none."""
        if len(schemas) != len(prompts):
            raise ValueError(f"schemas: {len(schemas)} for {len(prompts)} prompts")
        params = [_json_params(s, max_tokens) for s in schemas]
        outs = self.llm.generate(list(prompts), params, use_tqdm=False)
        return [json_result(o.outputs[0].text, o.outputs[0].cumulative_logprob or 0.0, o.outputs[0].finish_reason)
                for o in outs]

    def close(self) -> None:
        del self.llm
