"""Scoring verbs over an engine: the log-likelihood of continuations given contexts, and of whole
texts in rolling windows, as EleutherAI's lm-evaluation-harness defines them (`loglikelihood`,
`loglikelihood_rolling`).

  engine.score(contexts, continuations)  -> [Score(logprob, greedy)] per pair
  engine.score_rolling(texts)            -> [sum of log-probabilities of every token of the text]

A pair runs as one request: the prompt context + continuation with prompt log-probabilities from
the continuation's first position on (`Engine.add_request(prompt_logprobs_from=)`), one greedy
token sampled and dropped. Its logprob is the sum of the continuation tokens' raw log-probabilities
(the model's log-softmax); greedy says whether each continuation token is the most likely one
given what precedes it (lm-eval's is_greedy: the argmax, ties to the lowest token id).

Pairs that share a context share its KV pages through the prefix cache: the pages holding context
tokens before the last context token are not needed for any log-probability, so a request may take
them from the cache. The cache only holds pages that a finished step computed, so when contexts
repeat, the first pair of each context runs first and the others after it (two rounds), and every
other pair computes only the context's last page (at most) and its continuation.

Text inputs are tokenised as lm-eval's `_encode_pair` does for a causal model: trailing whitespace
of the context moves to the continuation, the two are encoded together (no special tokens) and the
context's tokens split off; an empty context becomes the prefix token (the tokenizer's BOS, else
its EOS; a continuation that starts with it gives up that token instead). Token-id inputs are taken as they are (a context must not be empty).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import NamedTuple

from jaxinfer.sampling.params import SamplingParams

# One greedy token after the prompt (the engine samples when a prompt completes); it is dropped.
_SCORING = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, ignore_eos=True)


class Score(NamedTuple):
    logprob: float  # sum of the continuation tokens' log-probabilities
    greedy: bool  # every continuation token is the most likely one after what precedes it


def score(engine, contexts: Seq[str | Seq[int]], continuations: Seq[str | Seq[int]],
          adapter: str | None = None) -> list[Score]:
    """The Score of each (context, continuation) pair, in order, under an added LoRA adapter (None:
    the base model). ValueError naming the pair for a bad one (empty, off the vocabulary, longer
    than the engine's max_seq_len) or an unknown adapter, before any work. Runs the engine until
    the pairs are scored (other requests in it advance too)."""
    if isinstance(contexts, str) or isinstance(continuations, str) or len(contexts) != len(continuations):
        raise ValueError("contexts and continuations must be lists of equal length (strings or token-id lists)")
    if not len(contexts):
        raise ValueError("contexts must hold at least one context")
    engine.adapters.check(adapter)
    pairs = [_encode_pair(engine.model, ctx, cont, i) for i, (ctx, cont) in enumerate(zip(contexts, continuations))]
    prompts = [ctx + cont for ctx, cont in pairs]
    froms = [len(ctx) for ctx, _ in pairs]
    first: dict[tuple[int, ...], int] = {}
    for i, (ctx, _) in enumerate(pairs):
        first.setdefault(tuple(ctx), i)
    rounds = [list(range(len(pairs)))]
    if engine.allocator.prefix_cache and len(first) < len(pairs):
        leaders = set(first.values())
        rounds = [sorted(leaders), [i for i in range(len(pairs)) if i not in leaders]]
    logprobs: dict[int, list] = {}
    for members in rounds:
        logprobs.update(zip(members, _prompt_logprobs(engine, [prompts[i] for i in members],
                                                      [froms[i] for i in members], members, adapter)))
    out = []
    for i, (prompt, start) in enumerate(zip(prompts, froms)):
        entries = logprobs[i][start:]
        out.append(Score(sum(lp.logprob for lp in entries),
                         all(lp.top[0][0] == token for lp, token in zip(entries, prompt[start:]))))
    return out


def score_rolling(engine, texts: Seq[str | Seq[int]], max_length: int | None = None,
                  adapter: str | None = None) -> list[float]:
    """The log-likelihood of each whole text (a string, or token ids): every token's log-probability
    summed, over lm-eval's rolling windows of max_length tokens (`rolling_windows`; default the
    engine's max_seq_len - 1: a window's prompt holds max_length + 1 tokens)."""
    if isinstance(texts, str) or not len(texts):
        raise ValueError("texts must be a non-empty list of strings or token-id lists")
    max_length = engine.max_seq_len - 1 if max_length is None else max_length
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length < engine.max_seq_len:
        raise ValueError(f"max_length must be an integer in [1, {engine.max_seq_len - 1}] (the engine's "
                         f"max_seq_len - 1), got {max_length!r}")
    prefix = prefix_token(engine.model)
    windows, owner = [], []
    for i, text in enumerate(texts):
        tokens = _encode(engine.model, text, f"texts[{i}]")
        if not tokens:
            raise ValueError(f"texts[{i}] is empty")
        for window in rolling_windows(tokens, prefix, max_length):
            windows.append(window)
            owner.append(i)
    scores = score(engine, [c for c, _ in windows], [t for _, t in windows], adapter)
    totals = [0.0] * len(texts)
    for i, s in zip(owner, scores):
        totals[i] += s.logprob
    return totals


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int,
                    context_len: int = 1) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that together predict every token once, as lm-eval's
    `get_rolling_token_windows` followed by `make_disjoint_window` (lm_eval/utils.py) make them:
    the first window predicts the first max_length tokens after the prefix token; each later one
    predicts up to max_length - context_len + 1 more, conditioned on the max_length + 1 - (its
    prediction count) tokens before them."""
    if not 1 <= context_len <= max_length:
        raise ValueError(f"context_len must be in [1, max_length={max_length}], got {context_len}")
    if not tokens:
        return []
    windows = []
    pred_len = max_length - context_len + 1
    first = min(max_length, len(tokens))
    windows.append(([prefix_token] + tokens[: first - 1], tokens[:first]))
    predicted = first
    while predicted < len(tokens):
        count = min(len(tokens) - predicted, pred_len)
        end = predicted + count
        windows.append((tokens[end - max_length - 1 : end - 1], tokens[end - count : end]))
        predicted += count
    return [(inputs[: len(inputs) - (len(pred) - 1)], pred) for inputs, pred in windows]


def _prompt_logprobs(engine, prompts: list[list[int]], froms: list[int], index: list[int],
                     adapter: str | None) -> list[list]:
    """Run prompts as scoring requests (log-probabilities from froms[i] on); their prompt_logprobs."""
    ids = engine.add_all((f"pair {i} (contexts[{i}] + continuations[{i}])",
                          {"prompt": prompt, "sampling": _SCORING, "adapter": adapter, "prompt_logprobs_from": start})
                         for prompt, start, i in zip(prompts, froms, index))
    done = {}
    wanted = set(ids)
    while len(done) < len(ids) and engine.has_unfinished():
        done.update((o.request_id, o) for o in engine.step() if o.finished and o.request_id in wanted)
    out = []
    for rid, start, i in zip(ids, froms, index):
        o = done.get(rid)
        if o is None or o.finish_reason == "error" or any(lp is None for lp in o.prompt_logprobs[start:]):
            why = "it never ran" if o is None else o.error or f"it ended with {o.finish_reason!r} before its prompt ran"
            raise RuntimeError(f"pair {i} could not be scored: {why}")
        out.append(o.prompt_logprobs)
    return out


def _encode_pair(model, context, continuation, i: int) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of pair i, as lm-eval encodes a pair for a causal model."""
    if isinstance(context, str) != isinstance(continuation, str):
        raise ValueError(f"contexts[{i}] and continuations[{i}] must both be strings or both token-id lists")
    if isinstance(context, str):
        if not continuation:
            raise ValueError(f"continuations[{i}] is empty")
        if not context:  # the prefix token stands for it (unless the continuation starts with it)
            cont, prefix = _encode(model, continuation, f"continuations[{i}]"), prefix_token(model)
            return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = _encode(model, context + continuation, f"contexts[{i}]")
        ctx = _encode(model, context, f"contexts[{i}]")
        ctx, cont = whole[: len(ctx)], whole[len(ctx):]
    else:
        ctx, cont = _encode(model, context, f"contexts[{i}]"), _encode(model, continuation, f"continuations[{i}]")
        if not ctx:
            raise ValueError(f"contexts[{i}] is empty (token-id contexts need at least one token)")
    if not cont:
        raise ValueError(f"continuations[{i}] is empty after tokenisation")
    return ctx, cont


def _encode(model, text, name: str) -> list[int]:
    """A string's token ids (no special tokens), or a token-id list as a list of ints."""
    if isinstance(text, str):
        if model.tokenizer is None:
            raise ValueError(f"{name} is a string but the model has no tokenizer")
        return list(model.tokenizer.encode(text, add_special_tokens=False))
    if not hasattr(text, "__len__") or any(isinstance(t, bool) or not hasattr(t, "__index__") for t in text):
        raise ValueError(f"{name} must be a string or a list of token ids")
    return [int(t) for t in text]


def prefix_token(model) -> int:
    """The token an empty context becomes, as lm-eval's prefix_token_id: BOS, else EOS."""
    tok = model.tokenizer
    bos = tok.bos_id if tok is not None and tok.bos_id is not None else model.config.bos_token_id
    if bos is not None:
        return bos
    eos = tuple(tok.eos_ids if tok is not None else ()) + tuple(model.config.eos_token_ids)
    if not eos:
        raise ValueError("the model has neither a BOS nor an EOS token to stand for an empty context")
    return eos[0]
