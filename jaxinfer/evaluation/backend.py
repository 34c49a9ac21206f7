"""JaxInferLM: the engine as an lm-evaluation-harness model, registered as `jaxinfer`.

  lm_eval.simple_evaluate(model=JaxInferLM(model="tiny", quant="int8"), tasks=[...])
  jaxinfer-lm-eval --model jaxinfer --model_args model=tiny,kv_dtype=int8 --tasks ...

It is a TemplateLM, as lm-eval's HF backend is: lm-eval's own code turns text into tokens (the
context / continuation split, the empty context), through `tok_encode`, which encodes as the HF
backend does (the tokenizer's own special tokens unless add_bos_token says otherwise; none when
the text already starts with BOS). Each request type then goes to the engine in one call, so the
engine batches them (max_batch sequences at once) and shares KV pages of repeated contexts
through the prefix cache:
  loglikelihood          Engine.score: the four choices of a question cost one context prefill
  loglikelihood_rolling  Engine.score_rolling: lm-eval's rolling windows of max_length tokens
  generate_until         Engine.generate with the request's stop strings (`until`), max_gen_toks,
                         greedy unless the request samples (do_sample / temperature > 0)
Inputs longer than max_length + 1 tokens are cut on the left, as the HF backend cuts them.
The model arguments are options.py's. lm-eval's own batch_size, max_batch_size and device (its
command line always passes them) do not apply: the engine batches every request it is given,
max_batch at once, on JAX's default devices; a batch_size other than 1 is refused, naming max_batch.
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (lm-eval's own models register first: the registry is no longer empty after ours)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from jaxinfer.engine.scoring import prefix_token
from jaxinfer.evaluation.options import build
from jaxinfer.sampling.params import SamplingParams

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until
# Generation arguments a request may carry (after lm-eval's normalize_gen_kwargs), as SamplingParams names.
GEN_KWARGS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed"}
LM_EVAL_ARGS = ("batch_size", "max_batch_size", "device")


@register_model("jaxinfer")
class JaxInferLM(TemplateLM):
    def __init__(self, max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 add_bos_token: bool | None = None, **model_args):
        """model_args: options.py's (model=, quant=, kv_dtype=, spec=, adapter=, EngineConfig fields).
        max_length: the longest input scored (the rolling window of loglikelihood_rolling; a
        generation's context plus max_gen_toks), default the engine's max_seq_len - 1.
        max_gen_toks: generate_until's default length. add_bos_token: as the HF backend's (None:
        the tokenizer's own special tokens)."""
        super().__init__()
        runner = {k: model_args.pop(k) for k in LM_EVAL_ARGS if k in model_args}
        if runner.get("batch_size", 1) not in (1, "1"):
            raise ValueError(f"batch_size={runner['batch_size']!r}: the engine batches requests itself; set "
                             "max_batch in --model_args (sequences run at once) instead")
        if add_bos_token not in (None, True, False):
            raise ValueError(f"add_bos_token={add_bos_token!r} must be true, false or none")
        self.engine, self.adapter, self.options = build(model_args)
        self.model = self.engine.model
        if self.model.tokenizer is None:
            raise ValueError(f"model={self.options['model']!r} has no tokenizer: lm-eval's requests are text")
        limit = self.engine.max_seq_len - 1
        max_length = limit if max_length is None else max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= limit:
            raise ValueError(f"max_length must be an integer in [1, {limit}] (the engine's max_seq_len - 1), "
                             f"got {max_length!r}")
        if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 1:
            raise ValueError(f"max_gen_toks must be an integer >= 1, got {max_gen_toks!r}")
        self.max_length, self.max_gen_toks, self.add_bos_token = max_length, max_gen_toks, add_bos_token

    @property
    def eot_token_id(self) -> int:
        eos = tuple(getattr(self.model.tokenizer, "eos_ids", ())) + tuple(self.model.config.eos_token_ids)
        return eos[0] if eos else self.prefix_token_id

    @property
    def prefix_token_id(self) -> int:
        return prefix_token(self.model)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The string's token ids, as lm-eval's HF backend encodes it: add_special_tokens if given,
        else add_bos_token if set, else the tokenizer's default; none when the string starts with
        the BOS text already."""
        special = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if special is None:
            bos = self.model.tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)
            special = not (bos and string.startswith(bos))
        return list(self.model.tokenizer.encode(string, add_special_tokens=special))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids), scored in one engine call."""
        if not requests:
            return []
        contexts, continuations = [], []
        for i, (_, ctx, cont) in enumerate(requests):
            if len(cont) > self.max_length:
                raise ValueError(f"requests[{i}]: the continuation is {len(cont)} tokens, over max_length="
                                 f"{self.max_length}")
            contexts.append((list(ctx) + list(cont))[-(self.max_length + 1):-len(cont)])
            continuations.append(list(cont))
        with tqdm(total=len(requests), disable=disable_tqdm, desc="jaxinfer loglikelihood") as bar:
            scores = self.engine.score(contexts, continuations, adapter=self.adapter)
            bar.update(len(requests))
        out = [(float(s.logprob), bool(s.greedy)) for s in scores]
        for (pair, _, _), result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        if not requests:
            return []
        tokens = [self.tok_encode(r.args[0]) for r in requests]
        with tqdm(total=len(requests), disable=disable_tqdm, desc="jaxinfer loglikelihood_rolling") as bar:
            totals = self.engine.score_rolling(tokens, self.max_length, adapter=self.adapter)
            bar.update(len(requests))
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return [float(t) for t in totals]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        prompts, params, stops = [], [], []
        for i, r in enumerate(requests):
            context, gen_kwargs = r.args
            prompt, sampling, until = self._generation(i, context, gen_kwargs)
            prompts.append(prompt)
            params.append(sampling)
            stops.append(until)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="jaxinfer generate_until") as bar:
            outs = self.engine.generate(prompts, params, adapters=[self.adapter] * len(prompts))
            bar.update(len(requests))
        texts = [postprocess_generated_text(o.text, until, None) for o, until in zip(outs, stops)]
        for r, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", r.args, text)
        return texts

    def _generation(self, i: int, context: str, gen_kwargs: dict) -> tuple[list[int], SamplingParams, list[str]]:
        """Request i's prompt (the context's tokens, cut on the left to leave max_gen_toks of
        max_length, as lm-eval's HF backend cuts them), SamplingParams and stop strings."""
        kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
        until = kwargs.pop("until")
        until = [until] if isinstance(until, str) else [u for u in until if u]
        max_gen_toks = kwargs.pop("max_gen_toks")
        do_sample = kwargs.pop("do_sample")
        unknown = sorted(set(kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ValueError(f"requests[{i}]: generation argument(s) {', '.join(unknown)} are not supported "
                             f"(supported: until, max_gen_toks, do_sample, {', '.join(GEN_KWARGS)})")
        if not 1 <= max_gen_toks < self.max_length:
            raise ValueError(f"requests[{i}]: max_gen_toks={max_gen_toks} must be in [1, max_length={self.max_length})")
        sampling = {GEN_KWARGS[k]: v for k, v in kwargs.items()}
        if not do_sample:
            sampling["temperature"] = 0.0
        tokens = self.tok_encode(context)[-(self.max_length - max_gen_toks):] or [self.prefix_token_id]
        return tokens, SamplingParams(max_tokens=max_gen_toks, stop=tuple(until), **sampling), until

    @property
    def tokenizer_name(self) -> str:
        return self.model.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.model.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the model's chat template (the tokenizer's own rendering)."""
        if getattr(self.model.tokenizer, "chat_template", None) is None:
            raise ValueError(f"{self.model.name} has no chat template: run without --apply_chat_template")
        return self.model.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)
