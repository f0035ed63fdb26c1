"""Fusion benchmark: does fusion beat the best single model, over model seeds?

`tensorline train --seeds` as a benchmark: the demo models are trained under SEEDS model seeds
(7, 8, ...) on the same demo set (data seed 7: the demo's test split), each into a scratch folder;
per seed, every model's and the fused result's macro-F1 on the test split, the fused result being
what the stacker file holds (the fusion chosen by cross-validation on the validation split, or the
best single model passed through). Each seed's line also gives the gain's 95% interval on the test
records (paired bootstrap) and a verdict. The baseline is measured in the same run: the best single
model of the same seed on the same records. Goals: gain_mean >= +0.02 macro-F1, gain_min >= 0.

    python bench/fusion.py [--seeds 5] [--limit N] [--epochs E] [--json]

Each seed trains the models as `tensorline train` does (minutes on a busy 2-core machine);
--limit N (patches per split) and --epochs E make a quicker, noisier run, and the last line says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7, help="the first model seed and the data seed")
    parser.add_argument("--limit", type=int, help="at most N patches per split")
    parser.add_argument("--epochs", type=int, help="every model's epochs (default: the training recipe's)")
    parser.add_argument("--json", action="store_true", help="print the per-seed JSON after the tables")
    parser.add_argument("-c", "--config", default=str(ROOT / "pipeline.toml"))
    args = parser.parse_args(argv)

    from tensorline import config
    from tensorline.engine.plugins import quiet_tensorflow
    from tensorline.ops import train

    quiet_tensorflow()
    # The per-seed lines print as each seed ends (a long run shows what it has), the JSON after them.
    result = train.train_seeds(config.load(args.config), args.seeds, seed=args.seed, epochs=args.epochs,
                               limit=args.limit, show=True)
    if args.json:
        print(json.dumps(result))
    s = result["over_seeds"]
    run = "" if args.limit is None and args.epochs is None else f" limit={args.limit} epochs={args.epochs}"
    print(f"bench fusion: seeds={s['seeds']} gain_mean={s['gain']['mean']:+.4f} gain_min={s['gain']['min']:+.4f} "
          f"best_single_mean={s['best_single']['mean']:.4f} fused_mean={s['fused']['mean']:.4f}{run}")
    return 0 if s["gain"]["mean"] >= 0.02 and s["gain"]["min"] >= 0 else 1


if __name__ == "__main__":
    sys.exit(main())
