"""Compare evaluation reports side by side (e.g. head-only MC dropout vs dropout in the last stage).

    python bench/compare_reports.py runs/demo/report runs/demo-last-stage/report

Prints mean AUC (MC), mean ECE before/after temperature scaling, the AUC gain from referring the most
uncertain 20% (vs random referral), and inference cost per image, from each report's metrics.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def referral_gain(metrics: dict[str, object], coverage: float = 0.8) -> tuple[float, float]:
    curve = metrics["referral_curve"]
    random_curve = metrics["random_referral_curve"]
    assert isinstance(curve, dict) and isinstance(random_curve, dict)
    i = min(range(len(curve["coverage"])), key=lambda j: abs(curve["coverage"][j] - coverage))
    return float(curve["auc"][i]) - float(curve["auc"][0]), float(random_curve["auc"][i]) - float(
        random_curve["auc"][0]
    )


def main(paths: list[str]) -> None:
    print(f"{'report':<36}{'AUC MC':>8}{'ECE pre':>9}{'ECE post':>9}{'dAUC@80%':>10}{'random':>8}{'ms/img':>8}")
    for path in paths:
        metrics = json.loads((Path(path) / "metrics.json").read_text())
        gain, random_gain = referral_gain(metrics)
        print(
            f"{path:<36}{metrics['mean_auc_mc']:>8.3f}{metrics['mean_ece_before']:>9.3f}"
            f"{metrics['mean_ece_after']:>9.3f}{gain:>+10.3f}{random_gain:>+8.3f}"
            f"{metrics['seconds_per_image'] * 1e3:>8.1f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
