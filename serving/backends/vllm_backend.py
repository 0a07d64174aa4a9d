"""vLLM in-process (GPUs; `pip install -e '.[gpu]'`): prefix caching on, labels by structured
(guided) choice with the first position's log-probabilities for the distribution. vLLM is
imported only when this backend is built."""

from __future__ import annotations

from pathlib import Path

from serving.backends.base import ChoiceResult, distribution_from_logprobs


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

    def close(self) -> None:
        del self.llm
