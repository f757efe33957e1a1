"""The logistic-regression oracle for the real Criteo sample (scikit-learn: a test oracle, never a dependency of
the package): hashed one-hot categoricals + log(1 + x) dense values, C = 0.1, trained on one raw Kaggle-format
file and scored on others.

    python -m tests.lr_oracle TRAIN EVAL [EVAL ...] [--fields I1,...,C13]     # prints the AUC
    python -m tests.lr_oracle TRAIN --folds 5     # K-fold cross-validation on TRAIN's K contiguous blocks
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DENSE = [f"I{i}" for i in range(1, 14)]
CATEGORICAL = [f"C{i}" for i in range(1, 27)]
HASHED_FEATURES = 1 << 20


def read_rows(paths: Sequence[Path], fields: Sequence[str]) -> tuple[list[dict[str, float]], np.ndarray]:
    """One feature dict per raw line (the dense values as log(1 + max(x, 0)), each present categorical value as
    its own key) and the labels."""
    rows, labels = [], []
    keep = set(fields)
    for path in paths:
        for line in path.read_text().splitlines():
            cells = line.split("\t")
            labels.append(float(cells[0]))
            features: dict[str, float] = {}
            for name, cell in zip(DENSE + CATEGORICAL, cells[1:], strict=True):
                if name not in keep or cell == "":
                    continue
                if name in DENSE:
                    features[name] = math.log1p(max(float(cell), 0.0))
                else:
                    features[f"{name}={cell}"] = 1.0
            rows.append(features)
    return rows, np.asarray(labels)


def logistic_regression_auc(
    train: Path, evaluate: Sequence[Path], fields: Sequence[str] = DENSE + CATEGORICAL
) -> float:
    from sklearn.feature_extraction import FeatureHasher
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    hasher = FeatureHasher(n_features=HASHED_FEATURES, input_type="dict", alternate_sign=False)
    train_rows, train_labels = read_rows([train], fields)
    eval_rows, eval_labels = read_rows(evaluate, fields)
    model = LogisticRegression(C=0.1, max_iter=2000)
    model.fit(hasher.transform(train_rows), train_labels)
    return float(roc_auc_score(eval_labels, model.predict_proba(hasher.transform(eval_rows))[:, 1]))


def cross_validated_auc(train: Path, folds: int, fields: Sequence[str] = DENSE + CATEGORICAL) -> float:
    """Mean validation AUC over `folds` contiguous blocks of the file, each validating a model fitted on the
    rest: the blocks `scripts/sample_recipe.py --folds` validates vfl on."""
    from sklearn.feature_extraction import FeatureHasher
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    hasher = FeatureHasher(n_features=HASHED_FEATURES, input_type="dict", alternate_sign=False)
    rows, labels = read_rows([train], fields)
    features = hasher.transform(rows)
    aucs = []
    for fold in range(folds):
        held_out = np.arange(len(rows) * fold // folds, len(rows) * (fold + 1) // folds)
        fitted = np.setdiff1d(np.arange(len(rows)), held_out)
        model = LogisticRegression(C=0.1, max_iter=2000).fit(features[fitted], labels[fitted])
        aucs.append(roc_auc_score(labels[held_out], model.predict_proba(features[held_out])[:, 1]))
    return float(np.mean(aucs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train", type=Path)
    parser.add_argument("evaluate", type=Path, nargs="*")
    parser.add_argument("--fields", default=",".join(DENSE + CATEGORICAL))
    parser.add_argument("--folds", type=int, default=0, help="K > 1: K-fold cross-validation on TRAIN instead")
    args = parser.parse_args()
    fields = args.fields.split(",")
    if args.folds > 1:
        print(f"{cross_validated_auc(args.train, args.folds, fields):.6f}")
    elif args.evaluate:
        print(f"{logistic_regression_auc(args.train, args.evaluate, fields):.6f}")
    else:
        parser.error("give files to evaluate on, or --folds K")


if __name__ == "__main__":
    main()
