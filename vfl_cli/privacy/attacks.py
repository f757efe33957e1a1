"""The curious follower's label attacks without a single known label: scores from the gradients it receives.

The follower gets, for every training row, the gradient of the leader's loss w.r.t. its cut-layer outputs, a row
g in R^k. With a linear top that row is w * (p - y) / B, so a batch's rows lie on one line and the side of the
origin a row lies on is its label. A defence moves the rows off that line; these attacks look for what is left.

Per batch (a batch shares one w and one scale; each score is computed from one batch at a time, [B, k] -> [B]):
- direction: projection on the batch's principal axis (top right-singular vector of the uncentred rows); the
  paper's cosine attack against one known positive does the same (Li et al., "Label Leakage and Protection in
  Two-party Split Learning", ICLR 2022).
- norm: |g|. Positives are rarer and predicted lower, so |p - y| is larger for them.
- PC j and |PC j|: the projection on the j-th principal axis of the centred rows, signed and absolute. PC 1 is the
  spectral attack (top singular vector of the centred gradients); |PC j| catches a defence whose noise spreads one
  class and not the other along some axis (one class wide, the other narrow: their |projection| differs).
- 2-means: the difference of a row's distances to the two centroids of Lloyd's algorithm.
- GMM: the posterior of one component of a two-component full-covariance Gaussian mixture fitted by EM. It sees
  a difference of means, of spreads, or of both.

Leak AUC is the AUC of a score against the true labels. Per batch it counts as max(AUC, 1 - AUC), averaged over
the epoch's batches: which end is positive is one bit the follower can learn once (the class balance, or one
customer it knows clicked), so the defender should not count on it guessing wrong. 0.5 is no leak, 1.0 is every
label; with random scores the per-batch maximum sits a little above 0.5 (about 0.512 for 512 positives among
2,048 rows), which is the floor a perfect defence reaches.

Pooled (`unsupervised_scores`): the same scorers' outputs made comparable across batches with no label (each batch
standardised, each axis oriented like the earlier batches', since the top's weights drift slowly; a cluster is
"positive" when it is the smaller one), so that one AUC over the whole epoch, and a row's score averaged over every
epoch the follower has kept, can be taken. Attacks that use a few known labels are in `known_labels`; the suite that
runs everything and names the strongest is `vfl_cli.privacy.audit_attacks`.
"""

from __future__ import annotations

import numpy as np

from vfl_cli.metrics import roc_auc


def leak_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """max(AUC, 1 - AUC) of `scores` against 0/1 `labels`; NaN when a class is missing."""
    positives = int(np.sum(labels))
    if positives == 0 or positives == len(labels):
        return float("nan")
    auc = roc_auc(labels, scores)
    return max(auc, 1.0 - auc)


def _f64(rows: np.ndarray) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64)


def principal_axes(rows: np.ndarray, centred: bool) -> np.ndarray:
    """The right-singular vectors [k, k] (one per row, largest first) of a batch's rows [B, k], centred or not."""
    x = _f64(rows)
    if centred:
        x = x - x.mean(axis=0)
    if not np.any(x):
        return np.eye(x.shape[1])
    _, _, right = np.linalg.svd(x, full_matrices=False)
    if right.shape[0] < x.shape[1]:  # fewer rows than columns: complete the basis
        right = np.linalg.qr(np.concatenate([right.T, np.eye(x.shape[1])], axis=1))[0].T[: x.shape[1]]
    return right


def _standardised(rows: np.ndarray) -> np.ndarray:
    """The batch whitened per column (a batch's gradients are ~1/B small; EM and Lloyd want unit scales)."""
    x = _f64(rows)
    x = x - x.mean(axis=0)
    scale = x.std(axis=0)
    return x / np.where(scale > 0, scale, 1.0)


def two_means(rows: np.ndarray, iterations: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's 2-means on one batch [B, k]: (assignment [B] in {0, 1}, score [B] = distance to 0 - distance to 1).

    Deterministic: it starts from the split of the rows at the median of their first principal component.
    """
    x = _standardised(rows)
    first = x @ principal_axes(x, centred=True)[0]
    assign = (first > np.median(first)).astype(np.int64)
    for _ in range(iterations):
        centres = np.stack([x[assign == c].mean(axis=0) if np.any(assign == c) else x.mean(axis=0) for c in (0, 1)])
        distance = np.linalg.norm(x[:, None, :] - centres[None], axis=2)  # (B, 2)
        new = np.argmin(distance, axis=1)
        if np.array_equal(new, assign):
            break
        assign = new
    return assign, distance[:, 0] - distance[:, 1]


def gmm_posterior(rows: np.ndarray, start: np.ndarray, iterations: int = 40) -> np.ndarray:
    """Posterior of component 1 [B] of a 2-component full-covariance Gaussian mixture fitted to one batch by EM.

    Started from `start`, an assignment [B] in {0, 1} (the batch's 2-means); a small ridge on each covariance keeps
    a collapsing component (all rows on a line, or one row) from a singular matrix. Deterministic.
    """
    x = _standardised(rows)
    n, k = x.shape
    resp = np.stack([start == 0, start == 1], axis=1).astype(np.float64)  # (B, 2)
    ridge = 1e-6 * np.eye(k)
    for _ in range(iterations):
        weight = resp.sum(axis=0) + 1e-12  # (2,)
        means = (resp.T @ x) / weight[:, None]  # (2, k)
        log_density = np.empty((n, 2))
        for c in (0, 1):
            centred = x - means[c]
            cov = (resp[:, c, None] * centred).T @ centred / weight[c] + ridge
            _, logdet = np.linalg.slogdet(cov)
            mahalanobis = np.einsum("ij,jk,ik->i", centred, np.linalg.inv(cov), centred)
            log_density[:, c] = np.log(weight[c] / n) - 0.5 * (logdet + mahalanobis)
        log_density -= log_density.max(axis=1, keepdims=True)
        resp = np.exp(log_density)
        resp /= resp.sum(axis=1, keepdims=True)
    return resp[:, 1]


def per_batch_leak(scores: np.ndarray, labels: np.ndarray, batch: np.ndarray) -> float:
    """Mean over the epoch's batches (those with both classes) of max(AUC, 1 - AUC) of a score [N].

    The per-batch standardisation and orientation of `unsupervised_scores` change no batch's figure, so the per-batch
    leaks are taken from the same scores as the pooled ones."""
    leaks = []
    for index in np.unique(batch):
        rows = batch == index
        leak = leak_auc(scores[rows], labels[rows])
        if not np.isnan(leak):
            leaks.append(leak)
    return float(np.mean(leaks)) if leaks else float("nan")


# --- pooled: scores comparable across batches and epochs, with no label known ------------------------------------


def zscore(values: np.ndarray) -> np.ndarray:
    """(values - mean) / std; only the mean removed when they are all equal."""
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else values - values.mean()


def oriented_axes(axes: np.ndarray, reference: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Flip each axis [k, k] to point like the reference (a decaying sum of the earlier batches' oriented axes: the
    top's weights drift slowly, and one batch whose axis noise has turned does not turn the rest); returns the
    oriented axes and the next reference."""
    if reference is None:
        return axes, axes
    signs = np.sign(np.einsum("ij,ij->i", axes, reference))
    oriented = axes * np.where(signs == 0, 1.0, signs)[:, None]
    return oriented, 0.9 * reference + oriented


def unsupervised_scores(gradients: np.ndarray, batch: np.ndarray, previous: dict[str, np.ndarray] | None = None
                        ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every unsupervised score for each row of one epoch [N], standardised per batch and oriented without labels.

    Batches are taken in step order; `previous` carries the orientation reference from the epoch before (and the
    returned dict is what the next epoch takes), so an axis keeps one orientation over the whole run and a row's
    score can be averaged over epochs. Clusters are oriented by size: the smaller one is scored as the positives.
    """
    k = gradients.shape[1]
    axes = [name for a in range(k) for name in (f"PC{a + 1}", f"|PC{a + 1}|")]
    names = ["direction", "norm", *axes, "2-means", "GMM"]
    out = {name: np.zeros(len(gradients)) for name in names}
    carry = dict(previous or {})
    for index in np.unique(batch):  # np.unique sorts: step order
        rows = batch == index
        x = _f64(gradients[rows])
        uncentred, carry["uncentred"] = oriented_axes(principal_axes(x, centred=False), carry.get("uncentred"))
        centred_axes, carry["centred"] = oriented_axes(principal_axes(x, centred=True), carry.get("centred"))
        out["direction"][rows] = zscore(x @ uncentred[0])
        out["norm"][rows] = zscore(np.linalg.norm(x, axis=1))
        projections = (x - x.mean(axis=0)) @ centred_axes.T  # (B, k)
        for a in range(k):
            out[f"PC{a + 1}"][rows] = zscore(projections[:, a])
            out[f"|PC{a + 1}|"][rows] = zscore(np.abs(projections[:, a]))
        assign, score = two_means(x)
        smaller = 1 if assign.mean() <= 0.5 else 0
        out["2-means"][rows] = zscore(score if smaller == 1 else -score)
        posterior = gmm_posterior(x, start=assign)
        out["GMM"][rows] = zscore(posterior if posterior.mean() <= 0.5 else 1 - posterior)
    return out, carry
