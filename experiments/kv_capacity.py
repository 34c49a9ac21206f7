"""Which model fits which card, at what context and batch, and how fast decode can be at best.

For each card, prints one row per model: weights (GB), KV cache per 1K tokens (MB), the largest
context at batch 1 and at --batch, the largest batch at --context, and the decode roofline's
tokens/s at batch 1 and --context. Pure arithmetic (jaxinfer.memory): no device, no compilation.

  python -m experiments.kv_capacity --cards=rtx3080_10gb,h100_80gb --weight_format=int4-g128
"""

from __future__ import annotations

import dataclasses

from absl import flags

from jaxinfer import memory

from . import common

FLAGS = flags.FLAGS

for _name in ("out", "kv_dtype"):
    flags.declare_key_flag(_name)
_MODELS = flags.DEFINE_string("models", "all", "Comma-separated model names from configs/models, or 'all'.")
_CARDS = flags.DEFINE_string("cards", "all", "Comma-separated card names from configs/hardware, or 'all'.")
flags.declare_key_flag("kv_dtype")
KV_DTYPE = "bfloat16"  # default --kv_dtype here
SCALE_BYTES = 4  # the engine's float32 scale per token and kv head, for each of K and V, in an int8 / fp8 cache
_WEIGHT_FORMAT = flags.DEFINE_string(
    "weight_format", "bfloat16", f"Weight storage format: {memory.WEIGHT_FORMATS_HELP}."
)
_BATCH = flags.DEFINE_integer("batch", 8, "Batch size of the second max-context column (the first is 1).")
_CONTEXT = flags.DEFINE_integer(
    "context", 4096, "Tokens per sequence for the max-batch column and the roofline."
)
_RESERVE = flags.DEFINE_float(
    "reserve_fraction", 0.1, "Fraction of the card's memory kept for activations and runtime."
)
flags.declare_key_flag("out")

COLUMNS = ("model", "weights GB", "KV MB/1K tok", "model ctx", "max ctx b=1", "max ctx b={batch}",
           "max batch @{context}", "tok/s b=1")


def _names(value: str, known: list[str]) -> list[str]:
    return known if value == "all" else [name.strip() for name in value.split(",") if name.strip()]


def model_row(name: str, hw: memory.Hardware) -> dict:
    """One model on one card, with the settings from the flags; None where the weights do not fit."""
    cfg = memory.load_model_config(name)
    fmt, kv, reserve = _WEIGHT_FORMAT.value, FLAGS.kv_dtype or KV_DTYPE, _RESERVE.value
    scale = SCALE_BYTES if kv in memory.QUANTISED_KV_DTYPES else 0
    row = {
        "model": name,
        "params": cfg.num_params(),
        "weight_bytes": memory.weight_bytes(cfg, fmt),
        "kv_bytes_per_1k_tokens": memory.kv_cache_bytes(cfg, 1024, kv_dtype=kv, kv_scale_bytes=scale),
        "model_max_context": cfg.max_position_embeddings,
        "fits": True,
        "max_context_batch_1": None,
        "max_context_batch_n": None,
        "max_batch_at_context": None,
        "decode_tokens_per_s_batch_1": None,
    }
    try:
        row["kv_max_context_batch_1"] = memory.max_context(cfg, hw, 1, fmt, kv, reserve, scale)
    except memory.DoesNotFitError:
        row["fits"] = False
        return row
    row["kv_max_context_batch_n"] = memory.max_context(cfg, hw, _BATCH.value, fmt, kv, reserve, scale)
    # What the KV cache would hold, capped at what the model was trained for.
    for n in ("1", "n"):
        row[f"max_context_batch_{n}"] = min(row[f"kv_max_context_batch_{n}"], cfg.max_position_embeddings)
    row["max_batch_at_context"] = memory.max_batch(cfg, hw, _CONTEXT.value, fmt, kv, reserve, scale)
    roofline = memory.decode_roofline(cfg, hw, 1, _CONTEXT.value, fmt, kv, kv_scale_bytes=scale)
    row["decode_tokens_per_s_batch_1"] = roofline["tokens_per_s"]
    return row


def _cells(row: dict) -> list[str]:
    head = [row["model"], f"{row['weight_bytes'] / 1e9:.2f}", f"{row['kv_bytes_per_1k_tokens'] / 1e6:.1f}",
            f"{row['model_max_context']:,}"]
    if not row["fits"]:
        return head + ["weights do not fit", "", "", ""]
    def context(n):  # "(model)": the model's context is the limit, not memory
        capped = row[f"kv_max_context_batch_{n}"] > row["model_max_context"]
        return f"{row[f'max_context_batch_{n}']:,}" + (" (model)" if capped else "")

    return head + [context("1"), context("n"), f"{row['max_batch_at_context']:,}",
                   f"{row['decode_tokens_per_s_batch_1']:.1f}"]


def print_table(hw: memory.Hardware, rows: list[dict]) -> None:
    print(f"\n{hw.name}: {hw.memory_bytes / 1e9:.1f} GB, {hw.memory_bandwidth_bytes_per_s / 1e9:,.0f} GB/s, "
          f"{hw.peak_bf16_flops / 1e12:.1f} TFLOP/s bf16 | weights {_WEIGHT_FORMAT.value}, "
          f"KV {FLAGS.kv_dtype or KV_DTYPE}, reserve {_RESERVE.value:.0%}")
    header = [c.format(batch=_BATCH.value, context=_CONTEXT.value) for c in COLUMNS]
    table = [header] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))]
        print("  ".join(cells))


def main(argv: list[str]) -> None:
    del argv
    models = _names(_MODELS.value, memory.list_models())
    cards = _names(_CARDS.value, memory.list_hardware())
    cards_out, metrics = {}, {}
    for card in cards:
        hw = memory.load_hardware(card)
        rows = [model_row(name, hw) for name in models]
        print_table(hw, rows)
        cards_out[card] = {"hardware": dataclasses.asdict(hw), "rows": rows}
        metrics[card] = {row["model"]: row for row in rows}
    if FLAGS.out:
        common.write_json(FLAGS.out, common.record(__name__, metrics, cards=cards_out))


if __name__ == "__main__":
    common.run(main)
