"""`radgate evaluate`: print a trained model's evaluation (and re-score a test split)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from inference.artifact import ModelCard
from inference.errors import RadgateError
from training.data import scan_dataset
from training.train import print_evaluation, score_items


def command(args: argparse.Namespace) -> int:
    card = ModelCard.read(args.model)
    evaluation_path = args.model / "evaluation.json"
    if not evaluation_path.is_file():
        raise RadgateError(f"{evaluation_path}: no evaluation recorded with this model")
    evaluation = json.loads(evaluation_path.read_text())
    recipe = card.raw.get("recipe", {})
    print(
        f"model {card.model_id}: {card.arch}, "
        f"{'pretrained' if recipe.get('pretrained') else 'from scratch'}, "
        f"trained {card.raw.get('trained_at')} in {card.raw.get('train_seconds')} s"
    )
    for name in ("valid", "test", "external"):
        print_evaluation(name, evaluation.get(name, []))
    stress = evaluation.get("stress", [])
    if stress:
        changed = [r for r in stress if r["label_changed"]]
        worst = max(abs(r["true_class_shift"]) for r in stress)
        print(
            f"\nstress set: {len(stress)} variants, {len(changed)} label change(s), "
            f"largest move of the true class's probability {worst:.3f}"
        )
        for row in changed:
            print(
                f"  {row['variant']:<20} {Path(row['file']).name}: {row['plain_prediction']} -> {row['prediction']}"
            )
    if args.data is not None:
        test = scan_dataset(args.data, splits=("test",), required=("test",)).split("test")
        rows = score_items(args.model, test)
        print_evaluation(f"test split of {args.data}, re-scored now", rows)
    print("\nmetrics: " + json.dumps(card.raw.get("metrics", {}), indent=2))
    return 0
