"""The batched, jittable sampler: per-row keys, the processing stage, the top-k / top-p / min-p
filter, the draw, and log-probabilities.

Every row carries its own parameters and seed, so a row's token depends on its own logits alone,
never on the batch. The token with index t among a request's generated tokens is drawn with the
key fold_in(PRNGKey(seed), t) (`row_keys`, the one key derivation of the project) as

    argmax over the kept tokens v of  logits'[v] / temperature + G[v],   G = Gumbel noise (V,) of that key

(the Gumbel-max trick: a draw from the filtered softmax). The noise is indexed by token id, not by
rank, so two distributions drawn with one key pick the same token as often as they can: a drafter
that draws with the target's key for the same index proposes the token the target will draw
whenever the two distributions allow it, and the acceptance rule (jaxinfer/speculative/accept.py)
keeps exactly the tokens plain decoding would draw (drafter-invariant speculative sampling;
Daliri, Musco and Suresh 2024, "Coupling without communication and drafter-invariant speculative
decoding"). That makes a request's tokens independent of its batch under speculative decoding
too: whether a token comes from a plain step or a verify pass, it is the same token.

The serving programs sample through `sample_checked`: a row whose model logits hold a NaN or an
infinity gets the token NONFINITE instead, so the check travels back in the token array itself (no
extra transfer) and the engine fails that request alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.buckets import next_power_of_2
from jaxinfer.sampling import processors
from jaxinfer.sampling.params import MAX_LOGPROBS, SamplingParams
from jaxinfer.sampling.processors import Context, Row, RowLike, Vocab

NONFINITE = -1  # the token of a row whose logits are not all finite
_GREEDY = SamplingParams(temperature=0.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LogprobsRequest:
    """processed (R,) bool: the row wants its processed distribution's log-probabilities (else the
    raw log-softmax); top_n (static): alternatives returned per token (a bucket of the rows' asks)."""

    processed: jax.Array
    top_n: int = dataclasses.field(default=0, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters as arrays (R rows), built on the host (numpy).

    temperature (R,) f32; top_k (R,) i32; top_p (R,) f32; min_p (R,) f32; seed (R,) u32.
    processors: {name: arrays} of the processors some row asks for (processors.py), or None.
    logprobs: a LogprobsRequest when some row asks for log-probabilities, or None.
    None fields are not traced: a batch that asks for neither runs the plain sampler's program.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    seed: jax.Array
    processors: dict | None = None
    logprobs: LogprobsRequest | None = None

    @classmethod
    def from_rows(cls, rows: Sequence[RowLike | None], size: int | None = None, vocab: Vocab | None = None,
                  drafts: processors.Drafts | None = None, drafting: bool = False) -> SamplingBatch:
        """The rows' parameters (and their processors' arrays), padded with greedy rows to `size`.
        vocab: the model's, needed when a row asks for a processor. drafts: a verify pass's; the
        batch then has a row per position (R * drafts.positions, row r's position j at r * C + j),
        as `repeat` would make it, with the arrays of processors filled per position (the grammar's
        masks). drafting: a drafter's rows (processors.fill)."""
        rows = list(rows) + [None] * ((size or len(rows)) - len(rows))
        params = [r.sampling if r is not None else _GREEDY for r in rows]
        asks = [p.logprobs for p in params if p.logprobs is not None]
        n = 1 if drafts is None else drafts.positions
        each = lambda values, dtype: np.repeat(np.asarray(values, dtype), n)
        logprobs = None
        if asks:
            logprobs = LogprobsRequest(each([p.logprobs_mode == "processed" for p in params], np.bool_),
                                       top_bucket(asks))
        return cls(
            temperature=each([p.temperature for p in params], np.float32),
            top_k=each([min(p.top_k, 2**31 - 1) for p in params], np.int32),  # any k over V: no cut
            top_p=each([p.top_p for p in params], np.float32),
            min_p=each([p.min_p for p in params], np.float32),
            seed=each([r.seed if r is not None else 0 for r in rows], np.uint32),
            processors=processors.fill(rows, vocab, drafts, drafting),
            logprobs=logprobs,
        )

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], seeds: Sequence[int],
                    vocab: Vocab | None = None) -> SamplingBatch:
        """Rows with no tokens so far (penalties then count only the context's tokens)."""
        return cls.from_rows([Row(p, s) for p, s in zip(params, seeds)], vocab=vocab)

    def repeat(self, n: int) -> SamplingBatch:
        """Each row repeated n times in place (R * n rows): one row per position of a verify pass."""
        return jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x), n, axis=0), self)

    def per_position(self, rows: int, n: int) -> SamplingBatch:
        """A verify pass's batch of `rows` rows with n positions each, one row per position:
        repeated, unless built per position already (from_rows with drafts)."""
        return self if self.temperature.shape[0] == rows * n else self.repeat(n)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """token (R,) f32: the drawn token's log-probability; top_ids (R, N) int32 and top (R, N) f32:
    the N most likely tokens and theirs, most likely first; rank (R,) int32: the token's rank (1:
    the most likely), computed for prompt tokens only (None otherwise)."""

    token: jax.Array
    top_ids: jax.Array
    top: jax.Array
    rank: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampled:
    """tokens (R,) int32; logprobs: TokenLogprobs, when the batch asked for them."""

    tokens: jax.Array
    logprobs: TokenLogprobs | None = None

    def reshape(self, *shape) -> Sampled:
        return jax.tree.map(lambda x: x.reshape(*shape, *x.shape[1:]), self)


@dataclasses.dataclass(frozen=True)
class Logprob:
    """One token's log-probability, and its request's top alternatives as (token id,
    log-probability), most likely first (as many as SamplingParams.logprobs, or prompt_logprobs
    for a prompt token, asked)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None  # the token's rank among all (1: the most likely); prompt tokens only


def host_logprobs(lp: TokenLogprobs | None, rows, params: Sequence[SamplingParams]) -> list[Logprob | None]:
    """Logprob of rows[i] of host arrays lp for params[i] (None where params[i] did not ask)."""
    if lp is None:
        return [None] * len(params)
    return [None if p.logprobs is None else host_logprob(lp, r, p.logprobs) for r, p in zip(rows, params)]


def host_logprob(lp: TokenLogprobs, row, n: int) -> Logprob:
    """The Logprob of row `row` (an index into lp's leading axes) of host arrays lp, n alternatives."""
    return Logprob(float(lp.token[row]), tuple(zip(lp.top_ids[row][:n].tolist(), lp.top[row][:n].tolist())),
                   None if lp.rank is None else int(lp.rank[row]))


def row_keys(seed: jax.Array, step: jax.Array) -> jax.Array:
    """seed (R,) u32, step (R,) int32 -> each row's key for its token `step`: fold_in(key(seed), step)."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seed, step)


def process(logits: jax.Array, sp: SamplingBatch, step: jax.Array, recent: jax.Array | None = None) -> jax.Array:
    """logits (R, V) through the batch's processors (none: unchanged)."""
    if sp.processors is None:
        return logits
    return processors.apply(logits, sp.processors, Context(step, recent))


def scaled(logits: jax.Array, sp: SamplingBatch) -> jax.Array:
    """logits (R, V) / each row's temperature (greedy rows: 1). A banned token (-inf: a mask, a
    grammar) stays -inf: at a temperature near float32's largest, XLA's division by multiplying with
    the reciprocal would make it -inf * 0 = NaN, and a NaN row draws token 0."""
    t = jnp.where(sp.temperature > 0, sp.temperature, 1.0)[:, None]
    return jnp.where(logits == -jnp.inf, -jnp.inf, logits / t)


def keep_mask(x: jax.Array, sp: SamplingBatch) -> jax.Array:
    """x (R, V) temperature-scaled logits -> (R, V) bool, the tokens each row may draw, as HF's
    warpers chain them: top-k (ties with the k-th kept), then top-p over the top-k renormalised
    distribution (the smallest prefix by probability whose mass reaches top_p; top_p = 1 keeps
    all), and min-p (probability >= min_p times the largest). Only a batch with a top-k or top-p
    row pays for the sort."""
    keep = x - jnp.max(x, axis=-1, keepdims=True) >= jnp.log(sp.min_p)[:, None]
    cut = jnp.any(sp.top_k > 0) | jnp.any(sp.top_p < 1)
    return jax.lax.cond(cut, lambda: keep & _sorted_cuts(x, sp), lambda: keep)


def _sorted_cuts(x: jax.Array, sp: SamplingBatch) -> jax.Array:
    R, V = x.shape
    values = -jnp.sort(-x, axis=-1)  # (R, V) descending
    kth = jnp.take_along_axis(values, jnp.clip(sp.top_k - 1, 0, V - 1)[:, None], axis=-1)
    top_k = sp.top_k[:, None] > 0
    probs = jax.nn.softmax(jnp.where(top_k & (values < kth), -jnp.inf, values), axis=-1)
    kept = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < sp.top_p[:, None], axis=-1)  # >= 1
    last = jnp.take_along_axis(values, jnp.maximum(kept - 1, 0)[:, None], axis=-1)  # smallest kept value
    return (~top_k | (x >= kth)) & ((sp.top_p[:, None] >= 1) | (x >= last))


def draw(logits: jax.Array, sp: SamplingBatch, step: jax.Array, recent: jax.Array | None = None) -> Sampled:
    """logits (R, V) float32 -> Sampled: token ids (R,) and, when the batch asks, log-probabilities.
    `step` (R,) is each row's token index; `recent` (R, J) the tokens drawn since the batch's
    processor arrays were filled (processors.Context).

    Greedy rows (temperature 0) take the argmax of the processed logits. Sampled rows draw with
    Gumbel noise (the module docstring), only when some row samples (a lax.cond), so an
    all-greedy batch pays for an argmax alone; the filter's sort runs only when some row has a
    top-k or top-p cut, so plain temperature sampling pays for the noise and an argmax."""
    x = process(logits, sp, step, recent)
    greedy = jnp.argmax(x, axis=-1).astype(jnp.int32)
    sampled = jax.lax.cond(jnp.any(sp.temperature > 0), _gumbel_draw, lambda *_: greedy, x, sp, step)
    tokens = jnp.where(sp.temperature > 0, sampled, greedy)
    return Sampled(tokens, None if sp.logprobs is None else _logprobs(logits, x, sp, tokens))


def _gumbel_draw(x: jax.Array, sp: SamplingBatch, step: jax.Array) -> jax.Array:
    V = x.shape[1]
    s = scaled(x, sp)
    noise = jax.vmap(lambda key: jax.random.gumbel(key, (V,), jnp.float32))(row_keys(sp.seed, step))
    return jnp.argmax(jnp.where(keep_mask(s, sp), s + noise, -jnp.inf), axis=-1).astype(jnp.int32)


def _logprobs(raw: jax.Array, x: jax.Array, sp: SamplingBatch, tokens: jax.Array) -> TokenLogprobs:
    """Log-probabilities of the raw logits (R, V), or for rows that ask, of the processed
    distribution the token was drawn from: processors, temperature (greedy rows: 1), the cuts."""
    lp = jax.nn.log_softmax(raw, axis=-1)

    def processed():
        s = scaled(x, sp)
        return jnp.where(sp.logprobs.processed[:, None], jax.nn.log_softmax(jnp.where(keep_mask(s, sp), s, -jnp.inf),
                                                                            axis=-1), lp)

    lp = jax.lax.cond(jnp.any(sp.logprobs.processed), processed, lambda: lp)
    return _pick(lp, tokens, sp.logprobs.top_n)


def _pick(lp: jax.Array, tokens: jax.Array, top_n: int) -> TokenLogprobs:
    """Of log-probabilities lp (T, V): tokens' (T,) and the top_n largest, with their token ids."""
    token = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    if top_n == 0:
        empty = jnp.zeros((lp.shape[0], 0))
        return TokenLogprobs(token, empty.astype(jnp.int32), empty)
    top, top_ids = jax.lax.top_k(lp, top_n)
    return TokenLogprobs(token, top_ids.astype(jnp.int32), top)


def target_logprobs(logits: jax.Array, targets: jax.Array, top_n: int) -> TokenLogprobs:
    """The raw log-probabilities (log-softmax of logits (T, V)) of targets (T,) (an entry < 0 reads
    token 0's: unused) and the top_n most likely tokens: the prompt's log-probabilities."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    picked = _pick(lp, jnp.maximum(targets, 0), top_n)
    rank = 1 + jnp.sum(lp > picked.token[:, None], axis=-1, dtype=jnp.int32)
    return dataclasses.replace(picked, rank=rank)


def top_bucket(asks: Sequence[int]) -> int:
    """How many alternatives a batch computes when its rows ask for `asks` (a power of 2, at most
    MAX_LOGPROBS, so the batch compiles few programs; 0 when none asks for any)."""
    return min(next_power_of_2(max(asks)), MAX_LOGPROBS) if max(asks) else 0


def sample(logits: jax.Array, sp: SamplingBatch, step: jax.Array, recent: jax.Array | None = None) -> jax.Array:
    """`draw`'s tokens (R,) int32."""
    return draw(logits, sp, step, recent).tokens


def sample_checked(logits: jax.Array, sp: SamplingBatch, step: jax.Array,
                   recent: jax.Array | None = None) -> Sampled:
    """`draw`, with NONFINITE in place of the token of each row whose logits (R, V) hold a NaN or
    an infinity."""
    out = draw(logits, sp, step, recent)
    return dataclasses.replace(out, tokens=guard(out.tokens, logits))


def guard(tokens: jax.Array, logits: jax.Array) -> jax.Array:
    """tokens (...,) int32 sampled from logits (..., V) -> NONFINITE where a row's logits are not all finite."""
    return jnp.where(jnp.all(jnp.isfinite(logits), axis=-1), tokens, NONFINITE)
