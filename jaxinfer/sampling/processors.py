"""Logits processors: the stage of the jitted step between the model's logits and the draw.

A processor is a pure function on (logits (R, V), its per-row arrays, the context of the token
being drawn) plus the host function that fills those arrays from each row's SamplingParams and
tokens. Registered processors run in registration order, the built-ins first:

  token_mask   allowed_token_ids / bad_token_ids as a packed bitmask (R, ceil(V / 32)) int32:
               bit t % 32 of word t // 32 set = token t allowed (the layout llguidance and xgrammar
               fill, so a grammar stage can hand its masks to `apply_bitmask` as they are)
  grammar      SamplingParams.structured: the allowed tokens of the row's grammar matcher (the row's
               `grammar`, jaxinfer/structured) for its next token, as the same packed bitmask; the
               matcher follows each accepted token on the host, so its rows run single-step, filled
               late (below); a verify pass gets the mask after the drafts before each position
  min_tokens   EOS (unless ignore_eos) and stop_token_ids banned while step < min_tokens
  logit_bias   {token: bias} added
  penalties    repetition (prompt and output tokens, HF's and vLLM's rule), frequency and presence
               (output tokens, OpenAI's rule); counts made on the device from the row's tokens,
               padded to a power-of-two bucket, and the context's newer tokens

A batch carries the arrays of the processors at least one of its rows asks for
(SamplingBatch.processors; None when none does), so a batch where no row asks runs the plain
sampler's program, and each set of processors asked for is a program of its own. A row that does
not ask for a processor its batch carries gets neutral arrays (its logits are left as they are).

Each processor declares where its rows may run:
  multi_step  its arrays stay right for later tokens of one device call given the context (the
              token's index, and the tokens drawn since the arrays were filled): its rows may run
              several decode steps per call, and be drafted and verified speculatively
  overlap     its arrays may be filled while earlier tokens of the row are still on the device,
              unread: its rows may run in an overlapped (look-ahead) decode call
  late        its arrays are filled after the step's forward pass is dispatched, once every
              earlier token of the row is on the host: a decode call with such a row runs one
              step as two programs, the forward pass and then the draw, and the fill runs on the
              host while the device computes the logits; under overlap the next call's forward
              pass is dispatched before this call's tokens are read back, and its fill waits for
              them (so a late processor may run overlapped although its fill needs every token)
An engine runs a row whose processors forbid multi_step or overlap without it (single-step, not
overlapped), and refuses a speculative request whose processors are neither multi_step nor filled
per position (`fill_positions`: a verify pass's arrays for each of its positions, given the drafts;
the grammar's masks after the drafts before each position). A drafter's rows carry only the
multi_step processors (the others hold for the first drafted position alone).

A processor defined outside the library is asked for through `SamplingParams.extra_args[name]`:

  ban = Processor("ban", asks=lambda sp: "ban" in (sp.extra_args or {}),
                  fill=lambda rows, vocab: {"token": np.asarray([r.sampling.extra_args["ban"] if r else
                                                                 vocab.size for r in rows], np.int32)},
                  apply=lambda logits, a, ctx: logits.at[jnp.arange(len(logits)), a["token"]].set(
                      -jnp.inf, mode="drop"))
  register(ban)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.buckets import next_power_of_2
from jaxinfer.sampling.params import SamplingParams

Arrays = dict  # a processor's per-row arrays by name: numpy on the host, jax.Array in the step


@dataclasses.dataclass(frozen=True)
class Vocab:
    """What processors know of the model's vocabulary: its size and end-of-sequence ids."""

    size: int
    eos_ids: Collection[int] = frozenset()

    @classmethod
    def of(cls, model) -> Vocab:
        """A model's (jaxinfer.Model): its config's vocabulary size, and the end-of-sequence ids of
        its config and its tokenizer."""
        tokenizer = model.tokenizer
        return cls(model.config.vocab_size,
                   frozenset(model.config.eos_token_ids) | frozenset(tokenizer.eos_ids if tokenizer else ()))


class RowLike(Protocol):
    """A row to fill arrays for: an engine Sequence, or a Row."""

    sampling: SamplingParams
    seed: int
    tokens: Sequence[int]  # prompt and generated tokens so far
    prompt_len: int
    grammar: object  # a jaxinfer.structured Matcher at the row's next token (None: no constraint)


@dataclasses.dataclass(frozen=True)
class Row:
    sampling: SamplingParams
    seed: int = 0
    tokens: Sequence[int] = ()
    prompt_len: int = 0
    grammar: object = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Context:
    """Of the token being drawn: step (R,) int32, its index among the row's generated tokens;
    recent (R, J) int32 or None, tokens generated after the row's arrays were filled (earlier
    tokens of a multi-step call, or the drafts before a verified position), -1 for none."""

    step: jax.Array
    recent: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Drafts:
    """A verify pass's drafts, on the host: tokens (R, k) int32; parents (R, k) int32 for a tree
    (draft j's parent: 0 the root, i draft i) or None for a chain; counts[r] the drafts row r really
    has. Position 0 of a row is its next token's, position j its token after draft j."""

    tokens: np.ndarray
    parents: np.ndarray | None
    counts: Sequence[int]

    @property
    def positions(self) -> int:
        return self.tokens.shape[1] + 1

    def parent(self, row: int, j: int) -> int:
        """The position whose logits draw draft j (1-based): its parent's."""
        return j - 1 if self.parents is None else int(self.parents[row, j - 1])


@dataclasses.dataclass(frozen=True, eq=False)
class Processor:
    """name: its key in SamplingBatch.processors (and in SamplingParams.extra_args for one defined
    outside the library). asks(params): whether a request uses it. fill(rows, vocab): its arrays,
    one row each (None: a row that does not ask or pads; give it neutral values). apply(logits
    (R, V), arrays, context) -> logits (R, V). check(params, vocab): ValueError for a request it
    cannot serve (token ids outside the vocabulary), before any device work.
    fill_positions(rows, vocab, drafts): its arrays for every position of a verify pass, row r's
    position j at r * C + j (C = drafts.positions); None: the row's arrays repeated (multi_step)."""

    name: str
    asks: Callable[[SamplingParams], bool]
    fill: Callable[[list[RowLike | None], Vocab], Arrays]
    apply: Callable[[jax.Array, Arrays, Context], jax.Array]
    check: Callable[[SamplingParams, Vocab], None] | None = None
    multi_step: bool = True
    overlap: bool = True
    late: bool = False
    fill_positions: Callable[[list[RowLike | None], Vocab, Drafts], Arrays] | None = None


_REGISTRY: dict[str, Processor] = {}
_VERSION = [0]  # bumped when the registry changes: the processors a SamplingParams asks for are cached per version


def register(processor: Processor) -> Processor:
    """Add a processor after those registered; its name must be new."""
    if processor.name in _REGISTRY:
        raise ValueError(f"a logits processor named {processor.name!r} is already registered")
    _REGISTRY[processor.name] = processor
    _VERSION[0] += 1
    return processor


def unregister(name: str) -> None:
    if name not in _REGISTRY or name in BUILT_IN:
        raise ValueError(f"{name!r} is not a registered logits processor defined outside the library")
    del _REGISTRY[name]
    _VERSION[0] += 1


def asked(params: SamplingParams) -> tuple[Processor, ...]:
    """The registered processors a request asks for, in registration order. Asked once per
    registry version and kept on the (frozen) params: every step asks it of every row."""
    cached = params.__dict__.get("_asked")
    if cached is None or cached[0] != _VERSION[0]:
        cached = (_VERSION[0], tuple(p for p in _REGISTRY.values() if p.asks(params)))
        object.__setattr__(params, "_asked", cached)
    return cached[1]


def check(params: SamplingParams, vocab: Vocab, speculative: bool = False) -> None:
    """ValueError for a request the processors cannot serve: an extra_args name no processor
    claims, a token id outside the vocabulary, or (speculative) a processor that is not multi_step."""
    for name in params.extra_args or {}:
        if name not in _REGISTRY or name in BUILT_IN:
            raise ValueError(f"extra_args[{name!r}] names no registered logits processor "
                             f"({', '.join(n for n in _REGISTRY if n not in BUILT_IN) or 'none registered'})")
    for p in asked(params):
        if p.check is not None:
            p.check(params, vocab)
        if speculative and not p.multi_step and p.fill_positions is None:
            raise ValueError(f"logits processor {p.name!r} runs single-step and cannot be verified "
                             f"speculatively: drop it or serve the request without speculative decoding")


def may_multi_step(params: SamplingParams) -> bool:
    return all(p.multi_step for p in asked(params))


def may_overlap(params: SamplingParams) -> bool:
    return all(p.overlap or p.late for p in asked(params))


def by_position(params: SamplingParams) -> bool:
    """Whether a request asks for a processor whose verify-pass arrays are filled per position."""
    return any(p.fill_positions is not None for p in asked(params))


def is_late(params: SamplingParams) -> bool:
    """Whether a request asks for a processor filled after the forward pass (Processor.late)."""
    return any(p.late for p in asked(params))


def fill(rows: Sequence[RowLike | None], vocab: Vocab | None, drafts: Drafts | None = None,
         drafting: bool = False) -> dict[str, Arrays] | None:
    """The arrays of every processor some row asks for, by name (None: no row asks). drafts: a
    verify pass's, for arrays of each of its positions (rows * drafts.positions). drafting: for a
    drafter's rows, the multi_step processors only."""
    wanted = [asked(r.sampling) if r is not None else () for r in rows]
    if not any(wanted):
        return None
    out = {}
    for p in _REGISTRY.values():
        mine = [r if p in w else None for r, w in zip(rows, wanted)]
        if any(r is not None for r in mine) and not (drafting and not p.multi_step):
            if vocab is None:
                raise ValueError(f"logits processor {p.name!r} needs the model's vocabulary (pass vocab=)")
            if drafts is None:
                out[p.name] = p.fill(mine, vocab)
            elif p.fill_positions is not None:
                out[p.name] = p.fill_positions(mine, vocab, drafts)
            else:
                out[p.name] = {k: np.repeat(v, drafts.positions, axis=0) for k, v in p.fill(mine, vocab).items()}
    return out or None


def apply(logits: jax.Array, arrays: dict[str, Arrays], ctx: Context) -> jax.Array:
    """logits (R, V) through every processor in `arrays`, in registration order."""
    for name, p in _REGISTRY.items():
        if name in arrays:
            logits = p.apply(logits, arrays[name], ctx)
    return logits


# Helpers --------------------------------------------------------------------------------------


def pack_bitmask(allowed: np.ndarray) -> np.ndarray:
    """allowed (..., V) bool -> (..., ceil(V / 32)) int32 words, bit t % 32 of word t // 32 = token t."""
    V = allowed.shape[-1]
    W = -(-V // 32)
    bits = np.zeros((*allowed.shape[:-1], W * 32), np.uint32)
    bits[..., :V] = allowed
    words = np.sum(bits.reshape(*allowed.shape[:-1], W, 32) << np.arange(32, dtype=np.uint32), axis=-1,
                   dtype=np.uint32)
    return words.view(np.int32)


def apply_bitmask(logits: jax.Array, words: jax.Array) -> jax.Array:
    """logits (R, V) with -inf wherever the row's bitmask words (R, ceil(V / 32)) int32 clear the bit."""
    R, V = logits.shape
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # (R, W, 32)
    return jnp.where(bits.reshape(R, -1)[:, :V] == 1, logits, -jnp.inf)


def _ids(rows, ids_of, pad: int, minimum: int) -> np.ndarray:
    """(R, n) int32: each row's ids (rows that do not ask: none), padded with `pad` to a bucket."""
    lists = [list(ids_of(r)) if r is not None else [] for r in rows]
    out = np.full((len(rows), next_power_of_2(max(map(len, lists)), minimum)), pad, np.int32)
    for i, ids in enumerate(lists):
        out[i, : len(ids)] = ids
    return out


def _check_ids(name: str, ids, vocab: Vocab) -> None:
    bad = [t for t in ids if t >= vocab.size]
    if bad:
        raise ValueError(f"{name} holds token id {bad[0]}, outside the vocabulary of {vocab.size}")


def _rows(logits):
    return jnp.arange(logits.shape[0])[:, None]


# Built-in processors --------------------------------------------------------------------------


def _mask_fill(rows, vocab: Vocab) -> Arrays:
    allowed = np.ones((len(rows), vocab.size), np.bool_)
    for i, r in enumerate(rows):
        if r is not None:
            if r.sampling.allowed_token_ids is not None:
                allowed[i] = False
                allowed[i, list(r.sampling.allowed_token_ids)] = True
            allowed[i, list(r.sampling.bad_token_ids)] = False
    return {"words": pack_bitmask(allowed)}


def _mask_check(sp: SamplingParams, vocab: Vocab) -> None:
    _check_ids("allowed_token_ids", sp.allowed_token_ids or (), vocab)
    _check_ids("bad_token_ids", sp.bad_token_ids, vocab)
    if sp.allowed_token_ids is not None and set(sp.allowed_token_ids) <= set(sp.bad_token_ids):
        raise ValueError("bad_token_ids ban every one of allowed_token_ids: no token could be drawn")


def _grammar_fill(rows, vocab: Vocab) -> Arrays:
    words = np.full((len(rows), -(-vocab.size // 32)), -1, np.int32)  # (R, W): every token allowed
    for i, r in enumerate(rows):
        if r is not None:
            if getattr(r, "grammar", None) is None:
                raise ValueError("a row with SamplingParams.structured has no grammar matcher: structured output "
                                 "runs in an Engine (its matcher follows the row's tokens)")
            if r.grammar.complete or r.grammar.error is not None:
                continue  # its sequence has ended (a look-ahead row, dropped when read): no next token
            r.grammar.fill(words[i])
    return {"words": words}


def _grammar_positions(rows, vocab: Vocab, drafts: Drafts) -> Arrays:
    """The grammar's mask at every position of a verify pass: after the drafts on the path to it
    (its ancestors in a tree). A draft its parent's mask does not allow is never accepted (the
    target draws from masked logits there), so it and the positions after it keep every token
    allowed, unused; the matcher is walked there and back (rolled back), as the update then
    advances it over the tokens the pass emits."""
    C = drafts.positions
    words = np.full((len(rows), C, -(-vocab.size // 32)), -1, np.int32)  # (R, C, W)
    for i, r in enumerate(rows):
        if r is None:
            continue
        m = r.grammar
        if m is None or m.complete or m.error is not None:
            continue  # plain rows; a finished sequence's row is dropped
        m.fill(words[i, 0])
        paths, walked = {0: ()}, ()  # the tokens from the row's next one to each valid position; the matcher's
        for j in range(1, min(drafts.counts[i], C - 1) + 1):
            parent, token = drafts.parent(i, j), int(drafts.tokens[i, j - 1])
            if parent not in paths or not words[i, parent, token // 32] >> (token % 32) & 1:
                continue  # not allowed where it was drafted: never accepted
            path = paths[j] = (*paths[parent], token)
            common = next((n for n, (a, b) in enumerate(zip(walked, path)) if a != b), min(len(walked), len(path)))
            m.rollback(len(walked) - common)
            for t in path[common:]:
                m.advance(t)
            walked = path
            if m.complete:
                del paths[j]  # the output ends at this draft (its end-of-sequence): nothing follows it
            else:
                m.fill(words[i, j])
        m.rollback(len(walked))
    return {"words": words.reshape(len(rows) * C, -1)}


def _stop_ids(sp: SamplingParams, vocab: Vocab) -> list[int]:
    return sorted(set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(vocab.eos_ids)))


def _min_tokens_fill(rows, vocab: Vocab) -> Arrays:
    return {"ids": _ids(rows, lambda r: _stop_ids(r.sampling, vocab), vocab.size, 4),
            "min": np.asarray([r.sampling.min_tokens if r is not None else 0 for r in rows], np.int32)}


def _min_tokens_apply(logits, a: Arrays, ctx: Context):
    active = (ctx.step < a["min"])[:, None]
    return logits.at[_rows(logits), jnp.where(active, a["ids"], logits.shape[1])].set(-jnp.inf, mode="drop")


def _min_tokens_check(sp: SamplingParams, vocab: Vocab) -> None:
    _check_ids("stop_token_ids", sp.stop_token_ids, vocab)


def _bias_fill(rows, vocab: Vocab) -> Arrays:
    ids = _ids(rows, lambda r: r.sampling.logit_bias, vocab.size, 8)
    values = np.zeros(ids.shape, np.float32)
    for i, r in enumerate(rows):
        if r is not None:
            values[i, : len(r.sampling.logit_bias)] = list(r.sampling.logit_bias.values())
    return {"ids": ids, "values": values}


def _bias_apply(logits, a: Arrays, ctx: Context):
    return logits.at[_rows(logits), a["ids"]].add(a["values"], mode="drop")


def _penalties_fill(rows, vocab: Vocab) -> Arrays:
    def value(name, neutral):
        return np.asarray([getattr(r.sampling, name) if r is not None else neutral for r in rows], np.float32)

    return {"history": _ids(rows, lambda r: r.tokens, vocab.size, 16),
            "prompt_len": np.asarray([r.prompt_len if r is not None else 0 for r in rows], np.int32),
            "repetition": value("repetition_penalty", 1.0), "frequency": value("frequency_penalty", 0.0),
            "presence": value("presence_penalty", 0.0)}


def _penalties_apply(logits, a: Arrays, ctx: Context):
    """vLLM's apply_penalties: repetition over tokens seen in the prompt or the output, then
    frequency (per occurrence) and presence (once) over the output's tokens."""
    R, V = logits.shape
    rows, history = _rows(logits), a["history"]  # (R, L), padded with V
    in_prompt = jnp.arange(history.shape[1])[None, :] < a["prompt_len"][:, None]
    prompt_seen = jnp.zeros((R, V), jnp.bool_).at[rows, jnp.where(in_prompt, history, V)].set(True, mode="drop")
    output = jnp.where(in_prompt, V, history)
    if ctx.recent is not None:
        output = jnp.concatenate([output, jnp.where(ctx.recent >= 0, ctx.recent, V)], axis=1)
    counts = jnp.zeros((R, V), jnp.float32).at[rows, output].add(1.0, mode="drop")  # (R, V)
    rep = a["repetition"][:, None]
    logits = jnp.where(prompt_seen | (counts > 0), jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - a["frequency"][:, None] * counts - a["presence"][:, None] * (counts > 0)


_BUILT_IN = (
    Processor("token_mask", lambda sp: sp.allowed_token_ids is not None or bool(sp.bad_token_ids), _mask_fill,
              lambda logits, a, ctx: apply_bitmask(logits, a["words"]), _mask_check),
    # The matcher must see every token before the next mask: one token per call, filled once the
    # last token is read (late), while the device runs the forward pass.
    Processor("grammar", lambda sp: sp.structured is not None, _grammar_fill,
              lambda logits, a, ctx: apply_bitmask(logits, a["words"]), multi_step=False, overlap=False, late=True,
              fill_positions=_grammar_positions),
    Processor("min_tokens", lambda sp: sp.min_tokens > 0, _min_tokens_fill, _min_tokens_apply, _min_tokens_check),
    Processor("logit_bias", lambda sp: sp.logit_bias is not None, _bias_fill, _bias_apply,
              lambda sp, vocab: _check_ids("logit_bias", sp.logit_bias, vocab)),
    # The counts need every token of the row: with tokens in flight the host's view lacks some.
    Processor("penalties", lambda sp: (sp.repetition_penalty != 1 or sp.frequency_penalty != 0
                                       or sp.presence_penalty != 0), _penalties_fill, _penalties_apply,
              overlap=False),
)
BUILT_IN = frozenset(p.name for p in _BUILT_IN)
for _p in _BUILT_IN:
    register(_p)
