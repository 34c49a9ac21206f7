"""The soak's workload (a helper module of experiments/soak.py, not an experiment): random good
requests and bad input of each kind, drawn from the soak's flags (--max_prompt_len,
--max_output_len, --bad_rate, --abort_rate, --deadline_rate, --deadline_steps) and its random
generator."""

from __future__ import annotations

import dataclasses

from absl import flags

import jaxinfer as ji
from jaxinfer import data

FLAGS = flags.FLAGS  # defined by experiments/soak.py, read when requests are drawn
STOP_STRINGS = ["\n", "  ", ":", "(", "def", "return", "self", ", ", "\u00e9"]
BAD_KINDS = ("empty_prompt", "token_out_of_vocab", "not_token_ids", "prompt_too_long", "max_tokens_too_long",
             "bad_sampling", "not_sampling_params", "unknown_adapter", "abort_unknown", "abort_finished")
# SamplingParams fields set out of range: (field, value, words of the error).
BAD_SAMPLING = [("max_tokens", 0, "max_tokens must be"), ("max_tokens", 2.5, "max_tokens must be"),
                ("temperature", -1.0, "temperature must be"), ("top_p", 0.0, "top_p must be"),
                ("top_p", 1.5, "top_p must be"), ("min_p", 2.0, "min_p must be"), ("top_k", -1, "top_k must be"),
                ("n", 0, "n must be"), ("seed", -5, "seed must be"), ("timeout_s", 0.0, "timeout_s must be"),
                ("timeout_s", -1.0, "timeout_s must be"), ("stop", ("",), "stop strings must be non-empty"),
                ("stop", "x", "must be sequences")]



@dataclasses.dataclass
class Request:
    index: int
    kind: str  # "good", or one of BAD_KINDS
    prompt: object
    sampling: object  # SamplingParams, or for a bad request what is passed instead (kwargs of a bad one: dict)
    adapter: str | None = None
    abort_after: int | None = None  # steps after it was added
    deadline_steps: float | None = None  # its deadline in engine steps, made a timeout_s when it is added
    expect: str = ""  # bad: words its error must hold
    request_id: int | None = None
    added_step: int = 0
    outputs: list = dataclasses.field(default_factory=list)  # step() outputs, then the final one
    aborted: bool = False



class Workload:
    """Requests drawn from held-out text (the model's tokenizer's, else random ids), some behind
    one of four shared prefixes, for a model whose engine serves max_seq_len tokens and has the
    adapters named."""

    def __init__(self, model, rng, adapters: list[str], max_seq_len: int):
        self.model, self.rng, self.adapters, self.max_seq_len = model, rng, adapters, max_seq_len
        ids = data.heldout_stream(model.tokenizer).ids if model.tokenizer is not None else None
        self.text = ids if ids is not None else rng.integers(0, model.config.vocab_size, size=100_000)
        self.prefixes = [self.slice(int(rng.integers(8, 33))) for _ in range(4)]

    def slice(self, n: int) -> list[int]:
        start = int(self.rng.integers(0, len(self.text) - n))
        return [int(t) for t in self.text[start : start + n]]

    def good(self, index: int) -> Request:
        rng = self.rng
        n_prompt = int(rng.integers(1, FLAGS.max_prompt_len + 1))
        if rng.random() < 0.3:
            prefix = self.prefixes[int(rng.integers(len(self.prefixes)))][:n_prompt]
            prompt = prefix + self.slice(n_prompt - len(prefix))
        else:
            prompt = self.slice(n_prompt)
        if self.model.tokenizer is not None and rng.random() < 0.2:  # as a string (BOS added), if it stays short
            text = self.model.tokenizer.decode(prompt[: max(1, n_prompt - 1)])
            prompt = text if text and len(self.model.tokenizer.encode(text)) <= FLAGS.max_prompt_len else prompt
        greedy = rng.random() < 0.5
        kwargs = dict(max_tokens=int(rng.integers(1, FLAGS.max_output_len + 1)), ignore_eos=bool(rng.random() < 0.5),
                      temperature=0.0 if greedy else float(rng.uniform(0.3, 1.5)), seed=int(rng.integers(0, 2**31)))
        if not greedy:
            kwargs.update(top_k=int(rng.choice([0, 1, 5, 40])), top_p=float(rng.choice([1.0, 0.9, 0.5])),
                          min_p=float(rng.choice([0.0, 0.05])))
        if rng.random() < 0.2:
            kwargs["stop"] = tuple(rng.choice(STOP_STRINGS, size=int(rng.integers(1, 3)), replace=False).tolist())
        if rng.random() < 0.1:
            kwargs["stop_token_ids"] = (int(rng.integers(0, self.model.config.vocab_size)),)
        if rng.random() < 0.1:
            kwargs["n"] = int(rng.integers(2, 4))
        deadline = FLAGS.deadline_steps * float(rng.uniform(0.05, 2.0)) if rng.random() < FLAGS.deadline_rate else None
        adapter = None
        if self.adapters and rng.random() < 0.4:
            adapter = self.adapters[int(rng.integers(len(self.adapters)))]
        abort_after = int(rng.integers(0, 2 * FLAGS.max_output_len)) if rng.random() < FLAGS.abort_rate else None
        return Request(index, "good", prompt, ji.SamplingParams(**kwargs), adapter, abort_after, deadline)

    def bad(self, index: int, kind: str) -> Request:
        """A bad request of one kind: what is passed, and the words its ValueError must hold."""
        vocab, rng = self.model.config.vocab_size, self.rng
        prompt, sampling, adapter, expect = self.slice(int(rng.integers(1, 9))), ji.SamplingParams(), None, ""
        if kind == "empty_prompt":
            prompt, expect = rng.choice(["", "[]"]), "is empty"
            prompt = [] if prompt == "[]" else prompt
        elif kind == "token_out_of_vocab":
            prompt, expect = prompt + [int(rng.choice([vocab, vocab + 7, 2**31 - 1, -1]))], "outside the vocabulary"
        elif kind == "not_token_ids":
            prompt, expect = [None, 7, [1.5, 2.0], ["a"], [[1, 2]]][int(rng.integers(5))], "token ids"
        elif kind == "prompt_too_long":
            prompt, expect = [1] * (self.max_seq_len + int(rng.integers(1, 20))), "tokens, over the"
        elif kind == "max_tokens_too_long":
            sampling, expect = ji.SamplingParams(max_tokens=self.max_seq_len + 1), "over the engine's max_seq_len"
        elif kind == "bad_sampling":
            field, value, expect = BAD_SAMPLING[int(rng.integers(len(BAD_SAMPLING)))]
            sampling = {field: value}
        elif kind == "not_sampling_params":
            sampling, expect = {"max_tokens": 4}, "not SamplingParams"
        elif kind == "unknown_adapter":
            adapter, expect = rng.choice(["no-such-adapter", "", "A"]), "is not an added adapter"
        elif kind in ("abort_unknown", "abort_finished"):
            expect = "is not a running or waiting request"
        return Request(index, kind, prompt, sampling, adapter, expect=expect)

    def draw(self, n: int) -> list[Request]:
        """n requests, a --bad_rate share of them bad (of a kind drawn from BAD_KINDS)."""
        return [self.bad(i, BAD_KINDS[int(self.rng.integers(len(BAD_KINDS)))]) if self.rng.random() < FLAGS.bad_rate
                else self.good(i) for i in range(n)]
