"""Coverage of the report's paired bootstrap intervals (orchestrator/report.py: paired_differences) on simulated
LAMA-CKL trials whose true difference is known.

    .venv/bin/python bench/bootstrap_coverage.py                       # 1000 datasets per setting (~10 min on 2 cores)
    .venv/bin/python bench/bootstrap_coverage.py --datasets 500 --out /tmp/c.json

The simulation has the shape of the 3-seed Table 9 runs (docs/RESULTS.md): 64 TO-LEARN and 64 NOT-TO-FORGET facts,
the SAME facts for every seed and method (as a grid trains them), 3 epochs, 1 or 3 seeds. Whether fact i is right
at epoch e in the trial of method M and seed s is a Bernoulli draw with probability

    sigmoid(mu_M(e) + sigma_fact * z_i + sigma_seed * v_{M,s})

z_i ~ N(0, 1) a fact's ease (shared by every method and seed: the pairing), v_{M,s} ~ N(0, 1) the seed's effect on
that trial (each trial its own), and the draws of one trial's fact correlated across epochs (a Gaussian copula,
correlation ``rho``: a fact right at epoch 2 tends to be right at epoch 3). mu_M(e) is set so that the population
curve (the mean over facts, at v = 0) is the curve given for M: the settings take the measured mean curves of
Finetune, TAALM and the Oracle at horizon 3 (RESULTS, "Table 9"), and a null (the method = Finetune) and a small
effect between them.

The true difference of a summary (Top Acc = the max over epochs 1..N of the mean, NF Acc at that epoch, Total =
their sum; NF Acc at a fixed epoch) is that of the population curves (infinitely many facts), averaged over the
seed effect, computed by Gauss-Hermite quadrature. An interval covers when it contains it. With one seed the report
says its intervals are over facts only: the JSON gives their coverage of that overall truth and of the truth given
the seed's effects (the population curves at the trial's own v).

Every ratio and count is from one run of this script; no timing is involved.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_TL, N_NF = 64, 64
SIGMA_FACT = {"to_learn": 1.5, "ntf": 2.0}  # logit scale: facts differ in ease (TO-LEARN) and in how firmly known
SIGMA_SEED = 0.3
RHO = 0.8  # correlation of a fact's draws across the epochs of one trial
FT = {"to_learn": (0.010, 0.005, 0.005), "ntf": (0.815, 0.911, 0.833)}  # RESULTS: mean curves, epochs 1..3
SETTINGS = {
    "null (the method = Finetune)": FT,
    "small (1-2 facts more)": {"to_learn": (0.030, 0.035, 0.030), "ntf": (0.840, 0.905, 0.850)},
    "TAALM-like": {"to_learn": (0.109, 0.151, 0.104), "ntf": (0.898, 0.901, 0.888)},
    "Oracle-like": {"to_learn": (0.182, 0.240, 0.276), "ntf": (0.901, 0.818, 0.792)},
}
STATS = ("top_acc", "nf_acc", "total_knowledge", "nf_acc_at_epoch")
FIXED_EPOCH = 2
GH_X, GH_W = np.polynomial.hermite_e.hermegauss(80)  # E[f(Z)], Z ~ N(0, 1) = sum(GH_W * f(GH_X)) / sqrt(2 pi)
GH_W = GH_W / math.sqrt(2 * math.pi)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _pop_mean(mu: float, sigma: float, shift: float = 0.0) -> float:
    """The mean over facts of sigmoid(mu + sigma z + shift), z ~ N(0, 1)."""
    return float(np.sum(GH_W * _sigmoid(mu + sigma * GH_X + shift)))


def _mu_for(target: float, sigma: float) -> float:
    """mu with a population mean (v = 0) of ``target`` (bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _pop_mean(mid, sigma) < target else (lo, mid)
    return (lo + hi) / 2


def method_mu(curves: dict) -> dict:
    return {k: [_mu_for(p, SIGMA_FACT[k]) for p in curves[k]] for k in ("to_learn", "ntf")}


def _summary(tl: list[float], nf: list[float]) -> list[float]:
    e = int(np.argmax(tl))  # the first epoch reaching the max, as the report takes it
    return [tl[e], nf[e], tl[e] + nf[e], nf[FIXED_EPOCH - 1]]


def pop_summary(mu: dict, v: float) -> list[float]:
    """The population summary of a trial with seed effect v."""
    return _summary([_pop_mean(m, SIGMA_FACT["to_learn"], SIGMA_SEED * v) for m in mu["to_learn"]],
                    [_pop_mean(m, SIGMA_FACT["ntf"], SIGMA_SEED * v) for m in mu["ntf"]])


def true_difference(mu_a: dict, mu_b: dict) -> np.ndarray:
    """E over the seed effects of the population summaries' difference (each trial its own v)."""
    a = sum(w * np.array(pop_summary(mu_a, x)) for x, w in zip(GH_X, GH_W))
    b = sum(w * np.array(pop_summary(mu_b, x)) for x, w in zip(GH_X, GH_W))
    return a - b


def _trial_facts(rng, mu: list[float], z: np.ndarray, v: float, sigma: float) -> list[list[float]]:
    """[epochs][facts] 0/1 accuracies of one trial."""
    n, epochs = len(z), len(mu)
    common = rng.standard_normal(n)
    out = []
    for e in range(epochs):
        g = RHO * common + math.sqrt(1 - RHO ** 2) * rng.standard_normal(n)  # correlated across epochs
        u = 0.5 * (1 + np.vectorize(math.erf)(g / math.sqrt(2)))
        out.append((u < _sigmoid(mu[e] + sigma * z + SIGMA_SEED * v)).astype(float).tolist())
    return out


def simulate(rng, mu_a: dict, mu_b: dict, seeds: int) -> tuple[list[dict], dict]:
    """One dataset: report rows (as collect() returns them) for methods A and B, ``seeds`` seeds, the same facts;
    and the truth given this dataset's seed effects (the population curves at each trial's own v)."""
    z = {k: rng.standard_normal(n) for k, n in (("to_learn", N_TL), ("ntf", N_NF))}
    uuids = {"to_learn": [f"t{i}" for i in range(N_TL)], "ntf": [f"n{i}" for i in range(N_NF)]}
    rows, given = [], []
    for s in range(seeds):
        per = {}
        for label, mu in (("B", mu_b), ("A", mu_a)):
            v = float(rng.standard_normal())
            per[label] = np.array(pop_summary(mu, v))
            pf = {"epochs": [0, 1, 2, 3], "to_learn_uuids": uuids["to_learn"], "ntf_uuids": uuids["ntf"]}
            for k, key in (("to_learn", "to_learn"), ("ntf", "ntf")):
                first = [0.0] * N_TL if k == "to_learn" else [1.0] * N_NF
                pf[key] = [first] + _trial_facts(rng, mu[k], z[k], v, SIGMA_FACT[k])
            rows.append({"label": label, "seed": s, "status": "FINISHED", "per_fact": pf})
        given.append(per["A"] - per["B"])
    return rows, {"truth_given_seeds": np.mean(given, axis=0)}


def coverage(setting: str, seeds: int, datasets: int, n_boot: int = 2000, seed: int = 0) -> dict:
    """Run ``datasets`` simulated datasets of one setting through paired_differences; coverage per statistic."""
    from orchestrator.report import paired_differences

    mu_a, mu_b = method_mu(SETTINGS[setting]), method_mu(FT)
    truth = true_difference(mu_a, mu_b)
    rng = np.random.default_rng([seed, seeds, list(SETTINGS).index(setting)])
    hits = {s: 0 for s in STATS}
    hits_given = {s: 0 for s in STATS}
    widths = {s: [] for s in STATS}
    estimates = {s: [] for s in STATS}
    for i in range(datasets):
        rows, cond = simulate(rng, mu_a, mu_b, seeds)
        d = paired_differences(rows, baseline="B", n_boot=n_boot, seed=i, nf_epoch=FIXED_EPOCH)[0]
        for j, s in enumerate(STATS):
            lo, hi = d[f"d_{s}_lo"], d[f"d_{s}_hi"]
            hits[s] += lo <= truth[j] <= hi
            hits_given[s] += lo <= cond["truth_given_seeds"][j] <= hi
            widths[s].append(hi - lo)
            estimates[s].append(d[f"d_{s}"])
    out = {"setting": setting, "seeds": seeds, "datasets": datasets, "n_boot": n_boot,
           "curves_method": SETTINGS[setting], "curves_baseline": FT,
           "true_difference": {s: float(truth[j]) for j, s in enumerate(STATS)}, "stats": {}}
    for s in STATS:
        c = hits[s] / datasets
        out["stats"][s] = {
            "coverage": c, "coverage_se": math.sqrt(c * (1 - c) / datasets),
            "coverage_given_seed_effects": hits_given[s] / datasets,
            "mean_estimate": float(np.mean(estimates[s])), "bias": float(np.mean(estimates[s]) - truth[STATS.index(s)]),
            "median_width": float(np.median(widths[s]))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", type=int, default=1000)
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--seeds", default="1,3")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bootstrap_coverage.json")
    args = ap.parse_args()
    results, t0 = [], time.time()
    for setting in args.settings.split(","):
        for k in (int(x) for x in args.seeds.split(",")):
            r = coverage(setting, k, args.datasets, args.n_boot)
            results.append(r)
            print(f"{setting}, {k} seed(s): " + ", ".join(
                f"{s} {v['coverage']:.3f} (given seeds {v['coverage_given_seed_effects']:.3f}, bias {v['bias']:+.4f})"
                for s, v in r["stats"].items()), flush=True)
    from trainables.checkpoint import write_json_atomic

    write_json_atomic(args.out, {
        "benchmark": "coverage of the paired bootstrap 95 % intervals on simulated paired LAMA-CKL trials "
                     "(bench/bootstrap_coverage.py docstring)",
        "facts": {"to_learn": N_TL, "ntf": N_NF}, "epochs": 3, "fixed_epoch": FIXED_EPOCH,
        "sigma_fact": SIGMA_FACT, "sigma_seed": SIGMA_SEED, "rho_epochs": RHO, "target_band": [0.92, 0.98],
        "results": results, "seconds": round(time.time() - t0, 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}})


if __name__ == "__main__":
    main()
