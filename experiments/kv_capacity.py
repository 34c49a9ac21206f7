"""Which model fits which card, at what context and batch, and how fast decode can be at best.

For each card, prints one row per model: weights (GB), KV cache per 1K tokens (MB), the largest
context at batch 1 and at --batch, the largest batch at --context, and the decode roofline's
tokens/s at batch 1 and --context. Pure arithmetic (jaxinfer.memory): no device, no compilation.
With --tp=N every figure is per card of N running the model tensor-parallel (weights and KV heads
split, see jaxinfer/sharding.py), and with --ep=M (a mixture of experts) per card of N x M, the
experts split over M groups of N as well; --min_tp instead answers "how many cards of each kind": the
smallest tp whose cards hold the weights and --batch sequences of --context tokens.

  python -m jaxinfer.experiments.kv_capacity --cards=rtx3080_10gb,h100_80gb --weight_format=int4-g128
  python -m jaxinfer.experiments.kv_capacity --models=llama3_70b --tp=4 --cards=h100_80gb
  python -m jaxinfer.experiments.kv_capacity --models=mixtral_8x7b --ep=4 --cards=rtx3080_10gb
  python -m jaxinfer.experiments.kv_capacity --models=llama3_70b,llama3_8b --min_tp --context=8192 --batch=8
"""

from __future__ import annotations

import dataclasses

from absl import flags

from jaxinfer import memory

from . import common

FLAGS = flags.FLAGS

for _name in ("out", "kv_dtype", "tp", "ep"):
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
_MIN_TP = flags.DEFINE_bool("min_tp", False, "Report the smallest tp (cards of each kind) that holds each model's "
                            "weights and --batch sequences of --context tokens, instead of the capacity table.")
_MAX_TP = flags.DEFINE_integer("max_tp", 64, "The largest tp --min_tp tries.")
MIN_TP_COLUMNS = ("model", "cards (tp)", "weights GB/card", "KV GB/card", "free GB/card", "tok/s b={batch}")

COLUMNS = ("model", "weights GB", "KV MB/1K tok", "model ctx", "max ctx b=1", "max ctx b={batch}",
           "max batch @{context}", "tok/s b=1")


def _names(value: str, known: list[str]) -> list[str]:
    return known if value == "all" else [name.strip() for name in value.split(",") if name.strip()]


def model_row(name: str, hw: memory.Hardware) -> dict:
    """One model on one card, with the settings from the flags; None where the weights do not fit."""
    cfg = memory.load_model_config(name)
    fmt, kv, reserve, tp, ep = _WEIGHT_FORMAT.value, FLAGS.kv_dtype or KV_DTYPE, _RESERVE.value, FLAGS.tp, FLAGS.ep
    scale = SCALE_BYTES if kv in memory.QUANTISED_KV_DTYPES else 0
    try:
        memory.kv_heads_per_card(cfg, tp)
        memory.check_ep(cfg, ep)
    except ValueError as e:
        return {"model": name, "params": cfg.num_params(), "tp": tp, "ep": ep, "fits": False, "error": str(e)}
    row = {
        "model": name,
        "params": cfg.num_params(),
        "tp": tp,
        "ep": ep,
        "weight_bytes": memory.weight_bytes(cfg, fmt, tp, ep),
        "kv_bytes_per_1k_tokens": memory.kv_cache_bytes(cfg, 1024, kv_dtype=kv, kv_scale_bytes=scale, tp=tp),
        "model_max_context": cfg.max_position_embeddings,
        "fits": True,
        "max_context_batch_1": None,
        "max_context_batch_n": None,
        "max_batch_at_context": None,
        "decode_tokens_per_s_batch_1": None,
    }
    try:
        row["kv_max_context_batch_1"] = memory.max_context(cfg, hw, 1, fmt, kv, reserve, scale, tp, ep)
    except memory.DoesNotFitError:
        row["fits"] = False
        return row
    row["kv_max_context_batch_n"] = memory.max_context(cfg, hw, _BATCH.value, fmt, kv, reserve, scale, tp, ep)
    # What the KV cache would hold, capped at what the model was trained for.
    for n in ("1", "n"):
        row[f"max_context_batch_{n}"] = min(row[f"kv_max_context_batch_{n}"], cfg.max_position_embeddings)
    row["max_batch_at_context"] = memory.max_batch(cfg, hw, _CONTEXT.value, fmt, kv, reserve, scale, tp, ep)
    roofline = memory.decode_roofline(cfg, hw, 1, _CONTEXT.value, fmt, kv, kv_scale_bytes=scale, tp=tp, ep=ep)
    row["decode_tokens_per_s_batch_1"] = roofline["tokens_per_s"]
    return row


def _cells(row: dict) -> list[str]:
    if "error" in row:
        return [row["model"], row["error"], "", "", "", "", "", ""]
    head = [row["model"], f"{row['weight_bytes'] / 1e9:.2f}", f"{row['kv_bytes_per_1k_tokens'] / 1e6:.1f}",
            f"{row['model_max_context']:,}"]
    if not row["fits"]:
        return head + ["weights do not fit", "", "", ""]
    def context(n):  # "(model)": the model's context is the limit, not memory
        capped = row[f"kv_max_context_batch_{n}"] > row["model_max_context"]
        return f"{row[f'max_context_batch_{n}']:,}" + (" (model)" if capped else "")

    return head + [context("1"), context("n"), f"{row['max_batch_at_context']:,}",
                   f"{row['decode_tokens_per_s_batch_1']:.1f}"]


def min_tp_row(name: str, hw: memory.Hardware) -> dict:
    """The fewest cards of this kind for a model at --context x --batch, and what each card holds."""
    cfg = memory.load_model_config(name)
    fmt, kv, reserve = _WEIGHT_FORMAT.value, FLAGS.kv_dtype or KV_DTYPE, _RESERVE.value
    scale = SCALE_BYTES if kv in memory.QUANTISED_KV_DTYPES else 0
    batch, context = _BATCH.value, _CONTEXT.value
    tp = memory.min_tp(cfg, hw, batch, context, fmt, kv, reserve, scale, max_tp=_MAX_TP.value)
    row = {"model": name, "params": cfg.num_params(), "batch": batch, "context": context, "min_tp": tp}
    if tp is not None:
        row["weight_bytes_per_card"] = memory.weight_bytes(cfg, fmt, tp)
        row["kv_bytes_per_card"] = memory.kv_cache_bytes(cfg, context, batch, kv, scale, tp)
        row["free_bytes_per_card"] = (memory.usable_bytes(hw, reserve) - row["weight_bytes_per_card"]
                                      - row["kv_bytes_per_card"])
        roofline = memory.decode_roofline(cfg, hw, batch, context, fmt, kv, kv_scale_bytes=scale, tp=tp)
        row["decode_tokens_per_s"] = roofline["tokens_per_s"]
    return row


def _min_tp_cells(row: dict) -> list[str]:
    if row["min_tp"] is None:
        return [row["model"], f"none up to tp={_MAX_TP.value}", "", "", "", ""]
    gb = lambda key: f"{row[key] / 1e9:.2f}"  # noqa: E731
    return [row["model"], str(row["min_tp"]), gb("weight_bytes_per_card"), gb("kv_bytes_per_card"),
            gb("free_bytes_per_card"), f"{row['decode_tokens_per_s']:.1f}"]


def print_table(hw: memory.Hardware, rows: list[dict], columns=COLUMNS, cells=None) -> None:
    tp = f", per card of tp={FLAGS.tp}" if FLAGS.tp > 1 and columns is COLUMNS else ""
    tp += f", experts over ep={FLAGS.ep}" if FLAGS.ep > 1 and columns is COLUMNS else ""
    need = f" | smallest tp for {_BATCH.value} x {_CONTEXT.value:,} tokens" if columns is MIN_TP_COLUMNS else ""
    print(f"\n{hw.name}: {hw.memory_bytes / 1e9:.1f} GB, {hw.memory_bandwidth_bytes_per_s / 1e9:,.0f} GB/s, "
          f"{hw.peak_bf16_flops / 1e12:.1f} TFLOP/s bf16 | weights {_WEIGHT_FORMAT.value}, "
          f"KV {FLAGS.kv_dtype or KV_DTYPE}, reserve {_RESERVE.value:.0%}{tp}{need}")
    header = [c.format(batch=_BATCH.value, context=_CONTEXT.value) for c in columns]
    table = [header] + [(cells or _cells)(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))]
        print("  ".join(cells))


def main(argv: list[str]) -> None:
    del argv
    models = _names(_MODELS.value, memory.list_models())
    cards = _names(_CARDS.value, memory.list_hardware())
    cards_out, metrics = {}, {}
    for name, value in (("tp", FLAGS.tp), ("ep", FLAGS.ep), ("batch", _BATCH.value), ("context", _CONTEXT.value),
                        ("max_tp", _MAX_TP.value)):
        if value < 1:
            raise ValueError(f"--{name}={value} must be >= 1")
    if not 0 <= _RESERVE.value < 1:
        raise ValueError(f"--reserve_fraction={_RESERVE.value} must be in [0, 1)")
    if not models or not cards:
        raise ValueError("--models and --cards each need at least one name")
    for flag, names, load in (("models", models, memory.load_model_config), ("cards", cards, memory.load_hardware)):
        for name in names:
            try:
                load(name)  # an unknown name fails here, before any row
            except ValueError as e:
                raise ValueError(f"--{flag}: {e}") from None
    for card in cards:
        hw = memory.load_hardware(card)
        if _MIN_TP.value:
            rows = [min_tp_row(name, hw) for name in models]
            print_table(hw, rows, MIN_TP_COLUMNS, _min_tp_cells)
        else:
            rows = [model_row(name, hw) for name in models]
            print_table(hw, rows)
        cards_out[card] = {"hardware": dataclasses.asdict(hw), "rows": rows}
        metrics[card] = {row["model"]: row for row in rows}
    if FLAGS.out:
        common.write_json(FLAGS.out, common.record(__name__, metrics, cards=cards_out))


def cli() -> None:
    """The `jaxinfer-kv-capacity` console script (the same as python -m jaxinfer.experiments.kv_capacity)."""
    common.run(main)


if __name__ == "__main__":
    cli()
