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
- **Fits together.** The head and the folds run at once (`fit_together`, as
  many as the caller's memory allows), one pass over the rows serving all
  of them: one wide product per block instead of a K-wide one per fit,
  which BLAS runs well below its speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Row blocks for the statistics and the probabilities (bounded temporaries whatever N is).
BLOCK_ROWS = 8192
# Row blocks of one evaluation of the objective: its (EVAL_ROWS, K) logits are reused from block to block.
EVAL_ROWS = 4 * BLOCK_ROWS
# L-BFGS's memory: the curvature pairs it keeps (scipy's default).
MAX_CORRECTIONS = 10


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
        return self.fit_together([Task(rows, C, scale, init, tol, balanced)], max_iter)[0]

    def fit_together(self, tasks: list[Task], max_iter: int = 2000, together: int | None = None) -> list[Fit]:
        """Each task's `fit`, up to `together` of them at once (all by default; the next starts as one ends):
        whenever every running fit waits for its objective, one pass over the rows evaluates them all, with one
        product `X_block @ [A_1 ... A_m]` a block instead of m of them (a K-wide product leaves much of the
        cores' work undone: at 100 classes, a pass 500 wide costs 0.69 of five). Each fit runs scipy's L-BFGS-B in a
        thread of its own, which only waits while this thread computes, so every fit makes the steps it would
        make alone. Each fit running holds its own L-BFGS state: `state_bytes()`."""
        import scipy.optimize

        objectives = [_Objective(self, t) for t in tasks]

        def minimise(i: int, evaluate) -> Fit:
            task, objective = tasks[i], objectives[i]
            result = scipy.optimize.minimize(evaluate, objective.theta0(), jac=True, method="L-BFGS-B",
                                             options={"maxiter": max_iter, "gtol": task.tol, "ftol": 1e-12,
                                                      "maxcor": MAX_CORRECTIONS})
            return objective.result(result)

        if len(tasks) == 1:
            return [minimise(0, lambda theta: self._evaluate({0: theta}, objectives)[0])]
        return _Lockstep(len(tasks), minimise, lambda thetas: self._evaluate(thetas, objectives),
                         len(tasks) if together is None else together).run()

    def state_bytes(self) -> int:
        """The memory one running fit holds beside the rows, as measured: 145 MB at 4,096 x 100 parameters, 44
        float64 vectors of them (scipy's L-BFGS-B keeps 2 * 10 corrections and 5 more; the fit's own copies and
        the allocator's slack in its thread make the rest)."""
        return (2 * MAX_CORRECTIONS + 24) * (self.D * self.K + self.K) * 8

    def _evaluate(self, thetas: dict[int, np.ndarray], objectives: list[_Objective]) -> dict[int, tuple]:
        """{i: (objective value, gradient)} of the fits `thetas` names, in one pass over the rows."""
        fits = sorted(thetas)
        for i in fits:
            objectives[i].begin(thetas[i])
        # the rows cut where any fit's rows start or stop; each piece is rows of the same fits
        cuts = sorted({0, self.N} | {e for i in fits for r in objectives[i].task.rows for e in (r.start, r.stop)})
        K = self.K
        products = {}  # the fits of a piece -> their weights side by side (D, len * K)
        # blocks of fewer rows the more fits share them: the logits' buffer is one fit's, however many
        step = max(BLOCK_ROWS // 8, EVAL_ROWS // len(fits))
        buffer = np.empty(min(step, self.N) * len(fits) * K, np.float32)
        for lo, hi in zip(cuts, cuts[1:]):
            covering = tuple(i for i in fits if objectives[i].covers(lo))
            if not covering or lo == hi:
                continue
            if covering not in products:
                products[covering] = np.concatenate([objectives[i].A for i in covering], axis=1)
            A = products[covering]
            for start in range(lo, hi, step):
                stop = min(start + step, hi)
                Xb = self.X[start:stop]
                z = np.matmul(Xb, A, out=buffer[:(stop - start) * A.shape[1]].reshape(stop - start, A.shape[1]))
                for j, i in enumerate(covering):
                    objectives[i].block(z[:, j * K:(j + 1) * K], start, stop)
                grad = z.T @ Xb  # (len * K, D): the gradient transposed, as z.T @ X runs faster than X.T @ z
                for j, i in enumerate(covering):
                    objectives[i].dAt += grad[j * K:(j + 1) * K]
        return {i: objectives[i].end() for i in fits}

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


@dataclass
class Task:
    """One fit for `Problem.fit_together` (the arguments of `Problem.fit`)."""

    rows: list[slice]
    C: float
    scale: np.ndarray
    init: Fit | None = None
    tol: float = 1e-6
    balanced: bool = False


class _Objective:
    """The objective of one task and its gradient, accumulated block by block over its rows.

    In the parameters' terms (theta = W, b, standardised space), divided by C * n: the mean (weighted)
    cross-entropy + lam/2 |W|^2, with lam = 1 / (C * n)."""

    def __init__(self, problem: Problem, task: Task):
        self.problem, self.task = problem, task
        self.n = sum(r.stop - r.start for r in task.rows)
        self.inv_scale = (1.0 / task.scale).astype(np.float32)
        self.lam = 1.0 / (task.C * self.n)
        self.class_weight = None
        if task.balanced:
            y = np.concatenate([problem.y[r] for r in task.rows])
            counts = np.bincount(y, minlength=problem.K)
            self.class_weight = self.n / (problem.K * np.maximum(counts, 1))  # the rows' weights sum to n

    def covers(self, row: int) -> bool:
        return any(r.start <= row < r.stop for r in self.task.rows)

    def theta0(self) -> np.ndarray:
        init, D, K = self.task.init, self.problem.D, self.problem.K
        if init is None:
            return np.zeros(D * K + K)
        return np.concatenate([init.coef.astype(np.float64).ravel(), init.intercept.astype(np.float64)])

    def begin(self, theta: np.ndarray) -> None:
        D, K = self.problem.D, self.problem.K
        self.W = theta[: D * K].reshape(D, K).astype(np.float32)
        self.b = theta[D * K:].astype(np.float32)
        self.A = self.W * self.inv_scale[:, None]
        self.loss = 0.0
        self.dAt = np.zeros((K, D), np.float32)
        self.db = np.zeros(K, np.float64)

    def block(self, z: np.ndarray, start: int, stop: int) -> None:
        """Take in the logits `z` (overwritten) of rows start:stop, all among this task's rows."""
        m = stop - start
        y = self.problem.y[start:stop]
        w = None if self.class_weight is None else self.class_weight[y]
        z += self.b
        z -= z.max(axis=1, keepdims=True)
        at = (np.arange(m), y)
        picked = z[at].astype(np.float64)
        np.exp(z, out=z)  # one exp: z becomes the softmax's numerators, then its probabilities
        total = z.sum(axis=1, dtype=np.float64)
        row_loss = np.log(total) - picked
        self.loss += float(row_loss.sum() if w is None else row_loss @ w)
        z *= ((1.0 if w is None else w) / total).astype(np.float32)[:, None]
        z[at] -= np.float32(1.0) if w is None else w.astype(np.float32)
        self.db += z.sum(axis=0, dtype=np.float64)

    def end(self) -> tuple[float, np.ndarray]:
        W64 = self.W.astype(np.float64)
        value = self.loss / self.n + 0.5 * self.lam * float(np.sum(W64 * W64))
        dW = (self.dAt.T * self.inv_scale[:, None]).astype(np.float64) / self.n + self.lam * W64
        return value, np.concatenate([dW.ravel(), self.db / self.n])

    def result(self, result) -> Fit:
        D, K, task = self.problem.D, self.problem.K, self.task
        theta = result.x
        return Fit(coef=theta[: D * K].reshape(D, K).astype(np.float32), intercept=theta[D * K:].astype(np.float32),
                   scale=task.scale.astype(np.float32), C=task.C, iterations=int(result.nit),
                   evaluations=int(result.nfev), objective=float(result.fun) * task.C * self.n,
                   converged=result.status != 1)


class _Abandoned(Exception):
    """Raised in a fit's thread when the run it belongs to has stopped (an error elsewhere, or Ctrl-C)."""


class _Lockstep:
    """Runs `minimise(i, evaluate)` for i < count, each in a thread, at most `together` at a time (in order,
    the next starting as one ends), and answers their `evaluate(theta)` calls in this thread: once every
    running one is waiting, `evaluate_many({i: theta})` answers them all in one call. An error in any of them
    (or Ctrl-C here) stops them all and is raised here."""

    def __init__(self, count: int, minimise, evaluate_many, together: int):
        import threading

        self.count, self.minimise, self.evaluate_many = count, minimise, evaluate_many
        self.together = max(1, together)
        self.changed = threading.Condition()
        self.pending: dict[int, np.ndarray] = {}
        self.answers: dict[int, tuple] = {}
        self.active = 0  # started, not ended
        self.error: BaseException | None = None
        self.stopped = False
        self.results: list = [None] * count
        self.threads = [threading.Thread(target=self._one, args=(i,), daemon=True, name=f"vggembed-fit-{i}")
                        for i in range(count)]
        self.started = 0

    def _evaluate(self, i: int, theta: np.ndarray) -> tuple:
        with self.changed:
            if self.stopped:
                raise _Abandoned
            self.pending[i] = theta
            self.changed.notify_all()
            while i not in self.answers and not self.stopped:
                self.changed.wait()
            if self.stopped:
                raise _Abandoned
            return self.answers.pop(i)

    def _one(self, i: int) -> None:
        try:
            self.results[i] = self.minimise(i, lambda theta: self._evaluate(i, theta))
        except _Abandoned:
            pass
        except BaseException as e:  # handed to the thread that waits for the run
            with self.changed:
                if self.error is None:
                    self.error = e
                self.stopped = True
        finally:
            with self.changed:
                self.active -= 1
                self.changed.notify_all()

    def run(self) -> list:
        try:
            while True:
                with self.changed:
                    while not self.stopped:
                        while self.started < self.count and self.active < self.together:
                            self.active += 1
                            self.threads[self.started].start()
                            self.started += 1
                        if not self.active or len(self.pending) >= self.active:
                            break
                        self.changed.wait()
                    if self.stopped or not self.active:
                        break
                    thetas, self.pending = self.pending, {}
                answers = self.evaluate_many(thetas)  # every running fit is waiting meanwhile
                with self.changed:
                    self.answers.update(answers)
                    self.changed.notify_all()
        except BaseException:
            with self.changed:
                self.stopped = True
                self.changed.notify_all()
            raise
        for t in self.threads[:self.started]:
            t.join()
        if self.error is not None:
            raise self.error
        return self.results
