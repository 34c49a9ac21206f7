"""What a mixture of experts costs, per layer and per token: one expert's weight shapes and
parameters, the parameters a token uses, and the experts a decode step touches (the planner in
jaxinfer.memory reads these)."""

from __future__ import annotations

from jaxinfer.models import family as family_lib
from jaxinfer.models.config import ModelConfig


def _expert_shapes(cfg: ModelConfig, tp: int = 1) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of one expert's weights in one layer (gate, up, down for the MoE families;
    none for a dense model): one card's shard, split over tp on the expert's F axis."""
    out = []
    for p in cfg.family.present(cfg):
        if p.role in family_lib.EXPERT_ROLES:
            fan_in, fan_out = p.shape(cfg)[1:]
            out.append((fan_in // tp, fan_out) if p.role == "expert_row" else (fan_in, fan_out // tp))
    return out


def expert_params(cfg: ModelConfig) -> int:
    """Parameters of one expert in one layer (0 for a dense model)."""
    return sum(i * o for i, o in _expert_shapes(cfg))


def moe_layers(cfg: ModelConfig) -> int:
    """The layers with experts: every layer of a mixture of experts but DeepSeek's dense first ones."""
    return cfg.num_layers - cfg.first_k_dense if cfg.num_experts else 0


def active_params(cfg: ModelConfig) -> int:
    """Parameters one token's forward pass uses: all of them, less the experts it is not routed to
    (num_experts - experts_per_token per layer with experts)."""
    return cfg.num_params() - moe_layers(cfg) * (cfg.num_experts - cfg.experts_per_token) * expert_params(cfg)


def experts_touched(cfg: ModelConfig, batch: int) -> float:
    """Expected experts one layer reads in a decode step of `batch` tokens, each routed to k of E
    experts uniformly at random: E (1 - (1 - k / E) ** batch). k at batch 1, E for a large batch.
    (Real routers are not uniform: their skew makes fewer experts touched; this is the upper model.)"""
    if not cfg.num_experts:
        return 0.0
    E, k = cfg.num_experts, cfg.experts_per_token
    return E * (1.0 - (1.0 - k / E) ** batch)
