"""The model runner: params, the paged KV cache and the jitted programs, behind the step contract.

The engine decides what runs (a StepPlan, jaxinfer/engine/step.py); the runner turns it into device
work and hands back a StepOutput:
  dispatch(plan)        pack the plan (jaxinfer/engine/batch.py) and start its program
                        (jaxinfer/engine/programs.py): a mixed step, a multi-step decode call, or a
                        verify pass with the acceptance rule (jaxinfer.speculative.accept)
  draw(pending)         start the draw of a decode call whose rows' logits processors are filled
                        late (structured output's grammar), once the host has the tokens before it
  collect(pending)      read its tokens back: per sequence, the tokens sampled for it
  execute(plan)         both at once; newest(pending): a decode call's last tokens, left on device
  copy_pages(copies)    copy-on-write of shared pages
  clear_pages(pages)    zero pages a failed request wrote
  load_adapter(slot, adapter)  write a LoRA adapter into a device slot (jaxinfer.lora)
  warmup(buckets)       compile every program shape a run can need, up front
Every shape is bucketed (batch.StepBucket, DecodeBucket, VerifyBucket); `buckets` records those
run, so a test can count the programs compiled.

With `features=True` the runner also keeps a feature cache: the final-norm hidden state of every
token it computes, stored by KV slot (the pages and slots of the KV cache), which feature-level
drafters (Medusa, EAGLE) read; with `feature_layers` (a drafter's request), each slot's row also
holds the hidden states entering those layers, after the final one: ((1 + A) * D,) per token.

With LoRA slots every program also takes them and each token's slot (BatchDescriptor.adapter_ids);
the slots have a fixed size, so adapters add no program shapes.

A model placed on a tensor-parallel mesh (jaxinfer.sharding; model.placement) keeps its params
there; the runner makes the KV cache split over KV heads on the same mesh, the feature cache and
LoRA slots as the sharding rules say, puts every step's host arrays on it replicated, and traces
and runs every program under the mesh. Nothing is re-placed between steps.

The runner also times the device from the host: the time it blocks on results (device_s) and
an estimate of the time the device sat idle waiting for the host (device_idle_s): from the moment
a blocking read found the device drained until the next dispatch.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import lora as lora_lib
from jaxinfer import sharding
from jaxinfer.buckets import next_power_of_2
from jaxinfer.engine import programs
from jaxinfer.engine.batch import Bucket, DecodeBucket, Layout, StepBucket, VerifyBucket
from jaxinfer.engine.lifecycle import sample_seed
from jaxinfer.engine.step import RowOutput, StepOutput, StepPlan
from jaxinfer.models import decoder as model_lib
from jaxinfer.models.kv_cache import PagedKVCache, copy_pages
from jaxinfer.sampling import processors
from jaxinfer.sampling.processors import Row, Vocab
from jaxinfer.sampling.sampler import NONFINITE, Sampled, SamplingBatch, TokenLogprobs, host_logprob, host_logprobs

TRACE_COUNTS = programs.TRACE_COUNTS  # how many times each jitted program was traced (= compiled)


@dataclasses.dataclass
class Dispatched:
    """A plan whose program is running: its device results, not read back yet."""

    plan: StepPlan
    sampled: Sampled  # tokens (and log-probabilities when asked); mixed: (R,) a token per logits row;
    # decode: (k, R); verify: (R, k + 1)
    extra: Sampled | None = None  # mixed: the forked samples' tokens
    accepted: jax.Array | None = None  # verify: (R,)
    rows: list[int] = dataclasses.field(default_factory=list)  # mixed: each prefill row's logits row
    prompt: TokenLogprobs | None = None  # mixed: the prompt chunks' log-probabilities (Rp, C), when asked
    prompt_from: list[int] = dataclasses.field(default_factory=list)  # mixed: each chunk's first token's position
    # decode with rows filled late: the forward pass's logits (R, V) and the rows' token indices (R,), on
    # device, until `draw` samples them (sampled is None until then)
    logits: jax.Array | None = None
    steps: jax.Array | None = None

    @property
    def tokens(self) -> jax.Array:
        return self.sampled.tokens


def _abstract(x) -> jax.ShapeDtypeStruct:
    """x's shape, dtype and, for a placed array, its sharding (the program compiled for it)."""
    placed = isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=x.sharding if placed else None)


def _completes_prompt(seq, n: int) -> bool:
    return seq.num_computed + n == len(seq.tokens)


def _forks(seq, n: int) -> int:
    """How many more samples a prefill row draws: a prompt's first token for samples 1..n-1."""
    first = _completes_prompt(seq, n) and not seq.generated and seq.sample_index == 0
    return seq.sampling.n - 1 if first else 0


class ModelRunner:
    def __init__(self, model, num_pages: int, page_size: int, max_seq_len: int, max_batch: int,
                 impl: model_lib.Impl, features: bool = False, kv_dtype: str | None = None,
                 lora: lora_lib.SlotConfig | None = None, feature_layers: tuple[int, ...] = ()):
        """max_batch: sequences running at once. features: keep the feature cache
        (num_pages * page_size, (1 + len(feature_layers)) * D). kv_dtype: None (the model dtype),
        "int8" or "fp8". lora: the LoRA adapter slots to hold (None: no adapters)."""
        cfg = model.config
        bad = [i for i in feature_layers if not 0 <= i < cfg.num_layers]
        if bad:
            raise ValueError(f"feature_layers {bad} are outside the model's {cfg.num_layers} layers")
        self.model, self.impl, self.feature_layers = model, impl, tuple(feature_layers)
        self.mesh = None if model.placement is None else model.placement.mesh
        self.lora_impl = "xla" if lora is None else lora.impl
        cfg, dtype = model.config, model.dtype
        self.lora = None if lora is None else lora_lib.LoraWeights.zeros(cfg, lora.num_slots, lora.rank, dtype)
        self.layout = Layout(num_pages, page_size, max_seq_len, max_batch, Vocab.of(model))
        self.page_size = page_size
        features_shape = (num_pages * page_size, (1 + len(self.feature_layers)) * cfg.hidden_size)
        if self.mesh is None:
            self.cache = PagedKVCache.zeros(cfg, num_pages + 1, page_size, dtype, kv_dtype)
            self.features = jnp.zeros(features_shape, dtype) if features else None
        else:
            self.cache = sharding.zeros_cache(cfg, num_pages + 1, page_size, dtype, kv_dtype, self.mesh)
            self.features = sharding.zeros(features_shape, dtype, self.mesh) if features else None
            if self.lora is not None:
                self.lora = sharding.put(self.lora, sharding.lora_specs(self.lora), self.mesh)
        # Allocate the cache now: dispatched asynchronously, its zero-fill (GBs for a long context)
        # would otherwise land in the first request's time to first token.
        jax.block_until_ready((self.cache, self.features))
        self.buckets: set[Bucket] = set()
        self.stats: collections.Counter = collections.Counter()  # device_s, device_idle_s, copied_pages, ...
        self.stats["adapter_device_bytes"] = 0 if self.lora is None else self.lora.nbytes
        self._last_dispatched: jax.Array | None = None
        self._idle_since: float | None = None

    def _put(self, tree):
        """Host arrays onto the device in one transfer (on a mesh: replicated on every device)."""
        return jax.device_put(tree, None if self.mesh is None else sharding.replicated(self.mesh))

    def _run(self, program, *args, **kwargs):
        """Run a program under the runner's mesh, its params, config and implementations given."""
        with sharding.use_mesh(self.mesh):
            return program(self.model.params, self.model.config, *args, impl=self.impl, lora_impl=self.lora_impl,
                           **kwargs)

    # The step contract -------------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> StepOutput:
        return self.collect(self.dispatch(plan))

    def dispatch(self, plan: StepPlan) -> Dispatched:
        """Start the plan's program. Its pages are reserved already; with plan.inputs (a look-ahead)
        the decode rows' input tokens are the last call's newest ones, on the device."""
        if plan.kind == "verify":
            return self._verify(plan)
        if plan.kind == "decode":
            return self._decode(plan)
        return self._mixed(plan)

    def collect(self, pending: Dispatched) -> StepOutput:
        """Read a dispatched plan back: per sequence, the tokens its rows sampled."""
        plan = pending.plan
        assert pending.sampled is not None, "a call whose rows are filled late is read before its draw"
        out = self._read_tree(pending.sampled)
        lp = out.logprobs  # host arrays, or None when no row asked
        if plan.kind == "verify":
            n = len(plan.decode)
            accepted = self._read(pending.accepted)[:n]
            return StepOutput([RowOutput(s, 1 + a, out.tokens[i, : a + 1].tolist(), release=True,
                                         logprobs=_logprobs(lp, s, range(a + 1), row=i))
                               for i, (s, a) in enumerate(zip(plan.decode, accepted.tolist()))], accepted=accepted)
        if plan.kind == "decode":  # tokens (k, R)
            return StepOutput([RowOutput(s, w, out.tokens[:w, i].tolist(),
                                         logprobs=_logprobs(lp, s, range(w), column=i))
                               for i, (s, w) in enumerate(zip(plan.decode, plan.num_steps))])
        sampled = out.tokens
        extra = None if pending.extra is None else self._read_tree(pending.extra)
        prompt = None if pending.prompt is None else self._read_tree(pending.prompt)
        rows = [RowOutput(s, 1, [int(sampled[i])], logprobs=_logprobs(lp, s, [i]))
                for i, s in enumerate(plan.decode)]
        used = 0
        for j, ((s, n), r) in enumerate(zip(plan.prefill, pending.rows)):
            forks = _forks(s, n)
            # A chunk that does not complete its prompt samples nothing, but its logits are checked too:
            # a prompt (or a preempted sequence being recomputed) whose state turned non-finite fails now.
            done = _completes_prompt(s, n) or sampled[r] == NONFINITE
            mine = range(used, used + forks)
            rows.append(RowOutput(s, n, [int(sampled[r])] if done else [], [int(extra.tokens[j]) for j in mine],
                                  logprobs=_logprobs(lp, s, [r]) if done else [],
                                  fork_logprobs=_logprobs(extra.logprobs, s, mine) if forks else [],
                                  prompt_logprobs=_prompt_logprobs(prompt, j, s, pending.prompt_from[j], n)))
            used += forks
        return StepOutput(rows)

    def newest(self, pending: Dispatched) -> jax.Array:
        """Each row's newest token of a dispatched decode call, left on device (the next call's input)."""
        last = np.zeros(pending.tokens.shape[1], np.int32)
        last[: len(pending.plan.num_steps)] = [max(w - 1, 0) for w in pending.plan.num_steps]
        with sharding.use_mesh(self.mesh):
            return self._put(programs.newest(pending.tokens, self._put(last)))  # replicated, as compiled

    def _mixed(self, plan: StepPlan) -> Dispatched:
        """One token of each decode sequence, then a chunk of each prefill sequence's prompt;
        samples every logits row, and draws the forked samples of a prompt that completes."""
        bucket = self.layout.step_bucket(plan.decode, plan.prefill)
        self.buckets.add(bucket)
        x = self._put(self.layout.mixed(bucket, plan.decode, plan.prefill))  # one transfer
        self._mark_dispatch()
        sampled, logits, _, self.cache, self.features, prompt = self._run(
            programs.mixed_step, x, self.cache, self.features, self.lora, feature_layers=self.feature_layers)
        self._last_dispatched = sampled.tokens
        self.stats["decode_tokens"] += len(plan.decode)
        self.stats["prefill_tokens"] += sum(n for _, n in plan.prefill)
        rows = [bucket.decode_rows + j for j in range(len(plan.prefill))]
        forks = [(r, s, i) for r, (s, n) in zip(rows, plan.prefill) for i in range(1, 1 + _forks(s, n))]
        extra = None
        if forks:  # more draws from their prompt's row, each with its own seed
            R = next_power_of_2(len(forks))
            idx, steps = np.zeros(R, np.int32), np.zeros(R, np.int32)
            idx[: len(forks)] = [r for r, _, _ in forks]
            sp = SamplingBatch.from_rows([Row(s.sampling, sample_seed(s.seed, i), s.tokens, s.prompt_len, s.grammar)
                                          for _, s, i in forks], R, self.layout.vocab)
            with sharding.use_mesh(self.mesh):
                extra = programs.sample_rows(logits, *self._put((idx, sp, steps)))
        return Dispatched(plan, sampled, extra=extra, rows=rows, prompt=prompt,
                          prompt_from=[s.num_computed for s, _ in plan.prefill])

    def _decode(self, plan: StepPlan) -> Dispatched:
        """Up to k decode steps of each row in one program, not read back. A call with a row whose
        logits processors are filled late (one step) runs the forward pass, then fills the rows'
        sampling arrays while the device computes it and starts the draw; a look-ahead call's draw
        waits for `draw`, once the last call's tokens are applied."""
        bucket = self.layout.decode_bucket(plan.decode, plan.num_steps)
        self.buckets.add(bucket)
        ahead = plan.ahead or [0] * len(plan.decode)
        late = any(processors.is_late(s.sampling) for s in plan.decode)
        x = self._put(self.layout.decode(bucket, plan.decode, plan.num_steps, ahead, sampling=not late))
        if plan.inputs is not None:  # the last call's newest tokens, already on the device
            x = x.replace(tokens=plan.inputs)
        self._mark_dispatch()
        self.stats["decode_tokens"] += sum(plan.num_steps)
        if late:
            assert bucket.steps == 1, "a call with rows filled late runs one step"
            logits, self.cache = self._run(programs.decode_logits, x, self.cache, self.lora)
            pending = Dispatched(plan, None, logits=logits, steps=x.steps)
            if not any(ahead):
                self.draw(pending)
            return pending
        sampled, self.cache = self._run(programs.multi_decode, x, self.cache, self.lora, num_steps=bucket.steps)
        self._last_dispatched = sampled.tokens
        return Dispatched(plan, sampled)

    def draw(self, pending: Dispatched) -> None:
        """Start the draw of a decode call whose rows' sampling arrays are filled late (nothing for
        any other): fill them from the rows as the host sees them now (every earlier token applied)
        and sample the forward pass's logits. stats: late_fills, and late_fills_hidden, those that
        were done before the forward pass was (the fill cost the device nothing)."""
        if pending.logits is None:
            return
        plan = pending.plan
        start = time.perf_counter()
        sp = SamplingBatch.from_rows(plan.decode, pending.logits.shape[0], self.layout.vocab)
        self.stats["late_fill_s"] += time.perf_counter() - start
        self.stats["late_fills"] += 1
        self.stats["late_fills_hidden"] += not pending.logits.is_ready()
        with sharding.use_mesh(self.mesh):
            pending.sampled = programs.draw(pending.logits, self._put(sp), pending.steps)
        pending.logits = None
        self._last_dispatched = pending.sampled.tokens

    def _verify(self, plan: StepPlan) -> Dispatched:
        """One target pass over each sequence's next token and its drafts (rows past the plan's
        sequences pad), writing their K/V from num_computed on, then the acceptance rule. A tree's
        accepted path has its K/V compacted into place."""
        proposal = plan.proposal
        drafts, parents = proposal.tokens, proposal.parents
        bucket = self.layout.verify_bucket(plan.decode, drafts.shape[1])
        self.buckets.add(bucket)
        x = self._put(self.layout.verify(bucket, plan.decode, plan.num_drafts, proposal))
        if self.mesh is not None:  # the drafter's arrays (host or one device) onto the mesh
            drafts, parents = self._put((drafts, parents))
        self._mark_dispatch()
        accepted, sampled, self.cache, self.features = self._run(
            programs.verify, x, drafts, self.cache, self.features, self.lora, parents, synthetic=plan.accept,
            feature_layers=self.feature_layers)
        self._last_dispatched = sampled.tokens
        self.stats["verify_tokens"] += sum(d + 1 for d in plan.num_drafts)
        return Dispatched(plan, sampled, accepted=accepted)

    # Cache and adapter upkeep ------------------------------------------------------------------

    def copy_pages(self, copies: list[tuple[int, int]]) -> None:
        src, dst = self._put(tuple(np.asarray(x, np.int32) for x in zip(*copies)))
        with sharding.use_mesh(self.mesh):
            self.cache = copy_pages(self.cache, src, dst)
            if self.features is not None:
                self.features = programs.copy_features(self.features, src, dst, page_size=self.page_size)
        self.stats["copied_pages"] += len(copies)

    def clear_pages(self, pages: list[int]) -> None:
        """Zero pages (and their feature slots) that a failed request wrote, so that no NaN or
        infinity it left there reaches the page's next owner: attention weighs a page's unwritten
        slots by zero, and zero times NaN is NaN. (One small program, compiled when first needed.)"""
        padded = np.full(next_power_of_2(len(pages)), self.cache.num_pages, np.int32)
        padded[: len(pages)] = pages
        with sharding.use_mesh(self.mesh):
            self.cache, self.features = programs.clear_pages(self.cache, self.features, self._put(padded))

    def load_adapter(self, slot: int, adapter: lora_lib.LoraAdapter | None) -> None:
        """Write an adapter (None: nothing) into a device slot, between steps; blocks until written."""
        if adapter is not None and self.model.placement is not None:  # wk / wv widened like the weights
            adapter = sharding.widen_adapter(adapter, self.model.config.head_dim, self.model.placement.kv_replicas)
        with sharding.use_mesh(self.mesh):
            self.lora = jax.block_until_ready(lora_lib.write_slot(self.lora, slot, adapter, self.model.config))

    # Warm-up -----------------------------------------------------------------------------------

    def warmup(self, buckets: list[Bucket], synthetic: float | None = None, tree: bool = False) -> int:
        """Compile the program of every bucket ahead of time, without running anything; returns
        how many programs this traced. Verify passes are compiled for the synthetic rate, or draft
        trees. (Forked samples, n > 1, draw through a small extra program; requests with logits
        processors or log-probabilities run programs of their own, and a drafter its own, compiled
        when first used.)"""
        before = sum(TRACE_COUNTS.values())
        state = jax.tree.map(_abstract, (self.model.params, self.cache, self.features, self.lora))
        with sharding.use_mesh(self.mesh):
            for bucket in buckets:
                self._compile(bucket, state, synthetic, tree)
        return sum(TRACE_COUNTS.values()) - before

    def _compile(self, bucket: Bucket, state, synthetic: float | None, tree: bool) -> None:
        """Lower and compile one bucket's program against its padding inputs (packed as a run packs them)."""
        params, cache, features, lora = state
        cfg, kw = self.model.config, dict(impl=self.impl, lora_impl=self.lora_impl)
        put = None if self.mesh is None else sharding.replicated(self.mesh)  # as _put places host arrays

        def spec(shape, dtype=jnp.int32, sharding_=put):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)

        def abstract(host):
            return jax.tree.map(_abstract, self._put(host))

        if isinstance(bucket, VerifyBucket):  # R rows of the next token and k drafts
            R, k, _ = bucket
            programs.verify.lower(params, cfg, abstract(self.layout.verify(bucket)), spec((R, k)), cache, features,
                                  lora, spec((R, k)) if tree else None, synthetic=synthetic,
                                  feature_layers=self.feature_layers, **kw).compile()
        elif isinstance(bucket, DecodeBucket):  # a k-step call of R rows, and the pick of its rows' newest tokens
            R, k, _ = bucket
            call = programs.multi_decode.lower(params, cfg, abstract(self.layout.decode(bucket)), cache, lora,
                                               num_steps=k, **kw).compile()
            programs.newest.lower(spec((k, R), sharding_=call.output_shardings[0].tokens if put else None),
                                  spec((R,))).compile()
        else:
            assert isinstance(bucket, StepBucket)
            programs.mixed_step.lower(params, cfg, abstract(self.layout.mixed(bucket)), cache, features, lora,
                                      feature_layers=self.feature_layers, **kw).compile()

    # Device timing: the device is taken to be idle from the moment the host last found it done
    # (a blocking read returned) until the next dispatch, if nothing was queued in between.

    def _mark_dispatch(self) -> None:
        now = time.perf_counter()
        queued = self._last_dispatched is not None and not self._last_dispatched.is_ready()
        if not queued and self._idle_since is not None:
            self.stats["device_idle_s"] += now - self._idle_since
        self._idle_since = None

    def no_work(self) -> None:
        """The device is idle for want of requests from here on, not waiting on the host."""
        self._idle_since = None

    def _wait(self, x: jax.Array) -> jax.Array:
        """Block until x is computed; if that drained the device, it is idle from now on."""
        t0 = time.perf_counter()
        jax.block_until_ready(x)
        t1 = time.perf_counter()
        self.stats["device_s"] += t1 - t0
        if self._last_dispatched is None or self._last_dispatched.is_ready():
            self._idle_since = t1
        return x

    def _read(self, x: jax.Array) -> np.ndarray:
        return sharding.to_host(self._wait(x))

    def _read_tree(self, tree):
        """Every array of a pytree (Sampled, TokenLogprobs, or None) on the host."""
        return jax.tree.map(self._read, tree)


def _prompt_logprobs(lp, row: int, seq, start: int, n: int) -> list:
    """(prompt position, Logprob) of each prompt token whose log-probability seq asks for among
    those that the logits of its chunk's n tokens from position `start` predict, from host arrays
    lp (Rp, C) of prompt chunk `row` ([] when the step computed none)."""
    if lp is None:
        return []
    return [(q, host_logprob(lp, (row, q - start - 1), seq.sampling.prompt_logprobs))
            for q in seq.wanted_prompt(start, n)]


def _logprobs(lp, seq, index, row: int | None = None, column: int | None = None) -> list:
    """The Logprob of each token `index` picks from host log-probability arrays lp, for seq's
    request (each None where it did not ask; [] where the batch asked for none): lp[row, j] for a
    verify row, lp[j, column] for a decode call's row, lp[j] for a mixed step's logits row j."""
    if lp is None:
        return []
    if row is not None:
        lp = jax.tree.map(lambda x: x[row], lp)
    elif column is not None:
        lp = jax.tree.map(lambda x: x[:, column], lp)
    return host_logprobs(lp, index, [seq.sampling] * len(index))
