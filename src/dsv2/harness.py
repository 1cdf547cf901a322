"""lm-evaluation-harness in process: a model class registered as `dsv2`, scoring and generating with `LLM`.

    import lm_eval, dsv2.harness                     # the import registers "dsv2"
    lm_eval.simple_evaluate(model="dsv2", model_args="pretrained=runs/nano/model,dtype=float32", tasks=[...])

or from the shell, lm-eval's own command line with `dsv2` registered: `python -m dsv2.harness run --model dsv2
--model_args pretrained=PATH --tasks ...`. The same numbers come from a server: `lm_eval --model
local-completions` against `dsv2 serve` (README "Evaluate with lm-eval").

Loglikelihoods are the engine's prompt logprobs (`SamplingParams.prompt_logprobs`): the log-softmax of the raw
logits of each continuation token given everything before it, from one chunked prefill per request, batched
by the engine like any other requests.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from tqdm import tqdm

try:
    import lm_eval.models  # noqa: F401  the built-in models: lm-eval loads them only into an empty registry
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(f"dsv2.harness needs lm-evaluation-harness: pip install 'lm-eval[api]' ({e})") from None

from dsv2.infer.engine import LLM
from dsv2.infer.sampling import SamplingParams

DEFAULT_MAX_GEN_TOKS = 256


@register_model("dsv2")
class DSV2LM(TemplateLM):
    """`pretrained`: a model folder (with tokenizer.json) or a preset; `add_bos_token`: start every context with
    BOS, as DeepSeek-V2 was trained (lm-eval's API models leave it out unless told). Other arguments as `LLM`."""

    def __init__(self, pretrained: str, dtype: str = "auto", device: str = "cpu", max_batch_size: int | None = None,
                 batch_size: int | str | None = None, add_bos_token: bool = True, kv_cache_dtype: str = "auto",
                 quantization: str | None = None, **unused):
        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device}: this machine has no CUDA device; pass --device cpu "
                             "(lm-eval's command line defaults to cuda:0)")
        batch = int(batch_size) if str(batch_size or "").isdigit() else None  # "auto" and None: the default
        self.llm = LLM(pretrained, dtype=dtype, device=device, max_batch_size=max_batch_size or batch or 32,
                       kv_cache_dtype=kv_cache_dtype, quantization=quantization)
        if self.llm.tokenizer is None:
            raise ValueError(f"{pretrained}: lm-eval needs a tokenizer (tokenizer.json in the model folder)")
        self.tokenizer = self.llm.tokenizer
        self.add_bos_token = add_bos_token
        self.max_length = self.llm.config.max_position_embeddings - 1  # one position left for a sampled token
        self._batch = self.llm.engine.scheduler.max_running

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is scored after: BOS."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_bos=bos)

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(key, context ids, continuation ids) -> (sum of the continuation's log p, whether each of its tokens
        is the argmax). A context too long for the model is cut on the left."""
        results: list[tuple[float, bool]] = []
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
        for start in tqdm(range(0, len(requests), self._batch), disable=disable_tqdm, desc="dsv2 loglikelihood"):
            batch = requests[start : start + self._batch]
            prompts = [(context + continuation)[-self.max_length :] for _, context, continuation in batch]
            for (key, _, continuation), prompt, out in zip(batch, prompts, self.llm.generate(prompts, params),
                                                           strict=True):
                n = len(continuation)
                if n >= len(prompt):
                    raise ValueError(f"a continuation of {n} tokens leaves no context in {self.max_length} positions")
                tops = out.prompt_top_logprobs[-n:]
                answer = (sum(out.prompt_logprobs[-n:]),
                          all(max(top, key=top.get) == t for top, t in zip(tops, continuation, strict=True)))
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A whole text's log p, in windows of the model's context, each window's first token after BOS."""
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="dsv2 loglikelihood_rolling"):
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text, add_special_tokens=False), self.prefix_token_id, self.max_length, 1)]
            total = sum(ll for ll, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows], True))
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy unless the task asks to sample; stops at the task's `until` strings (and EOS)."""
        texts: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same generation arguments run as one batch
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="dsv2 generate_until")
        for key, members in groups.items():
            kwargs = dict(json.loads(key))
            until = kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            max_tokens = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            # do_sample false is greedy whatever the temperature (transformers' rule); else the task's temperature
            sample, temperature = kwargs.pop("do_sample", None), kwargs.pop("temperature", None)
            temperature = 0.0 if sample is False else float(temperature if temperature is not None else sample or 0)
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                    top_p=float(kwargs.pop("top_p", 1.0)), stop=until or None,
                                    seed=kwargs.pop("seed", None))
            if kwargs:
                raise ValueError(f"dsv2: generation arguments it cannot honour: {sorted(kwargs)}")
            room = self.max_length + 1 - max_tokens
            prompts = [self.tok_encode(requests[i].args[0])[-room:] for i in members]
            for i, out in zip(members, self.llm.generate(prompts, params), strict=True):
                texts[i] = out.text
                self.cache_hook.add_partial("generate_until", requests[i].args, out.text)
                bar.update()
        bar.close()
        return texts


if __name__ == "__main__":  # lm-eval's command line, with "dsv2" registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
