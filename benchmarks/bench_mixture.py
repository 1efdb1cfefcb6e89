"""Benchmark the set-to-model layer (s2m.mixture) against scikit-learn, unrolled EM and the dense solve.

Run on demand, never by pytest:

    python benchmarks/bench_mixture.py [--quick] [--device cpu|cuda] [--threads N] [--repeats R]
        [--dense-memory-limit-gb GB] [--dense-time-limit-s S] [--output docs/benchmarks.md]

``--quick`` measures small sizes only, as a check that everything runs: the forward fit of
32 sets of D = 64 with K = 2, and the backward of 4 sets with D in {64, 256} and K in
{1, 2}. It judges no goal.

Every set has N = 50 points drawn around 3 centres and L2-normalised
(``s2m.mixture.synthetic.clustered_sets`` with noise 0.5). Measurements:

* forward fit: ``fit_diagonal_gmm`` on 256 sets of D = 256 against scikit-learn's
  ``GaussianMixture(covariance_type="diag")`` fitted set by set. Both start from the same
  initial parameters (our k-means++ initialisation, computed beforehand), with the same
  ``max_iter`` and ``tol``, and with priors and ``reg_covar`` near zero so that both
  maximise the same objective. scikit-learn always gets the points in float64, also in
  the rows where our fit runs in float32. The time of our fit including its own k-means++
  initialisation is reported too;
* backward: the gradient of a fixed random linear loss on the fitted weights, means and
  variances, for B = 8 sets, by the implicit backward, by unrolled EM (which runs the same
  iterations, since its forward is the same code), and by the dense autograd Hessian
  solve (``implicit_gradient_dense``) where it fits the memory and time limits;
* peak memory of each backward method, forward included, measured in a fresh process
  (peak RSS growth on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA).

Timings interleave the methods and report the minimum over repeats, because other
processes may share the machine. With ``--output`` the results replace this device's
section of the Markdown file and leave the rest of the file unchanged.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("bench_mixture")

N_POINTS = 50
DATA_CLUSTERS = 3
DATA_NOISE = 0.5
SEED = 0

FORWARD_GOAL_SPEEDUP = 10.0
FORWARD_GOAL_LOGLIK_RELATIVE = 1e-4
BACKWARD_GOAL_SPEEDUP = 5.0
BACKWARD_GOAL_MIN_DIM = 256

# Objective of the forward comparison: priors this small change the fit by about 1e-10
# relative, and reg_covar adds the same order of magnitude to scikit-learn's variances.
FLAT_PRIOR_VARIANCE = 1.0
FLAT_PRIOR_COUNT = 1e-10
SKLEARN_REG_COVAR = 1e-10
MAX_ITER = 100
TOL = 1e-6

# A backward pass at the small sizes takes well under a millisecond, where the noise of a
# shared machine is largest, so its minimum is taken over more runs.
BACKWARD_REPEAT_FACTOR = 4

# A forward fit of s2m takes tens of milliseconds against a few hundred for scikit-learn, so
# its minimum is taken over more runs.
FORWARD_REPEAT_FACTOR = 3

DENSE_CHUNK_SIZE = 64
# Autograd intermediates, in tensor entries, per Hessian row and per (point, component,
# dimension), and the memory that torch.func adds whatever the size. With the B Hessians
# of P^2 entries, kept and then stacked, these estimated the peaks measured on a CPU from
# D = 256 to 4096 within -3 % to +50 %. Used only to decide whether the dense solve can run.
DENSE_GRAPH_ENTRIES = 32
DENSE_BASE_BYTES = 100e6
# Building H with autograd slows down more than linearly at large sizes (bigger vmapped
# temporaries), so the time calibrated at a small size is doubled.
DENSE_TIME_SAFETY = 2.0


@dataclass(frozen=True)
class Settings:
    """Options shared by every measurement."""

    device: str
    threads: int
    forward_threads: tuple[int, ...]
    repeats: int
    dense_memory_limit_gb: float
    dense_time_limit_s: float


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run."""

    forward_sets: int
    forward_dim: int
    forward_components: tuple[int, ...]
    backward_sets: int
    backward_dims: tuple[int, ...]
    backward_components: tuple[int, ...]
    judged: bool


# The goals hold for the full sizes only, so a quick run reports no verdict.
FULL_PLAN = Plan(256, 256, (2, 4), 8, (64, 256, 1280, 4096), (1, 2, 4), judged=True)
QUICK_PLAN = Plan(32, 64, (2,), 4, (64, 256), (1, 2), judged=False)


# Worker functions. Each runs in a fresh spawned process so that imports, thread settings
# and peak memory do not leak between measurements.


def configure_worker(settings: Settings, threads: int | None = None):
    """Import torch in a worker, set its threads (``settings.threads`` unless given) and return the module."""
    import torch

    torch.set_num_threads(threads or settings.threads)
    warnings.simplefilter("ignore")
    return torch


def synchronize(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def read_status_kib(key: str) -> int:
    """Read a memory field of /proc/self/status, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status")


class PeakMemory:
    """Context manager that measures the peak memory growth of its body, in bytes.

    On the CPU it resets the peak RSS through /proc/self/clear_refs (Linux 4.0 or later) and
    reports VmHWM minus the RSS at entry, so memory that the allocator reuses from earlier
    work is not counted. On CUDA it reports ``torch.cuda.max_memory_allocated`` growth.
    """

    def __init__(self, torch, device: str):
        self.torch = torch
        self.device = device
        self.bytes = 0

    def __enter__(self):
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.start = self.torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            self.start = read_status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()
            self.bytes = self.torch.cuda.max_memory_allocated() - self.start
        else:
            self.bytes = read_status_kib("VmHWM") * 1024 - self.start
        return False


def backward_inputs(torch, settings: Settings, n_sets: int, dim: int, n_components: int):
    """Build the points of a backward measurement and the cotangents of its linear loss."""
    from s2m.mixture.synthetic import clustered_sets

    points = clustered_sets(n_sets, N_POINTS, dim, DATA_CLUSTERS, noise=DATA_NOISE, seed=SEED, dtype=torch.float32)
    generator = torch.Generator().manual_seed(SEED + 1)
    shapes = ((n_sets, n_components), (n_sets, n_components, dim), (n_sets, n_components, dim))
    cotangents = tuple(torch.randn(shape, generator=generator).to(settings.device) for shape in shapes)
    return points.to(settings.device), cotangents


def fit_and_differentiate(torch, settings, points, n_components, cotangents, backward):
    """Run the forward fit and the gradient of the linear loss, and return the fit, the gradient and both times."""
    from s2m.mixture import fit_diagonal_gmm

    leaf = points.clone().requires_grad_(True)
    synchronize(torch, settings.device)
    start = time.perf_counter()
    fit = fit_diagonal_gmm(leaf, n_components, max_iter=MAX_ITER, tol=TOL, backward=backward)
    synchronize(torch, settings.device)
    forward_s = time.perf_counter() - start

    parameters = (fit.weights, fit.means, fit.variances)
    loss = sum((cotangent * parameter).sum() for cotangent, parameter in zip(cotangents, parameters))
    start = time.perf_counter()
    (gradient,) = torch.autograd.grad(loss, leaf)
    synchronize(torch, settings.device)
    return fit, gradient, forward_s, time.perf_counter() - start


def relative_difference(torch, value, reference) -> float:
    scale = reference.abs().max().item()
    return (value - reference).abs().max().item() / scale if scale > 0 else math.inf


def time_backward(settings: Settings, n_sets: int, dim: int, n_components: int) -> dict:
    """Time the implicit and unrolled backward side by side, interleaved, and compare their gradients."""
    torch = configure_worker(settings)
    points, cotangents = backward_inputs(torch, settings, n_sets, dim, n_components)

    times = {"implicit": [], "unrolled": [], "forward": []}
    results = {}
    for repeat in range(BACKWARD_REPEAT_FACTOR * settings.repeats + 1):
        for backward in ("implicit", "unrolled"):
            fit, gradient, forward_s, backward_s = fit_and_differentiate(
                torch, settings, points, n_components, cotangents, backward
            )
            results[backward] = (fit, gradient)
            if repeat > 0:
                times[backward].append(backward_s)
                if backward == "implicit":
                    times["forward"].append(forward_s)

    implicit_fit, implicit_gradient = results["implicit"]
    unrolled_fit, unrolled_gradient = results["unrolled"]
    return {
        "n_iter": implicit_fit.n_iter.float().mean().item(),
        "same_iterations": bool(torch.equal(implicit_fit.n_iter, unrolled_fit.n_iter)),
        "converged": int(implicit_fit.converged.sum()),
        "forward_s": min(times["forward"]),
        "implicit_s": min(times["implicit"]),
        "unrolled_s": min(times["unrolled"]),
        "implicit_vs_unrolled": relative_difference(torch, implicit_gradient, unrolled_gradient),
    }


def measure_backward_memory(settings: Settings, n_sets: int, dim: int, n_components: int, backward: str) -> int:
    """Measure the peak memory of one forward fit plus backward, in bytes, on a first run."""
    torch = configure_worker(settings)
    points, cotangents = backward_inputs(torch, settings, n_sets, dim, n_components)
    with PeakMemory(torch, settings.device) as peak:
        fit_and_differentiate(torch, settings, points, n_components, cotangents, backward)
    return peak.bytes


def run_dense(settings: Settings, n_sets: int, dim: int, n_components: int) -> dict:
    """Time the dense autograd Hessian solve once, with its peak memory and its agreement with the implicit gradient."""
    from s2m.mixture import implicit_gradient_dense

    torch = configure_worker(settings)
    points, cotangents = backward_inputs(torch, settings, n_sets, dim, n_components)
    fit, implicit_gradient, _, _ = fit_and_differentiate(torch, settings, points, n_components, cotangents, "implicit")

    with PeakMemory(torch, settings.device) as peak:
        start = time.perf_counter()
        dense_gradient = implicit_gradient_dense(points, fit, *cotangents, chunk_size=DENSE_CHUNK_SIZE)
        synchronize(torch, settings.device)
        dense_s = time.perf_counter() - start
    return {
        "dense_s": dense_s,
        "dense_memory": peak.bytes,
        "implicit_vs_dense": relative_difference(torch, implicit_gradient, dense_gradient),
    }


def calibrate_dense(settings: Settings) -> float:
    """Time the dense reference on one set with D = 256 and K = 2, in seconds per P * N * K * D."""
    from s2m.mixture import implicit_gradient_dense

    torch = configure_worker(settings)
    n_components = 2
    # The first run, at D = 16, pays the one-time costs of torch.func and is not used.
    for dim in (16, 256):
        points, cotangents = backward_inputs(torch, settings, 1, dim, n_components)
        fit, _, _, _ = fit_and_differentiate(torch, settings, points, n_components, cotangents, "implicit")
        start = time.perf_counter()
        implicit_gradient_dense(points, fit, *cotangents, chunk_size=DENSE_CHUNK_SIZE)
        synchronize(torch, settings.device)
        elapsed = time.perf_counter() - start

    size = n_components * (2 * dim + 1) - 1
    return elapsed / (size * N_POINTS * n_components * dim)


def measure_solve_throughput(settings: Settings) -> float:
    """Measure LU-solve throughput in FLOP/s on a float32 matrix of size 1536, to estimate dense solve times."""
    torch = configure_worker(settings)
    size = 1536
    matrix = torch.randn(size, size, device=settings.device) + size * torch.eye(size, device=settings.device)
    rhs = torch.randn(size, 1, device=settings.device)
    torch.linalg.solve(matrix, rhs)
    synchronize(torch, settings.device)
    start = time.perf_counter()
    for _ in range(3):
        torch.linalg.solve(matrix, rhs)
    synchronize(torch, settings.device)
    return 3 * (2.0 / 3.0) * size**3 / (time.perf_counter() - start)


def time_forward(settings: Settings, threads: int, n_sets: int, dim: int, n_components: int, dtype_name: str) -> dict:
    """Time the batched fit against scikit-learn set by set, from the same initialisation, and compare log-likelihoods.

    Both get ``threads``: torch through ``set_num_threads`` and scikit-learn's BLAS through
    threadpoolctl.
    """
    import numpy as np
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    from s2m.mixture import VariancePrior, fit_diagonal_gmm, mixture_log_prob
    from s2m.mixture.em import initial_parameters
    from s2m.mixture.prior import resolve_penalty
    from s2m.mixture.synthetic import clustered_sets

    torch = configure_worker(settings, threads)
    threadpool_limits(threads)
    dtype = getattr(torch, dtype_name)
    points64 = clustered_sets(n_sets, N_POINTS, dim, DATA_CLUSTERS, noise=DATA_NOISE, seed=SEED)
    points = points64.to(dtype).to(settings.device)
    prior = dict(
        variance_prior=VariancePrior(FLAT_PRIOR_VARIANCE, FLAT_PRIOR_COUNT), mean_prior_count=0.0, weight_prior_count=0.0
    )

    # scikit-learn starts from the parameters of our k-means++ initialisation, computed in float64.
    member = torch.ones(n_sets, N_POINTS, dtype=torch.float64)
    penalty = resolve_penalty(dim, **prior)
    weights0, means0, variances0 = (tensor.numpy() for tensor in initial_parameters(points64, member, n_components, SEED, penalty))
    data = points64.numpy()

    start = tuple(torch.from_numpy(array).to(dtype).to(settings.device) for array in (weights0, means0, variances0))

    def fit_ours(init):
        synchronize(torch, settings.device)
        begin = time.perf_counter()
        with torch.no_grad():
            fit = fit_diagonal_gmm(points, n_components, max_iter=MAX_ITER, tol=TOL, seed=SEED, init=init, **prior)
        synchronize(torch, settings.device)
        return fit, time.perf_counter() - begin

    def fit_sklearn():
        begin = time.perf_counter()
        models = []
        for index in range(n_sets):
            model = GaussianMixture(
                n_components,
                covariance_type="diag",
                tol=TOL,
                max_iter=MAX_ITER,
                reg_covar=SKLEARN_REG_COVAR,
                weights_init=weights0[index],
                means_init=means0[index],
                precisions_init=1.0 / variances0[index],
            )
            models.append(model.fit(data[index]))
        return models, time.perf_counter() - begin

    # Our fit repeats in groups of back-to-back runs after a warm-up, as scikit-learn's loop over
    # sets runs its fits back to back.
    fit_ours(start)
    ours_times, sklearn_times = [], []
    for _ in range(settings.repeats):
        for _ in range(FORWARD_REPEAT_FACTOR):
            fit, elapsed = fit_ours(start)
            ours_times.append(elapsed)

        # Alternating the two libraries exposes both to the same slow spells of a shared machine.
        models, elapsed = fit_sklearn()
        sklearn_times.append(elapsed)
    fit_ours("kmeans++")
    kmeans_times = [fit_ours("kmeans++")[1] for _ in range(FORWARD_REPEAT_FACTOR * settings.repeats)]

    with torch.no_grad():
        ours_loglik = mixture_log_prob(fit, points).mean(dim=-1).double().cpu().numpy()
    sklearn_loglik = np.array([model.score(data[index]) for index, model in enumerate(models)])
    relative = np.abs(ours_loglik - sklearn_loglik) / np.abs(sklearn_loglik)
    sklearn_iterations = np.array([model.n_iter_ for model in models])
    ours_iterations = fit.n_iter.cpu().numpy()
    return {
        "ours_s": min(ours_times),
        "ours_kmeans_s": min(kmeans_times),
        "sklearn_s": min(sklearn_times),
        "loglik_relative": float(relative.max()),
        "loglik_relative_median": float(np.median(relative)),
        "loglik_outliers": int((relative > FORWARD_GOAL_LOGLIK_RELATIVE).sum()),
        "ours_iterations": float(ours_iterations.mean()),
        "sklearn_iterations": float(sklearn_iterations.mean()),
        "iteration_mismatches": int((ours_iterations != sklearn_iterations).sum()),
    }


# Orchestration in the main process.


def run_isolated(function, *args):
    """Run ``function(*args)`` in a fresh spawned process and return its result."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1) as pool:
        return pool.submit(function, *args).result()


def dense_estimates(
    n_sets: int, dim: int, n_components: int, throughput: float, hessian_rate: float
) -> tuple[float, float]:
    """Estimate the dense solve's peak memory in bytes (float32) and its time in seconds.

    The time adds the LU solve, from the measured LU ``throughput`` in FLOP/s, and the
    autograd Hessian, from ``hessian_rate`` in seconds per P * N * K * D.
    """
    size = n_components * (2 * dim + 1) - 1
    graph = DENSE_CHUNK_SIZE * DENSE_GRAPH_ENTRIES * N_POINTS * n_components * dim
    memory = 4 * (2 * n_sets * size**2 + graph) + DENSE_BASE_BYTES
    hessian_s = DENSE_TIME_SAFETY * hessian_rate * size * N_POINTS * n_components * dim
    seconds = n_sets * ((2.0 / 3.0) * size**3 / throughput + hessian_s)
    return memory, seconds


def benchmark_backward(plan: Plan, settings: Settings) -> list[dict]:
    throughput = run_isolated(measure_solve_throughput, settings)
    hessian_rate = run_isolated(calibrate_dense, settings)
    logger.info("LU solve throughput %.1f GFLOP/s, dense Hessian %.2g s per P*N*K*D", throughput / 1e9, hessian_rate)
    rows = []
    for dim in plan.backward_dims:
        for n_components in plan.backward_components:
            sizes = (plan.backward_sets, dim, n_components)
            logger.info("backward D=%d K=%d", dim, n_components)
            row = {"dim": dim, "n_components": n_components, "parameters": n_components * (2 * dim + 1) - 1}
            row.update(run_isolated(time_backward, settings, *sizes))
            for backward in ("implicit", "unrolled"):
                row[f"{backward}_memory"] = run_isolated(measure_backward_memory, settings, *sizes, backward)

            memory, seconds = dense_estimates(*sizes, throughput, hessian_rate)
            if memory > settings.dense_memory_limit_gb * 1e9:
                row["dense_skipped"] = f"not run: estimated memory {memory / 1e9:.1f} GB"
            elif seconds > settings.dense_time_limit_s:
                row["dense_skipped"] = f"not run: estimated time {seconds:.0f} s"
            else:
                row.update(run_isolated(run_dense, settings, *sizes))
            rows.append(row)
    return rows


def benchmark_forward(plan: Plan, settings: Settings) -> list[dict]:
    rows = []
    for threads in settings.forward_threads:
        for n_components in plan.forward_components:
            for dtype_name in ("float32", "float64"):
                logger.info("forward K=%d %s, threads: %d", n_components, dtype_name, threads)
                row = {"n_components": n_components, "dtype": dtype_name, "threads": threads}
                sizes = (plan.forward_sets, plan.forward_dim, n_components, dtype_name)
                row.update(run_isolated(time_forward, settings, threads, *sizes))
                rows.append(row)
    return rows


# Reporting.


def describe_code() -> str:
    """Return a line naming the commit of the measured code, noting uncommitted changes to the layer or this script."""
    # s2m.reporting has a provenance helper, but it imports pandas and matplotlib, which a
    # GPU machine running this script from PYTHONPATH may lack.
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "s2m", "benchmarks"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "- code: unknown commit (git is missing or this is not a git checkout)"

    dirty = ", with uncommitted changes under s2m/ or benchmarks/" if changes else ""
    return f"- code: commit {commit}{dirty}, measured on {time.strftime('%Y-%m-%d', time.gmtime())} (UTC)"


def describe_machine(settings: Settings) -> list[str]:
    import sklearn
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    lines = [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores, {len(os.sched_getaffinity(0))} available to this process",
        f"- torch {torch.__version__} (threads per worker: {'/'.join(map(str, settings.forward_threads))} "
        f"for the forward fit, {settings.threads} for the backward), "
        f"scikit-learn {sklearn.__version__}, Python {platform.python_version()}",
        f"- device: {settings.device}",
        describe_code(),
    ]
    if settings.device.startswith("cuda"):
        lines.append(f"- GPU: {torch.cuda.get_device_name(settings.device)}")
    return lines


def format_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def format_mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.0f}"


def verdict(met: bool, plan: Plan) -> str:
    if not plan.judged:
        return "not judged (quick sizes)"
    return "pass" if met else "FAIL"


def forward_table(rows: list[dict], plan: Plan) -> list[str]:
    lines = [
        f"Forward fit of {plan.forward_sets} sets, N = {N_POINTS}, D = {plan.forward_dim}, "
        f"max_iter = {MAX_ITER}, tol = {TOL:g}. scikit-learn fits the float64 points in every row. "
        f"Goal: at least {FORWARD_GOAL_SPEEDUP:g} times faster than "
        f"scikit-learn with the mean log-likelihood within {FORWARD_GOAL_LOGLIK_RELATIVE:g} relative.",
        "",
        "| threads | K | dtype | s2m (ms) | scikit-learn (ms) | speed-up | s2m with k-means++ (ms) "
        "| EM iterations s2m / sklearn (mean) | sets with another iteration count "
        "| relative log-likelihood difference: median, max | sets above the goal | goal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        speedup = row["sklearn_s"] / row["ours_s"]
        met = speedup >= FORWARD_GOAL_SPEEDUP and row["loglik_relative"] <= FORWARD_GOAL_LOGLIK_RELATIVE
        lines.append(
            f"| {row['threads']} | {row['n_components']} | {row['dtype']} | {format_ms(row['ours_s'])} "
            f"| {format_ms(row['sklearn_s'])} "
            f"| {speedup:.1f} | {format_ms(row['ours_kmeans_s'])} "
            f"| {row['ours_iterations']:.2f} / {row['sklearn_iterations']:.2f} | {row['iteration_mismatches']} "
            f"| {row['loglik_relative_median']:.1e}, {row['loglik_relative']:.1e} | {row['loglik_outliers']} "
            f"| {verdict(met, plan)} |"
        )
    return lines


def backward_table(rows: list[dict], plan: Plan) -> list[str]:
    lines = [
        f"Backward for B = {plan.backward_sets} sets, N = {N_POINTS}, float32; P = K(2D + 1) - 1 parameters per set. "
        f"Times exclude the forward fit. Goal: implicit at least {BACKWARD_GOAL_SPEEDUP:g} times faster than "
        f"unrolled EM for D >= {BACKWARD_GOAL_MIN_DIM}.",
        "",
        "| D | K | P | EM iterations (mean) | forward (ms) | implicit (ms) | unrolled (ms) | speed-up "
        "| dense (ms) | goal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        speedup = row["unrolled_s"] / row["implicit_s"]
        dense = row.get("dense_skipped") or format_ms(row["dense_s"])
        goal = verdict(speedup >= BACKWARD_GOAL_SPEEDUP, plan) if row["dim"] >= BACKWARD_GOAL_MIN_DIM else "no goal"
        lines.append(
            f"| {row['dim']} | {row['n_components']} | {row['parameters']} | {row['n_iter']:.1f} "
            f"| {format_ms(row['forward_s'])} | {format_ms(row['implicit_s'])} | {format_ms(row['unrolled_s'])} "
            f"| {speedup:.1f} | {dense} | {goal} |"
        )

    lines += [
        "",
        "Peak memory of forward plus backward (dense: backward only), and agreement of the gradients "
        "(maximum absolute difference over the maximum absolute entry of the reference).",
        "",
        "| D | K | implicit (MB) | unrolled (MB) | dense (MB) | implicit vs unrolled | implicit vs dense |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        dense_memory = format_mb(row["dense_memory"]) if "dense_memory" in row else "not run"
        dense_error = f"{row['implicit_vs_dense']:.1e}" if "implicit_vs_dense" in row else "not run"
        lines.append(
            f"| {row['dim']} | {row['n_components']} | {format_mb(row['implicit_memory'])} "
            f"| {format_mb(row['unrolled_memory'])} | {dense_memory} | {row['implicit_vs_unrolled']:.1e} | {dense_error} |"
        )
    return lines


def measurement_command(argv: list[str]) -> str:
    """Return the command line that reproduces the measurements, without the ``--output`` file it wrote to."""
    measurement_arguments, skip_next = [], False
    for argument in argv:
        if skip_next:
            skip_next = False
        elif argument == "--output":
            skip_next = True
        elif not argument.startswith("--output="):
            measurement_arguments.append(argument)
    return "python " + " ".join(shlex.quote(argument) for argument in measurement_arguments)


def build_section(plan: Plan, settings: Settings, forward_rows, backward_rows, elapsed_s: float) -> list[str]:
    command = measurement_command(sys.argv)
    title = "CUDA" if settings.device.startswith("cuda") else "CPU"

    # A quick run only checks that everything works, so it should not replace the record.
    if plan.judged:
        reproduce = "Reproduce with (add `--output docs/benchmarks.md` to replace this section):"
    else:
        reproduce = "Reproduce with (quick sizes, no verdicts; drop `--quick` for the recorded sizes):"
    return [
        f"### {title} results",
        "",
        reproduce,
        "",
        "```",
        command,
        "```",
        "",
        *describe_machine(settings),
        f"- timed runs, of which the best is reported: {FORWARD_REPEAT_FACTOR * settings.repeats} for each s2m "
        f"forward fit and {BACKWARD_REPEAT_FACTOR * settings.repeats} for each backward, each after one warm-up "
        f"run. The implicit and unrolled backward are interleaved. scikit-learn runs {settings.repeats} times, "
        "alternating with the s2m forward fit, without a warm-up. The dense solve and each peak memory are "
        f"measured once. The whole run took {elapsed_s / 60:.1f} min",
        "",
        *forward_table(forward_rows, plan),
        "",
        *backward_table(backward_rows, plan),
    ]


def write_section(path: Path, device: str, section: list[str]) -> None:
    """Replace this device's section of the Markdown page, or add the page or the section."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    begin, end = f"<!-- bench_mixture {kind} begin -->", f"<!-- bench_mixture {kind} end -->"
    block = "\n".join([begin, *section, end])

    text = path.read_text() if path.exists() else "# Benchmarks\n\n## Set-to-model layer (`s2m.mixture`)\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="run small sizes only, for a check in about 1.5 minutes")
    parser.add_argument("--device", default="cpu", help="torch device to run on: cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--output", type=Path, help="Markdown file whose section for this device is replaced")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker for the backward measurements (default: all cores). "
        "The forward fit is measured with 1 thread and with all cores, for both libraries",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"R: the s2m forward fit is timed {FORWARD_REPEAT_FACTOR} R times, each backward "
        f"{BACKWARD_REPEAT_FACTOR} R times and scikit-learn R times (default: 5, quick: 3)",
    )
    parser.add_argument(
        "--dense-memory-limit-gb",
        type=float,
        default=8.0,
        help="skip the dense solve above this estimated memory in GB (1e9 bytes; default: 8)",
    )
    parser.add_argument(
        "--dense-time-limit-s",
        type=float,
        default=300.0,
        help="skip the dense solve above this estimated time in seconds per size (default: 300)",
    )
    arguments = parser.parse_args(argv)
    check_arguments(parser, arguments)
    return arguments


def check_arguments(parser: argparse.ArgumentParser, arguments: argparse.Namespace) -> None:
    """Reject invalid option values through ``parser.error`` before anything is measured.

    Otherwise they would fail, or mislead, only after minutes of measuring.
    """
    for option in ("repeats", "threads"):
        value = getattr(arguments, option)
        if value is not None and value < 1:
            parser.error(f"--{option} must be at least 1, got {value}.")
    for option in ("dense_memory_limit_gb", "dense_time_limit_s"):
        value = getattr(arguments, option)
        # Written with "not" so that NaN is rejected too.
        if not value >= 0:
            parser.error(f"--{option.replace('_', '-')} must be 0 or more, got {value}.")

    if not re.fullmatch(r"cpu|cuda(:\d+)?", arguments.device):
        parser.error(f"--device must be cpu, cuda or cuda:N, got {arguments.device!r}.")
    if arguments.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(
                f"--device {arguments.device}: torch {torch.__version__} finds no CUDA device. "
                "Run on a GPU machine with a CUDA build of torch, or use --device cpu."
            )
        index = int(arguments.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            parser.error(f"--device {arguments.device}: torch finds only {torch.cuda.device_count()} CUDA devices.")

    if arguments.output is not None:
        folder = arguments.output.parent
        if not folder.is_dir():
            parser.error(f"--output {arguments.output}: folder {folder} not found. Create it or choose another file.")
        target = arguments.output if arguments.output.exists() else folder
        if not os.access(target, os.W_OK):
            parser.error(f"--output {arguments.output}: {target} is not writable.")
        if arguments.quick:
            logger.warning(
                "--quick with --output replaces the %s section of %s with small, unjudged sizes.",
                "CUDA" if arguments.device.startswith("cuda") else "CPU",
                arguments.output,
            )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    arguments = parse_arguments(argv)

    plan = QUICK_PLAN if arguments.quick else FULL_PLAN
    cores = len(os.sched_getaffinity(0))
    threads = cores if arguments.threads is None else arguments.threads
    forward_threads = tuple(sorted({1, cores}))
    repeats = arguments.repeats
    if repeats is None:
        repeats = 3 if arguments.quick else 5
    settings = Settings(
        arguments.device, threads, forward_threads, repeats, arguments.dense_memory_limit_gb, arguments.dense_time_limit_s
    )

    start = time.perf_counter()
    forward_rows = benchmark_forward(plan, settings)
    backward_rows = benchmark_backward(plan, settings)
    section = build_section(plan, settings, forward_rows, backward_rows, time.perf_counter() - start)

    sys.stdout.write("\n".join(section) + "\n")
    if arguments.output is not None:
        write_section(arguments.output, arguments.device, section)
        logger.info("wrote %s", arguments.output)


if __name__ == "__main__":
    main()
