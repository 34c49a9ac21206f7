"""Quantisation-aware training against post-training quantisation at the same format.

  python -m jaxinfer.experiments.qat                                   # tiny, int4-rtn-g32 and nvfp4-sim
  python -m jaxinfer.experiments.qat --qat_schemes=int4-rtn-pc,mxfp4-sim-a4 --steps=100 --out=/tmp/qat.json

For each scheme (jaxinfer.quant.spec names with a fixed rounding: RTN, simulated formats), held-out
bits per byte of
  ptq           the model as it ships, quantised by the scheme
  finetune+ptq  the model fine-tuned --steps in float (the control: same steps, same text), quantised
  qat           the model fine-tuned --steps under the scheme's fake-quant (straight-through), quantised
and of the two float models, with the gap each quantised model leaves to its own float model.
The fine-tunes read random windows of --train_len tokens from the train split (--batch_size a step).
"""

from __future__ import annotations

import time

from absl import flags

import jaxinfer as ji
from jaxinfer import data, quant
from jaxinfer.quant import qat
from jaxinfer.quant.spec import scheme_from_name

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_list("qat_schemes", ["int4-rtn-g32", "nvfp4-sim"], "Formats to train for (RTN or simulated schemes).")
flags.DEFINE_integer("train_len", 256, "Tokens per training window.")
flags.DEFINE_float("qat_lr", 3e-4, "Peak learning rate of the fine-tunes (AdamW, warm-up then cosine decay).")
for _name in ("model", "windows", "seq_len", "out", "steps", "batch_size", "seed"):
    flags.declare_key_flag(_name)
DEFAULT_STEPS = 40


def main(argv):
    del argv
    try:
        schemes = [scheme_from_name(name) for name in FLAGS.qat_schemes]
    except ValueError as e:
        raise ValueError(f"--qat_schemes: {e}") from None
    for name, scheme in zip(FLAGS.qat_schemes, schemes):
        if scheme is None:
            raise ValueError(f"--qat_schemes: {name!r} is not a quantisation scheme")
        qat.weight_quantizer(scheme)  # refuses calibrated schemes before any work
    steps = FLAGS.steps or DEFAULT_STEPS
    model = ji.load_model(FLAGS.model)
    windows = data.heldout_windows(model, FLAGS.seq_len, FLAGS.windows)
    stream = qat.train_stream(model)
    kw = dict(steps=steps, batch_size=FLAGS.batch_size, seq_len=FLAGS.train_len, lr=FLAGS.qat_lr, seed=FLAGS.seed,
              stream=stream)

    def bpb(m):
        return data.bits_per_byte(m, windows)

    control = qat.finetune(model, None, **kw)
    base_bpb, control_bpb = bpb(model), bpb(control.model)
    print(f"float: as shipped {base_bpb:.4f}, fine-tuned {control_bpb:.4f} bits/byte ({control.seconds:.0f} s)")
    rows = []
    for scheme in schemes:
        t0 = time.perf_counter()
        trained = qat.finetune(model, scheme, **kw)
        row = {
            "scheme": scheme.name,
            "float_bits_per_byte": base_bpb,
            "ptq": bpb(quant.quantize_model(model, scheme)),
            "finetune_float_bits_per_byte": control_bpb,
            "finetune_ptq": bpb(quant.quantize_model(control.model, scheme)),
            "qat_float_bits_per_byte": bpb(trained.model),
            "qat": bpb(quant.quantize_model(trained.model, scheme)),
            "qat_train_s": trained.seconds,
            "qat_final_loss": trained.losses[-1],
        }
        print(f"{scheme.name}: {time.perf_counter() - t0:.0f} s")
        rows.append(row)
    metrics = {r["scheme"]: r for r in rows} | {"control_train_s": control.seconds, "steps": steps}
    record = common.record(__name__, metrics, results=rows)
    print(f"\n{FLAGS.model} on {record['env']['device']}: {steps} steps of {FLAGS.batch_size} x {FLAGS.train_len} "
          f"tokens; bits/byte on {FLAGS.windows} held-out windows of {FLAGS.seq_len}")
    print(table(rows))
    if FLAGS.out:
        common.write_json(FLAGS.out, record)


def table(rows: list[dict]) -> str:
    lines = ["| scheme | float | ptq | fine-tuned float | finetune+ptq | qat | qat vs finetune+ptq |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['float_bits_per_byte']:.4f} | {r['ptq']:.4f} "
                     f"({r['ptq'] / r['float_bits_per_byte'] - 1:+.2%}) | {r['finetune_float_bits_per_byte']:.4f} | "
                     f"{r['finetune_ptq']:.4f} ({r['finetune_ptq'] / r['finetune_float_bits_per_byte'] - 1:+.2%}) | "
                     f"{r['qat']:.4f} ({r['qat'] / r['finetune_float_bits_per_byte'] - 1:+.2%}) | "
                     f"{r['qat'] / r['finetune_ptq'] - 1:+.2%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    common.run(main)
