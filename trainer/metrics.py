"""Weighted evaluation metrics, vectorised over bootstrap resamples.

Every metric takes the labels, the predictions and a weight matrix ``w`` of shape
``[B, n]``: one row of per-example weights per resample (``B = 1`` for the point estimate,
see ``point_weights``). A patient-level bootstrap is a weight matrix too: resampling
patients with replacement weights each of a patient's rows by how often the patient was
drawn (``patient_resamples``), so one matrix serves every metric and every model, and two
models scored with the same matrix are paired.
"""

from __future__ import annotations

import numpy as np

# --- weights ---------------------------------------------------------------------------------


def point_weights(weight: np.ndarray) -> np.ndarray:
    """The point estimate's weight matrix [1, n]."""
    return np.asarray(weight, dtype=np.float64)[None, :]


def patient_resamples(subject_id: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """[n_boot, n_rows]: how often each row's patient is drawn in each resample of the patients."""
    patients, inverse = np.unique(subject_id, return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(patients), size=(n_boot, len(patients)))
    counts = np.zeros((n_boot, len(patients)))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    return counts[:, inverse]


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite samples; NaN when none is finite."""
    finite = samples[np.isfinite(samples)]
    if not len(finite):
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


# --- discrimination ----------------------------------------------------------------------------


def _grouped(y: np.ndarray, score: np.ndarray, w: np.ndarray, descending: bool):
    """Positive and negative weight per distinct score, in score order: ([B, U], [B, U])."""
    order = np.argsort(-score if descending else score, kind="mergesort")
    s, y, w = score[order], y[order].astype(np.float64), w[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return np.add.reduceat(w * y, starts, axis=1), np.add.reduceat(w * (1 - y), starts, axis=1)


def auroc(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted area under the ROC curve (ties count one half); NaN without both classes."""
    pos, neg = _grouped(y, score, w, descending=False)
    below = np.cumsum(neg, axis=1) - neg
    return _ratio((pos * (below + 0.5 * neg)).sum(1), pos.sum(1) * neg.sum(1))


def auprc(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted average precision (sklearn's definition: no interpolation)."""
    pos, neg = _grouped(y, score, w, descending=True)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    precision = _ratio(tp, tp + fp)
    return _ratio((pos * np.nan_to_num(precision)).sum(1), pos.sum(1))


def confusion(y: np.ndarray, flagged: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Sensitivity, specificity, PPV, NPV, F1 and accuracy of the alerts ``flagged``."""
    y, flagged = y.astype(bool), flagged.astype(bool)
    tp, fp = w @ (y & flagged), w @ (~y & flagged)
    fn, tn = w @ (y & ~flagged), w @ (~y & ~flagged)
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
    }


# --- calibration -----------------------------------------------------------------------------


def brier(y: np.ndarray, prob: np.ndarray, w: np.ndarray) -> np.ndarray:
    return _ratio(w @ (prob - y) ** 2, w.sum(1))


def equal_mass_bins(prob: np.ndarray, bins: int = 10) -> np.ndarray:
    """Each row's bin among ``bins`` bins holding about as many rows each (ties kept together)."""
    edges = np.unique(np.quantile(prob, np.linspace(0, 1, bins + 1)[1:-1]))
    return np.searchsorted(edges, prob, side="right")


def ece(y: np.ndarray, prob: np.ndarray, w: np.ndarray, bins: int = 10) -> np.ndarray:
    """Expected calibration error over equal-mass bins: sum_b (w_b / w) |mean y_b - mean p_b|."""
    onehot = np.eye(bins)[equal_mass_bins(prob, bins)]  # [n, bins]
    gap = w @ ((y - prob)[:, None] * onehot)  # [B, bins]: w_b (mean y_b - mean p_b)
    return _ratio(np.abs(gap).sum(1), w.sum(1))


def calibration_fit(
    y: np.ndarray, prob: np.ndarray, w: np.ndarray, steps: int = 25
) -> tuple[np.ndarray, np.ndarray]:
    """(intercept, slope) of the logistic recalibration y ~ a + b logit(p), fitted by Newton's
    method for every resample at once: a = 0 and b = 1 for perfectly calibrated predictions."""
    p = np.clip(prob, 1e-6, 1 - 1e-6)
    x = np.log(p / (1 - p))
    y = y.astype(np.float64)

    def loss(a, b):  # weighted negative log-likelihood per resample
        eta = a[:, None] + b[:, None] * x
        return (w * (np.logaddexp(0, eta) - y * eta)).sum(1)

    # From the constant model (b = 0), with step halving where a Newton step does not
    # lower the loss: plain Newton from b = 1 overshoots on extreme logits.
    rate = np.clip(_ratio(w @ y, w.sum(1)), 1e-6, 1 - 1e-6)
    a, b = np.log(rate / (1 - rate)), np.zeros(len(w))
    current = loss(a, b)
    for _ in range(steps):
        mu = 1 / (1 + np.exp(-np.clip(a[:, None] + b[:, None] * x, -50, 50)))
        r, v = w * (y - mu), w * mu * (1 - mu)
        g0, g1 = r.sum(1), r @ x
        h00, h01, h11 = v.sum(1), v @ x, v @ (x * x)
        det = h00 * h11 - h01 * h01
        ok = det > 1e-12
        da = np.where(ok, (h11 * g0 - h01 * g1) / np.where(ok, det, 1), 0)
        db = np.where(ok, (h00 * g1 - h01 * g0) / np.where(ok, det, 1), 0)
        step = np.ones(len(w))
        for _ in range(10):
            trial = loss(a + step * da, b + step * db)
            worse = trial > current + 1e-12
            if not worse.any():
                break
            step = np.where(worse, step / 2, step)
        step = np.where(trial > current + 1e-12, 0.0, step)
        a, b, current = a + step * da, b + step * db, np.minimum(trial, current)
        if np.all(np.abs(step * da) + np.abs(step * db) < 1e-8):
            break
    # Undefined without both outcomes, or when every prediction is the same.
    positives, total = w @ y, w.sum(1)
    mean_x = _ratio(w @ x, total)
    spread = _ratio(w @ x**2, total) - mean_x**2
    bad = ~np.isfinite(a) | (positives <= 0) | (positives >= total) | ~(spread > 1e-12)
    return np.where(bad, np.nan, a), np.where(bad, np.nan, b)


def reliability(y: np.ndarray, prob: np.ndarray, weight: np.ndarray, bins: int = 10) -> dict:
    """Per equal-mass bin: mean predicted, observed rate and its 95% Wilson interval (on the
    Kish effective count, so weighted rows count as the information they carry)."""
    which = equal_mass_bins(prob, bins)
    rows = {"predicted": [], "observed": [], "lo": [], "hi": [], "n": []}
    for b in np.unique(which):
        at = which == b
        wb = weight[at]
        total = wb.sum()
        observed = float(wb @ y[at] / total)
        n_eff = total**2 / float(wb @ wb)
        z = 1.96
        centre = (observed + z * z / (2 * n_eff)) / (1 + z * z / n_eff)
        half = z * np.sqrt(observed * (1 - observed) / n_eff + z * z / (4 * n_eff**2))
        half /= 1 + z * z / n_eff
        rows["predicted"].append(float(wb @ prob[at] / total))
        rows["observed"].append(observed)
        # Wilson's interval holds the observed rate; min/max keep rounding from moving it out.
        rows["lo"].append(float(min(max(centre - half, 0.0), observed)))
        rows["hi"].append(float(max(min(centre + half, 1.0), observed)))
        rows["n"].append(int(at.sum()))
    return rows


# --- thresholds ------------------------------------------------------------------------------


def best_f1_threshold(y: np.ndarray, prob: np.ndarray, weight: np.ndarray | None = None) -> float:
    """The probability cut (alert when p >= cut) that maximises weighted F1; 0.5 without both
    classes."""
    weight = np.ones(len(y)) if weight is None else weight
    if len(np.unique(y)) < 2:
        return 0.5
    order = np.argsort(-prob, kind="mergesort")
    p, y, weight = prob[order], y[order].astype(np.float64), weight[order]
    last = np.flatnonzero(np.r_[p[1:] != p[:-1], True])  # the end of each run of ties
    tp, fp = np.cumsum(weight * y)[last], np.cumsum(weight * (1 - y))[last]
    f1 = 2 * tp / (tp + fp + (weight @ y))
    return float(p[last[int(np.argmax(f1))]])


def coverage_hours(
    stay: np.ndarray, cutoff_h: np.ndarray, remaining_days: np.ndarray
) -> np.ndarray:
    """Hours of stay each row stands for: from its cutoff to the same stay's next row's cutoff,
    or to discharge (cutoff + remaining stay) for the stay's last row."""
    order = np.lexsort((cutoff_h, stay))
    s, c = stay[order], cutoff_h[order]
    end = c + 24.0 * remaining_days[order]
    following = np.r_[c[1:], np.inf]
    same = np.r_[s[1:] == s[:-1], False]
    covered = np.where(same, np.minimum(following, end), end) - c
    out = np.empty(len(stay))
    out[order] = np.maximum(covered, 0.0)
    return out


def alerts_per_100_patient_days(prob: np.ndarray, hours: np.ndarray, threshold: float) -> float:
    """100 x the share of patient time spent at or above the threshold: the alerts per 100
    patient-days of a once-daily review of the current score."""
    return float(100 * hours @ (prob >= threshold) / hours.sum())


def alert_threshold(prob: np.ndarray, hours: np.ndarray, per_100_patient_days: float) -> float:
    """The lowest cut giving at most ``per_100_patient_days`` alerts per 100 patient-days."""
    order = np.argsort(-prob, kind="mergesort")
    p, share = prob[order], 100 * np.cumsum(hours[order]) / hours.sum()
    last = np.flatnonzero(np.r_[p[1:] != p[:-1], True])
    within = last[share[last] <= per_100_patient_days + 1e-9]
    if not len(within):
        return float(np.nextafter(p[0], np.inf))  # even the top score alerts too often: none
    return float(p[within[-1]])


# --- length of stay ----------------------------------------------------------------------------


def regression(true: np.ndarray, pred: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Weighted MAE, RMSE and R² (against the weighted mean of the labels)."""
    total = w.sum(1)
    error = pred - true
    mean = _ratio(w @ true, total)
    sst = (w * (true[None, :] - mean[:, None]) ** 2).sum(1)
    return {
        "mae": _ratio(w @ np.abs(error), total),
        "rmse": np.sqrt(_ratio(w @ error**2, total)),
        "r2": 1 - _ratio(w @ error**2, sst),
    }
