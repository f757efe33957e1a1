"""The curious follower's label attacks given a few known labels (model completion, SecretFlow's checklist).

A follower often knows some customers' labels (its own clicks, a public record, a partner's leak). With a fraction
of the training rows' labels known (the audit tries 1% and 5%), it fits a classifier on those rows' gradients and
scores every other row. The features of a row are its gradient in the batch's own frame: the rows projected on the
batch's uncentred principal axes, oriented like the earlier batches' and divided by the batch's RMS row norm (so
that batches of different scale and direction are comparable), plus every product of two of those coordinates
(the outer product's upper triangle), which lets a linear model see a difference of spreads.

    LDA         Gaussian classes with one shared covariance (a linear boundary)
    QDA         Gaussian classes with a covariance each (a quadratic boundary: catches class-dependent noise)
    logistic    logistic regression on the coordinates and their products (Newton's method, small L2)
    MLP         a 2-layer perceptron (32 tanh units each) on the same features, full-batch Adam

Every model is deterministic given its seed; its leak AUC is taken on the rows whose label it was not given.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from vfl_cli.privacy.attacks import oriented_axes, principal_axes

Features = np.ndarray  # [N, f] float64
Fitter = Callable[[Features, np.ndarray, Features], np.ndarray]  # (known x, known y, all x) -> score per row


def batch_frame(gradients: np.ndarray, batch: np.ndarray, previous: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """Each row's coordinates [N, k] in its batch's uncentred principal axes, oriented like the earlier batches',
    over the batch's RMS row norm. Returns the coordinates and the orientation reference (the next epoch's
    `previous`)."""
    coords = np.zeros(gradients.shape, dtype=np.float64)
    for index in np.unique(batch):
        rows = batch == index
        x = np.asarray(gradients[rows], dtype=np.float64)
        axes, previous = oriented_axes(principal_axes(x, centred=False), previous)
        scale = float(np.sqrt(np.mean(np.sum(x * x, axis=1))))
        coords[rows] = (x @ axes.T) / (scale if scale > 0 else 1.0)
    return coords, previous


def with_products(coords: np.ndarray) -> Features:
    """The coordinates [N, k] and the upper triangle of each row's outer product [N, k(k+1)/2], side by side."""
    i, j = np.triu_indices(coords.shape[1])
    return np.concatenate([coords, coords[:, i] * coords[:, j]], axis=1)


def _gaussian_log_density(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    centred = x - mean
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (logdet + np.einsum("ij,jk,ik->i", centred, np.linalg.inv(cov), centred))


def _class_stats(x: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    ridge = 1e-6 * np.eye(x.shape[1])
    return [(x[y == c].mean(axis=0), np.cov(x[y == c], rowvar=False).reshape(x.shape[1], x.shape[1]) + ridge)
            for c in (0, 1)]


def lda(known: Features, y: np.ndarray, every: Features) -> np.ndarray:
    known, every = _standardise(known, every)  # the ridge below is then small against every feature's spread
    (m0, c0), (m1, c1) = _class_stats(known, y)
    shared = (c0 * np.sum(y == 0) + c1 * np.sum(y == 1)) / len(y)
    return _gaussian_log_density(every, m1, shared) - _gaussian_log_density(every, m0, shared)


def qda(known: Features, y: np.ndarray, every: Features) -> np.ndarray:
    known, every = _standardise(known, every)
    (m0, c0), (m1, c1) = _class_stats(known, y)
    return _gaussian_log_density(every, m1, c1) - _gaussian_log_density(every, m0, c0)


def _standardise(known: Features, every: Features) -> tuple[Features, Features]:
    mean, spread = known.mean(axis=0), known.std(axis=0)
    spread = np.where(spread > 0, spread, 1.0)
    return (known - mean) / spread, (every - mean) / spread


def logistic(known: Features, y: np.ndarray, every: Features, l2: float = 1e-3, steps: int = 30) -> np.ndarray:
    """L2-regularised logistic regression by Newton's method (a handful of features: each step is one solve)."""
    x, z = _standardise(known, every)
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        gradient = x.T @ (p - y) / len(y) + l2 * w
        hessian = (x * (p * (1 - p))[:, None]).T @ x / len(y) + l2 * np.eye(len(w))
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return np.concatenate([z, np.ones((len(z), 1))], axis=1) @ w


def mlp(known: Features, y: np.ndarray, every: Features, seed: int = 0, steps: int = 200) -> np.ndarray:
    """A 2-layer tanh perceptron, full-batch Adam with weight decay, class-balanced loss; deterministic by seed."""
    x, z = _standardise(known, every)
    generator = torch.Generator().manual_seed(seed)
    layers = [torch.nn.Linear(x.shape[1], 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
              torch.nn.Linear(32, 1)]
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / layer.in_features ** 0.5)
                layer.bias.zero_()
    model = torch.nn.Sequential(*layers)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    inputs, targets = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    positive_weight = torch.tensor((len(y) - y.sum()) / max(y.sum(), 1.0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors of a few thousand values: threads only wait on each other (10x slower)
    try:
        for _ in range(steps):
            optimiser.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(inputs)[:, 0], targets,
                                                                        pos_weight=positive_weight)
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            return model(torch.from_numpy(z).float())[:, 0].double().numpy()
    finally:
        torch.set_num_threads(threads)


MLP_ROWS = 20_000

FITTERS: dict[str, tuple[Fitter, bool]] = {  # name -> (fitter, takes the products too)
    "LDA": (lda, False),
    "QDA": (qda, False),
    "logistic": (logistic, True),
    "MLP": (mlp, True),
}


def known_rows(rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which training rows' labels the follower knows: a fixed random `fraction` of the row ids (the same customers
    every epoch, as a real follower's knowledge would be). Returns a boolean mask over `rows`."""
    ids = np.unique(rows)
    chosen = np.random.default_rng(seed).choice(ids, size=max(int(round(fraction * len(ids))), 2), replace=False)
    return np.isin(rows, chosen)


def known_label_scores(coords: np.ndarray, labels: np.ndarray, known: np.ndarray, seed: int = 0
                       ) -> dict[str, np.ndarray]:
    """Each model's score for every row [N], fitted on the rows in `known` (needs both classes among them)."""
    products = with_products(coords)
    y = labels[known].astype(np.float64)
    if y.min() == y.max():
        return {}
    out = {}
    for name, (fitter, takes_products) in FITTERS.items():
        features = products if takes_products else coords
        if name == "MLP":  # full-batch steps: fitted on at most MLP_ROWS of the known rows (6 features need no more)
            fit = np.flatnonzero(known)
            if len(fit) > MLP_ROWS:
                fit = np.sort(np.random.default_rng(seed).choice(fit, MLP_ROWS, replace=False))
            if labels[fit].min() == labels[fit].max():
                continue
            out[name] = mlp(features[fit], labels[fit].astype(np.float64), features, seed=seed)
        else:
            out[name] = fitter(features[known], y, features)
    return out
