"""The engine's adapter registry: a host store of adapters by name, the model runner's S device slots,
least-recently-used swapping, and a reference count per slot of the running sequences that use it.

Plain host-side Python that touches no device. The scheduler calls `acquire(seq)` as it admits a
sequence and `release(seq)` as the sequence stops running (finished, aborted or preempted).
Acquiring an adapter that is not in a slot assigns it one: an empty slot if there is one, else the
least recently used slot that no running sequence uses (evicting its adapter, which stays in the
host store and comes back when asked for), and queues the write; the engine takes the queued
writes (`take_loads`) and has its runner make them before the step that uses them. When every slot
is in use by running sequences, acquire returns False and the sequence waits. Loads, evictions and
the time the writes took (`loaded`) are counted in `stats`.
"""

from __future__ import annotations

import collections
import os

from jaxinfer.lora.adapter import LoraAdapter, check_fits, load_adapter
from jaxinfer.models.config import ModelConfig


class AdapterRegistry:
    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int):
        self.cfg, self.num_slots, self.max_rank = cfg, num_slots, max_rank
        self._loads: list[tuple[int, LoraAdapter]] = []  # (slot, adapter) writes assigned, not yet made
        self.store: dict[str, LoraAdapter] = {}
        self.salt: dict[str, int] = {}  # a fresh prefix-cache salt per add (a name added again is a new adapter)
        self._adds = 0
        self.slot_of: dict[str, int] = {}  # resident adapters
        self.adapter_in: list[str | None] = [None] * num_slots
        self.refs = [0] * num_slots  # running sequences using each slot
        self._recency: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(num_slots))
        self.stats: collections.Counter = collections.Counter()  # lora_loads, lora_evictions, lora_swap_s

    # The host store ------------------------------------------------------------------------------

    def add(self, name: str, adapter: LoraAdapter | str | os.PathLike) -> LoraAdapter:
        """Check an adapter (or load one from a PEFT directory) and keep it under `name`. Raises
        ValueError, leaving the registry unchanged, for a taken name, an engine without slots, a
        rank over max_lora_rank or an adapter that does not fit the model."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name {name!r} must be a non-empty string")
        if name in self.store:
            raise ValueError(f"adapter {name!r} is already added (remove_adapter it first)")
        if self.num_slots == 0:
            raise ValueError("the engine has no adapter slots: build it with EngineConfig(max_adapters=S)")
        if not isinstance(adapter, LoraAdapter):
            adapter = load_adapter(adapter, name=name)
        if adapter.rank > self.max_rank:
            raise ValueError(f"adapter {name!r} has rank {adapter.rank}, over max_lora_rank={self.max_rank}")
        check_fits(adapter, self.cfg, f"adapter {name!r}")
        self.store[name] = adapter
        self._adds += 1
        self.salt[name] = hash(("lora", self._adds))
        return adapter

    def remove(self, name: str, users: int) -> None:
        """Forget an adapter that `users` waiting or running requests use (refused unless 0)."""
        self.check(name)
        if users:
            raise ValueError(f"adapter {name!r} is used by {users} waiting or running sequences: finish or abort "
                             "them first")
        del self.store[name], self.salt[name]
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self.adapter_in[slot] = None
            self._recency.move_to_end(slot, last=False)  # the first to reuse

    def check(self, name: str | None) -> None:
        """ValueError unless name is None (the base model) or an added adapter."""
        if name is not None and (not isinstance(name, str) or name not in self.store):
            known = ", ".join(map(repr, sorted(self.store))) or "none"
            raise ValueError(f"adapter={name!r} is not an added adapter (added: {known})")

    # Slots ---------------------------------------------------------------------------------------

    def acquire(self, seq) -> bool:
        """Give a sequence about to run its adapter's slot (seq.lora_slot), loading the adapter if
        it is not resident; False (nothing changed) when every slot is in use by running sequences."""
        if seq.adapter is None:
            return True
        slot = self.slot_of.get(seq.adapter)
        if slot is None:
            slot = next((s for s in self._recency if self.refs[s] == 0), None)  # least recently used first
            if slot is None:
                return False
            self._load(slot, seq.adapter)
        self.refs[slot] += 1
        self._recency.move_to_end(slot)
        seq.lora_slot = slot
        return True

    def release(self, seq) -> None:
        """The sequence stopped running: its slot reference is dropped."""
        if seq.lora_slot >= 0:
            self.refs[seq.lora_slot] -= 1
            seq.lora_slot = -1

    def _load(self, slot: int, name: str) -> None:
        evicted = self.adapter_in[slot]
        if evicted is not None:
            del self.slot_of[evicted]
            self.stats["lora_evictions"] += 1
        self._loads.append((slot, self.store[name]))
        self.adapter_in[slot], self.slot_of[name] = name, slot
        self.stats["lora_loads"] += 1

    def take_loads(self) -> list[tuple[int, LoraAdapter]]:
        """The slot writes acquire assigned since the last call, in order, to be made before the next step."""
        loads, self._loads = self._loads, []
        return loads

    def loaded(self, seconds: float) -> None:
        """The queued writes were made on the device, taking this long."""
        self.stats["lora_swap_s"] += seconds

    def metrics(self) -> dict[str, float]:
        return {"lora_loads": float(self.stats["lora_loads"]), "lora_evictions": float(self.stats["lora_evictions"]),
                "lora_swap_s": float(self.stats["lora_swap_s"]), "adapters": float(len(self.store)),
                "adapters_resident": float(len(self.slot_of)),
                "adapter_host_bytes": float(sum(a.nbytes for a in self.store.values()))}

    def check_invariants(self, running) -> None:
        """Each slot's count equals the running sequences on it, and each holds its own adapter."""
        counts = collections.Counter(s.lora_slot for s in running if s.lora_slot >= 0)
        assert [counts[s] for s in range(self.num_slots)] == self.refs, (counts, self.refs)
        for seq in running:
            assert (seq.lora_slot < 0) == (seq.adapter is None), seq
            assert seq.adapter is None or self.adapter_in[seq.lora_slot] == seq.adapter
        assert all(self.adapter_in[s] == n for n, s in self.slot_of.items())
