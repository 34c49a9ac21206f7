"""Evaluate the shipped tiny models on held-out text: bits per byte, and draft/target agreement.

  python -m jaxinfer.experiments.eval_tiny                       # prints the figures
  python -m jaxinfer.experiments.eval_tiny --out=jaxinfer/assets/eval.json   # records them beside the models

Greedy agreement is the fraction of held-out positions where the draft's argmax next token equals
the target's (teacher forcing on the same text): the per-token acceptance rate that greedy
speculative decoding with this draft can expect.
"""

from __future__ import annotations

import datetime
import sys

import jax
from absl import flags

import jaxinfer as ji
from jaxinfer import data

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_string("target", "tiny", "Target model (name or HF checkpoint directory).")
flags.DEFINE_string("draft", "tiny-draft", "Draft model (name or HF checkpoint directory).")
for _name in ("windows", "seq_len", "out", "tp"):
    flags.declare_key_flag(_name)


def evaluate(target: str, draft: str, windows: int, seq_len: int) -> dict:
    t, d = ji.load_model(target, mesh=common.mesh()), ji.load_model(draft, mesh=common.mesh())
    w = data.heldout_windows(t, seq_len, windows)
    return {
        "target": {"model": target, "params": t.config.num_params(), "heldout_bits_per_byte": data.bits_per_byte(t, w)},
        "draft": {"model": draft, "params": d.config.num_params(), "heldout_bits_per_byte": data.bits_per_byte(d, w)},
        "greedy_agreement": data.greedy_agreement(t, d, w),
        "heldout_windows": windows,
        "seq_len": seq_len,
        "python": sys.version.split()[0],
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "command": common.environment(__name__)["command"],
    }


def main(argv):
    del argv
    for name in ("windows", "seq_len"):
        if FLAGS[name].value < 1:
            raise ValueError(f"--{name}={FLAGS[name].value} must be >= 1")
    result = evaluate(FLAGS.target, FLAGS.draft, FLAGS.windows, FLAGS.seq_len)
    if FLAGS.out:
        metrics = {role: result[role] for role in ("target", "draft")} | {"greedy_agreement": result["greedy_agreement"]}
        common.write_json(FLAGS.out, common.record(__name__, metrics, **result))
    print(f"{'model':<14}{'params':>12}{'held-out bits/byte':>20}")
    for role in ("target", "draft"):
        r = result[role]
        print(f"{r['model']:<14}{r['params']:>12,}{r['heldout_bits_per_byte']:>20.3f}")
    print(f"greedy agreement (draft argmax == target argmax): {result['greedy_agreement']:.3f}")


if __name__ == "__main__":
    common.run(main)
