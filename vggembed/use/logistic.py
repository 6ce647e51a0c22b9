"""Multinomial logistic regression (softmax, cross-entropy, L2) on one float32 matrix held once in memory.

The objective is scikit-learn's `LogisticRegression(C=C)` on standardised
features: `0.5 * |W|^2 + C * sum_i CE(softmax(z_i W + b), y_i)`, the intercept
unpenalised, `z = (x - mean) / scale`. It is minimised by L-BFGS (scipy) in
the parameters, with the matrix products in float32 (the features' own type,
half the memory of scikit-learn's float64 copy).

What makes it fast where `LogisticRegression(lbfgs)` is slow:

- **One matrix, every fit.** The rows are laid out fold by fold, so a fold's
  training rows are two contiguous slices of the same array: no fold is
  copied. Centring is done once, in place; it changes no solution (the
  unpenalised intercept absorbs it) and makes the intercept well-conditioned.
  A fold's own scaling (from its training rows only, so no statistic of the
  held-out rows reaches its model) is folded into the weights, `W / scale`,
  instead of into the rows.
- **Warm starts.** The regularisation sweep runs from strong to weak L2, each
  fit starting from the last, and the head starts from the sweep's choice.
  (The folds start from zero: a start that saw a fold's held-out rows would
  leak them into its figures.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Row blocks for the statistics and the probabilities (bounded temporaries whatever N is).
BLOCK_ROWS = 8192
# Row blocks of one evaluation of the objective: its (EVAL_ROWS, K) logits are reused from block to block.
EVAL_ROWS = 4 * BLOCK_ROWS


@dataclass
class Fit:
    """One fitted model: `logits = ((x - mean) / scale) @ coef + intercept`."""

    coef: np.ndarray  # (D, K) float32, standardised space
    intercept: np.ndarray  # (K,) float32
    scale: np.ndarray  # (D,) float32
    C: float
    iterations: int
    evaluations: int  # of the objective and its gradient: each one pass over the rows (forward and backward)
    objective: float  # 0.5 |W|^2 + C * sum CE, scikit-learn's scale
    converged: bool  # False only when it stopped at max_iter (a line search that cannot improve on float32's
    # resolution near the minimum counts as converged)


class Problem:
    """Rows of one centred float32 matrix and their classes, which every fit of a run shares.

    Args:
        X: (N, D) float32, C-contiguous; centred in place (by `mean`, kept as `self.mean`).
        y: (N,) class indices 0..K-1.
        classes: K.
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, classes: int):
        if X.dtype != np.float32 or not X.flags.c_contiguous:
            raise ValueError("X must be C-contiguous float32")
        self.X, self.y, self.K = X, np.asarray(y, np.int64), classes
        self.N, self.D = X.shape
        self.mean = np.zeros(self.D, np.float64)
        for start in range(0, self.N, BLOCK_ROWS):
            self.mean += X[start:start + BLOCK_ROWS].sum(axis=0, dtype=np.float64)
        self.mean /= max(self.N, 1)
        mean32 = self.mean.astype(np.float32)
        for start in range(0, self.N, BLOCK_ROWS):
            X[start:start + BLOCK_ROWS] -= mean32

    # ------------------------------------------------------------ statistics
    def sums(self, rows: list[slice]) -> tuple[np.ndarray, np.ndarray, int]:
        """Sum and sum of squares (float64) of the centred features over `rows`, and their count."""
        s = np.zeros(self.D, np.float64)
        q = np.zeros(self.D, np.float64)
        n = 0
        for r in rows:
            for start in range(r.start, r.stop, BLOCK_ROWS):
                block = self.X[start:min(start + BLOCK_ROWS, r.stop)]
                s += block.sum(axis=0, dtype=np.float64)
                q += np.einsum("ij,ij->j", block, block, dtype=np.float64)
                n += len(block)
        return s, q, n

    @staticmethod
    def scale_from(s: np.ndarray, q: np.ndarray, n: int) -> np.ndarray:
        """The standard deviation (ddof 0) per feature, 1 where a feature is constant (as StandardScaler)."""
        var = np.maximum(q / n - (s / n) ** 2, 0.0)
        std = np.sqrt(var)
        std[std <= 1e-7 * max(float(std.max()), 1e-30)] = 1.0
        return std

    # ------------------------------------------------------------------ fit
    def fit(self, rows: list[slice], C: float, scale: np.ndarray, init: Fit | None = None,
            tol: float = 1e-6, max_iter: int = 2000, balanced: bool = False) -> Fit:
        """Minimise the objective over `rows` (slices of X) at `C`, with features divided by `scale`, starting
        from `init`'s weights (a fit at another C or on other rows) when given. `balanced` weighs each row's
        cross-entropy by n / (K * its class's rows among `rows`), as scikit-learn's class_weight="balanced":
        every class then weighs as much in the loss, however few its rows."""
        import scipy.optimize

        n = sum(r.stop - r.start for r in rows)
        D, K = self.D, self.K
        inv_scale = (1.0 / scale).astype(np.float32)
        y = np.concatenate([self.y[r] for r in rows])
        weight = None
        if balanced:
            counts = np.bincount(y, minlength=K)
            weight = (n / (K * np.maximum(counts, 1)))[y]  # they sum to n, as the unweighted rows
        lam = 1.0 / (C * n)  # the objective divided by C * n: mean cross-entropy + lam/2 |W|^2

        def f(theta):
            W = theta[: D * K].reshape(D, K).astype(np.float32)
            b = theta[D * K:].astype(np.float32)
            A = W * inv_scale[:, None]
            loss = 0.0
            dAt = np.zeros((K, D), np.float32)  # the gradient transposed: z.T @ X runs faster than X.T @ z
            db = np.zeros(K, np.float64)
            offset = 0
            for r in rows:
                for start in range(r.start, r.stop, EVAL_ROWS):
                    Xb = self.X[start:min(start + EVAL_ROWS, r.stop)]
                    m = len(Xb)
                    z = np.matmul(Xb, A, out=buffer[:m])
                    z += b
                    z -= z.max(axis=1, keepdims=True)
                    at = (np.arange(m), y[offset:offset + m])
                    w = None if weight is None else weight[offset:offset + m]
                    offset += m
                    picked = z[at].astype(np.float64)
                    np.exp(z, out=z)  # one exp: z becomes the softmax's numerators, then its probabilities
                    total = z.sum(axis=1, dtype=np.float64)
                    row_loss = np.log(total) - picked
                    loss += float(row_loss.sum() if w is None else row_loss @ w)
                    z *= ((1.0 if w is None else w) / total).astype(np.float32)[:, None]
                    z[at] -= np.float32(1.0) if w is None else w.astype(np.float32)
                    dAt += z.T @ Xb
                    db += z.sum(axis=0, dtype=np.float64)
            W64 = W.astype(np.float64)
            value = loss / n + 0.5 * lam * float(np.sum(W64 * W64))
            dW = (dAt.T * inv_scale[:, None]).astype(np.float64) / n + lam * W64
            return value, np.concatenate([dW.ravel(), db / n])

        buffer = np.empty((min(EVAL_ROWS, n), K), np.float32)
        if init is None:
            theta0 = np.zeros(D * K + K)
        else:
            theta0 = np.concatenate([init.coef.astype(np.float64).ravel(), init.intercept.astype(np.float64)])
        result = scipy.optimize.minimize(f, theta0, jac=True, method="L-BFGS-B",
                                         options={"maxiter": max_iter, "gtol": tol, "ftol": 1e-12,
                                                  "maxcor": 10})
        theta = result.x
        return Fit(coef=theta[: D * K].reshape(D, K).astype(np.float32), intercept=theta[D * K:].astype(np.float32),
                   scale=scale.astype(np.float32), C=C, iterations=int(result.nit),
                   evaluations=int(result.nfev), objective=float(result.fun) * C * n, converged=result.status != 1)

    def proba(self, fit: Fit, rows: slice) -> np.ndarray:
        """(rows, K) float32 probabilities of `rows` under `fit`."""
        A = fit.coef * (1.0 / fit.scale)[:, None]
        out = np.empty((rows.stop - rows.start, self.K), np.float32)
        for start in range(rows.start, rows.stop, EVAL_ROWS):
            stop = min(start + EVAL_ROWS, rows.stop)
            z = self.X[start:stop] @ A
            z += fit.intercept
            z -= z.max(axis=1, keepdims=True)
            np.exp(z, out=z)
            z /= z.sum(axis=1, keepdims=True)
            out[start - rows.start: stop - rows.start] = z
        return out
