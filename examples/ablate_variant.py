"""Define a new trust-ratio variant in text and ablate it against LAMB.

    python examples/ablate_variant.py [OUT_DIR]     # ~1 minute on 2 cores

The variant clips LAMB's trust ratio into [0.1, 10] (in the spirit of
LAMBC, arXiv:2011.13584, which clips it from above): a few lines on top of
the ``lamb`` preset. Both run on the ``digits`` convnet at three batch
sizes for 5 epochs, with the LR rule and warm-up of ``layerwise ablate``;
the results table, CSV and plots land in OUT_DIR (default
``results/ablate_variant``).
"""
import sys

import layerwise as lw
from layerwise.ablate import Variant, make_variants, run_ablation

VARIANT = """
optimizer lamb_tclip extends lamb
# LAMB with its trust ratio clipped into [trust_min, trust_max]
hyper trust_min = 0.1 in (0, inf)
hyper trust_max = 10  in (0, inf)
def trust(w, u) = clip(ratio(phi(norm(w)), norm(u)), trust_min, trust_max)
"""


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "results/ablate_variant"
    variant = lw.parse(VARIANT, filename="lamb_tclip.lw")
    # lamb (tuned LR) and the variant, which has no tuned LR: give it lamb's
    # base LR so that only the trust ratio differs. --phi style variants
    # come for free: make_variants([...], phis=["min(z, 1)"]).
    rows = make_variants(["lamb"]) + [Variant("lamb_tclip", variant, base_lr=1e-2)]
    results = run_ablation(out, rows, tasks=["digits"], batch_sizes=[32, 128, 512], epochs=5,
                           jobs=2)
    print(open(f"{out}/results.md", encoding="utf-8").read())
    print(f"{len(results)} runs; table, CSV and plots in {out}/")


if __name__ == "__main__":   # ablation workers are spawned: keep the guard
    main()
