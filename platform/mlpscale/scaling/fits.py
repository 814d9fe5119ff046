"""Least-squares fits of the scaling laws, each reporting a status instead of silently returning numbers.

- compute law  E(C) = a (b + C)^-alpha + E_inf      (paper Eq. 5, scipy curve_fit)
- power law    E(x) = a x^-alpha + E_inf             (Figure 6, x = parameters or examples)
- joint law    E(P, N) = E_inf + A P^-alpha_P + B N^-alpha_N  (Hoffmann et al.'s third approach)
- log-log line log y = slope log x + intercept        (Figure 7's P*(C), N*(C))

Conditioning: x is divided by its geometric mean, residuals are taken on log error, and every fit
starts from a small grid of initial values within bounds; the best converged start wins.
Statuses: ok, insufficient_data (the message says how many points are needed), not_converged.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import OptimizeWarning, curve_fit, minimize
from threadpoolctl import threadpool_limits

from mlpscale.scaling.points import resample_runs

log = logging.getLogger(__name__)

OK, INSUFFICIENT, NOT_CONVERGED = "ok", "insufficient_data", "not_converged"
MIN_COMPUTE_POINTS = 5  # 4 parameters + 1
MIN_POWER_POINTS = 4  # 3 parameters + 1
MIN_JOINT_SIZES = 3  # distinct model sizes and data sizes for two exponents
MIN_JOINT_POINTS = 6  # 5 parameters + 1
MIN_LINE_POINTS = 3  # 2 parameters + 1
HUBER_DELTA = 1e-3
MAX_ALPHA = 5.0


@dataclass
class LawFit:
    """A fitted law: status, message, parameters (None unless ok), log-space goodness of fit."""

    law: str
    status: str
    message: str = ""
    params: dict[str, float] | None = None
    goodness: dict[str, float] | None = None
    at_bounds: list[str] = field(default_factory=list)
    n_points: int = 0

    @property
    def ok(self) -> bool:
        return self.status == OK


def compute_law(compute, a, b, alpha, e_inf):
    """E(C) = a (b + C)^-alpha + E_inf, evaluated in log space so huge a and C do not overflow."""
    compute = np.asarray(compute, dtype=float)
    return np.exp(np.log(a) - alpha * np.log(b + compute)) + e_inf


def power_law(x, a, alpha, e_inf):
    """E(x) = a x^-alpha + E_inf."""
    x = np.asarray(x, dtype=float)
    return np.exp(np.log(a) - alpha * np.log(x)) + e_inf


def joint_law(num_params, n_train, e_inf, A, B, alpha_P, alpha_N):
    """E(P, N) = E_inf + A P^-alpha_P + B N^-alpha_N."""
    return e_inf + np.exp(np.log(A) - alpha_P * np.log(num_params)) + np.exp(np.log(B) - alpha_N * np.log(n_train))


def goodness_log(error, predicted) -> dict[str, float]:
    """R^2 and RMSE of log error (natural log)."""
    y, y_hat = np.log(np.asarray(error, float)), np.log(np.asarray(predicted, float))
    residual = y - y_hat
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual**2)) / total if total > 0 else float("nan")
    return {"r2_log": r2, "rmse_log": float(np.sqrt(np.mean(residual**2))), "n_points": int(len(y))}


def _best_curve_fit(model, x, y, starts, bounds):
    """Run curve_fit from each start; the lowest sum of squares among converged starts, or None."""
    best, best_sse = None, np.inf
    lower, upper = bounds
    for start in starts:
        start = np.clip(np.asarray(start, float), np.asarray(lower) + 1e-12, np.asarray(upper) - 1e-12)
        try:
            with warnings.catch_warnings(), threadpool_limits(1):
                warnings.simplefilter("ignore", OptimizeWarning)
                warnings.simplefilter("ignore", RuntimeWarning)
                params, _ = curve_fit(model, x, y, p0=start, bounds=bounds, method="trf", max_nfev=4000)
        except (RuntimeError, ValueError, FloatingPointError):
            continue
        sse = float(np.sum((model(x, *params) - y) ** 2))
        if np.isfinite(sse) and sse < best_sse:
            best, best_sse = params, sse
    return best


def _reject_pinned_exponents(fit: LawFit) -> LawFit:
    """An exponent on its bound means the points do not follow a decaying power law: no usable fit."""
    pinned = [name for name in fit.at_bounds if name.startswith("alpha")]
    if pinned:
        values = ", ".join(f"{name}={fit.params[name]:.4g}" for name in dict.fromkeys(pinned))
        fit.status = NOT_CONVERGED
        fit.message = (
            f"{values} ended on its bound [1e-3, {MAX_ALPHA}]: the points do not follow a decaying "
            f"power law (check the metric, or add points over a wider range)"
        )
    return fit


def _near(value, bound, scale) -> bool:
    return abs(value - bound) <= 1e-6 * max(abs(scale), 1.0)


def fit_compute_law(compute, error, initial: dict | None = None) -> LawFit:
    """Fit E(C) = a (b + C)^-alpha + E_inf to frontier points (C in FLOPs, error > 0).

    `initial` (a, b, alpha, e_inf), e.g. the full-data fit for a bootstrap replicate, replaces the start grid.
    """
    compute, error = np.asarray(compute, float), np.asarray(error, float)
    n_distinct = len(np.unique(compute))
    fit = LawFit("compute_law", INSUFFICIENT, n_points=len(compute))
    if n_distinct < MIN_COMPUTE_POINTS:
        fit.message = (
            f"the compute law has 4 parameters and needs at least {MIN_COMPUTE_POINTS} frontier "
            f"points at distinct compute; got {n_distinct}. Add runs (more model sizes, data "
            f"sizes or epochs) or use --epochs all"
        )
        return fit
    scale = float(np.exp(np.mean(np.log(compute))))
    x, y = compute / scale, np.log(error)
    e_min, e_mid = float(error.min()), float(np.exp(np.mean(y)))

    def model(x, log_a, b, alpha, e_inf):
        return np.log(np.exp(log_a - alpha * np.log(b + x)) + e_inf)

    bounds = ([-30.0, 0.0, 1e-3, 0.0], [30.0, float(x.max()), MAX_ALPHA, 0.999 * e_min])
    starts = []
    for alpha, e_frac, b in itertools.product((0.1, 0.3, 1.0), (0.0, 0.5, 0.9), (0.0, float(x.min()))):
        e_inf = e_frac * e_min
        starts.append([np.log(max(e_mid - e_inf, 1e-6)), b, alpha, e_inf])
    if initial:
        alpha = initial["alpha"]
        starts = [
            [
                np.log(initial["a"]) - alpha * np.log(scale),
                initial["b"] / scale,
                alpha,
                min(initial["e_inf"], 0.99 * e_min),
            ],
            starts[4],
        ]
    best = _best_curve_fit(model, x, y, starts, bounds)
    if best is None:
        fit.status, fit.message = NOT_CONVERGED, "curve_fit did not converge from any start"
        return fit
    log_a, b_scaled, alpha, e_inf = (float(v) for v in best)
    fit.params = {
        "a": float(np.exp(log_a + alpha * np.log(scale))),
        "b": b_scaled * scale,
        "alpha": alpha,
        "e_inf": e_inf,
    }
    fit.status = OK
    fit.at_bounds = [
        name
        for name, value, bound in (
            ("alpha", alpha, MAX_ALPHA),
            ("alpha", alpha, 1e-3),
            ("e_inf", e_inf, bounds[1][3]),
            ("b", b_scaled, bounds[1][1]),
        )
        if _near(value, bound, bound)
    ]
    fit.goodness = goodness_log(error, compute_law(compute, **fit.params))
    return _reject_pinned_exponents(fit)


def fit_power_law(x, error, law: str = "power_law", what: str = "x values", initial: dict | None = None) -> LawFit:
    """Fit E(x) = a x^-alpha + E_inf (x = parameters or examples).

    `initial` (a, alpha, e_inf) replaces the start grid.
    """
    x, error = np.asarray(x, float), np.asarray(error, float)
    n_distinct = len(np.unique(x))
    fit = LawFit(law, INSUFFICIENT, n_points=len(x))
    if n_distinct < MIN_POWER_POINTS:
        fit.message = f"{law} has 3 parameters and needs at least {MIN_POWER_POINTS} distinct {what}; got {n_distinct}"
        return fit
    scale = float(np.exp(np.mean(np.log(x))))
    u, y = x / scale, np.log(error)
    e_min, e_mid = float(error.min()), float(np.exp(np.mean(y)))

    def model(u, log_a, alpha, e_inf):
        return np.log(np.exp(log_a - alpha * np.log(u)) + e_inf)

    bounds = ([-30.0, 1e-3, 0.0], [30.0, MAX_ALPHA, 0.999 * e_min])
    starts = [
        [np.log(max(e_mid - f * e_min, 1e-6)), alpha, f * e_min]
        for alpha, f in itertools.product((0.1, 0.3, 1.0, 2.0), (0.0, 0.5, 0.9))
    ]
    if initial:
        alpha = initial["alpha"]
        starts = [[np.log(initial["a"]) - alpha * np.log(scale), alpha, min(initial["e_inf"], 0.99 * e_min)], starts[4]]
    best = _best_curve_fit(model, u, y, starts, bounds)
    if best is None:
        fit.status, fit.message = NOT_CONVERGED, "curve_fit did not converge from any start"
        return fit
    log_a, alpha, e_inf = (float(v) for v in best)
    fit.params = {"a": float(np.exp(log_a + alpha * np.log(scale))), "alpha": alpha, "e_inf": e_inf}
    fit.status = OK
    fit.at_bounds = [
        name
        for name, value, bound in (("alpha", alpha, MAX_ALPHA), ("alpha", alpha, 1e-3), ("e_inf", e_inf, bounds[1][2]))
        if _near(value, bound, bound)
    ]
    fit.goodness = goodness_log(error, power_law(x, **fit.params))
    return _reject_pinned_exponents(fit)


def _huber(residual, delta):
    absolute = np.abs(residual)
    loss = np.where(absolute <= delta, 0.5 * residual**2, delta * (absolute - 0.5 * delta))
    grad = np.clip(residual, -delta, delta)
    return loss, grad


def fit_joint_law(num_params, n_train, error, initial: dict | None = None) -> LawFit:
    """Fit E(P, N) = E_inf + A P^-alpha_P + B N^-alpha_N: Huber loss on log error, L-BFGS-B from a grid of starts.

    `initial` (e_inf, A, B, alpha_P, alpha_N) replaces the start grid.
    """
    P, N, E = (np.asarray(v, float) for v in (num_params, n_train, error))
    fit = LawFit("joint_law", INSUFFICIENT, n_points=len(E))
    n_p, n_n = len(np.unique(P)), len(np.unique(N))
    if n_p < MIN_JOINT_SIZES or n_n < MIN_JOINT_SIZES or len(E) < MIN_JOINT_POINTS:
        fit.message = (
            f"the joint law E(P, N) has 5 parameters and needs at least {MIN_JOINT_SIZES} distinct "
            f"model sizes, {MIN_JOINT_SIZES} distinct data sizes and {MIN_JOINT_POINTS} runs; got "
            f"{n_p} model sizes, {n_n} data sizes, {len(E)} runs"
        )
        return fit
    p_scale, n_scale = float(np.exp(np.mean(np.log(P)))), float(np.exp(np.mean(np.log(N))))
    lp, ln, y = np.log(P / p_scale), np.log(N / n_scale), np.log(E)
    e_min, e_mid = float(E.min()), float(np.exp(np.mean(y)))

    def objective(theta):
        log_a, log_b, log_e, alpha_p, alpha_n = theta
        terms = np.stack([log_a - alpha_p * lp, log_b - alpha_n * ln, np.full_like(lp, log_e)])
        top = terms.max(axis=0)
        predicted = top + np.log(np.exp(terms - top).sum(axis=0))
        weights = np.exp(terms - predicted)
        loss, dloss = _huber(predicted - y, HUBER_DELTA)
        grad = np.array(
            [
                np.sum(dloss * weights[0]),
                np.sum(dloss * weights[1]),
                np.sum(dloss * weights[2]),
                -np.sum(dloss * weights[0] * lp),
                -np.sum(dloss * weights[1] * ln),
            ]
        )
        return float(np.sum(loss)), grad

    bounds = [(-20.0, 10.0), (-20.0, 10.0), (-20.0, float(np.log(e_min))), (1e-3, MAX_ALPHA), (1e-3, MAX_ALPHA)]
    starts = [
        [np.log(0.3 * e_mid), np.log(0.3 * e_mid), np.log(fe * e_min), ap, an]
        for fe, ap, an in itertools.product((0.1, 0.7), (0.2, 0.6, 1.5), (0.2, 0.6, 1.5))
    ]
    if initial:
        a_p, a_n = initial["alpha_P"], initial["alpha_N"]
        starts = [
            [
                np.log(initial["A"]) - a_p * np.log(p_scale),
                np.log(initial["B"]) - a_n * np.log(n_scale),
                np.log(min(initial["e_inf"], 0.99 * e_min)),
                a_p,
                a_n,
            ],
            starts[13],
        ]
    best, best_loss = None, np.inf
    for start in starts:
        start = np.array([np.clip(v, lo + 1e-9, hi - 1e-9) for v, (lo, hi) in zip(start, bounds)])
        with warnings.catch_warnings(), threadpool_limits(1):  # BLAS threads only slow tiny problems down
            warnings.simplefilter("ignore", RuntimeWarning)
            result = minimize(objective, start, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 2000})
        if result.success and np.isfinite(result.fun) and result.fun < best_loss:
            best, best_loss = result.x, float(result.fun)
    if best is None:
        fit.status, fit.message = NOT_CONVERGED, "L-BFGS-B did not converge from any start"
        return fit
    log_a, log_b, log_e, alpha_p, alpha_n = (float(v) for v in best)
    fit.params = {
        "e_inf": float(np.exp(log_e)),
        "A": float(np.exp(log_a + alpha_p * np.log(p_scale))),
        "B": float(np.exp(log_b + alpha_n * np.log(n_scale))),
        "alpha_P": alpha_p,
        "alpha_N": alpha_n,
    }
    fit.status = OK
    fit.at_bounds = [
        name
        for name, value in (("alpha_P", alpha_p), ("alpha_N", alpha_n))
        if _near(value, MAX_ALPHA, MAX_ALPHA) or _near(value, 1e-3, 1.0)
    ]
    fit.goodness = goodness_log(E, joint_law(P, N, **fit.params))
    return _reject_pinned_exponents(fit)


def fit_loglog_line(x, y, law: str = "line", what: str = "points") -> LawFit:
    """Least squares of log y = slope log x + intercept (natural logs)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    fit = LawFit(law, INSUFFICIENT, n_points=len(x))
    if len(x) < MIN_LINE_POINTS or len(np.unique(x)) < 2:
        fit.message = f"{law} needs at least {MIN_LINE_POINTS} {what} at distinct compute; got {len(np.unique(x))}"
        return fit
    lx, ly = np.log(x), np.log(y)
    slope, intercept = np.polyfit(lx, ly, 1)
    fit.params = {"slope": float(slope), "intercept": float(intercept)}
    fit.status = OK
    fit.goodness = goodness_log(y, np.exp(intercept + slope * lx))
    return fit


def bootstrap_ci(
    points: pd.DataFrame, estimate: Callable[[pd.DataFrame], dict | None], n_boot: int, seed: int, level: float = 0.95
) -> dict:
    """Percentile intervals of `estimate` over replicates that resample runs; failed replicates are counted."""
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    failed = 0
    for _ in range(int(n_boot)):
        values = estimate(resample_runs(points, rng))
        if not values:
            failed += 1
            continue
        for name, value in values.items():
            samples.setdefault(name, []).append(float(value))
    tail = 100 * (1 - level) / 2
    ci: dict = {"level": level, "n_boot": int(n_boot), "n_failed": failed}
    for name, values in samples.items():
        ci[name] = [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
    return ci
