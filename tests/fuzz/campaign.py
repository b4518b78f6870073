"""A time-budgeted fuzz campaign: ``python -m tests.fuzz.campaign --minutes 10`` (``make fuzz``).

Rounds cycle through the families (exact attention on every backend incl. both Pallas kernels in
interpret mode, decode over plain / ring / paged caches, the linear family); each round is one
hypothesis run of ``--batch`` random examples from a fresh seed.  A failing example is shrunk by
hypothesis (within the time left) and the smallest failing case is written to ``--out``
(default ``results/fuzz/``) as ``<family>-<hash>.json`` (the case) and ``.py`` (a reproducer:
``PYTHONPATH=. python results/fuzz/<family>-<hash>.py``).  ``campaign.json`` there summarises the
run: cases per family, seconds, failures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
import traceback

from hypothesis import HealthCheck, given, seed, settings

from tests.fuzz import harness, strategies

FAMILIES = {
    "exact": lambda: strategies.exact_cases(backends=("reference", "xla", "dense", "pallas-gpu", "pallas-tpu")),
    "decode": strategies.decode_cases,
    "linear": strategies.linear_cases,
}


def _size(case) -> int:
    return len(json.dumps(case))


def run_round(family: str, n: int, round_seed: int, deadline: float, log):
    """One hypothesis run; returns (cases run, smallest failing case or None, its error)."""
    state = {"count": 0, "fail": None, "err": None}

    @seed(round_seed)
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(FAMILIES[family]())
    def body(case):
        if time.time() > deadline:      # out of time (also while shrinking): stop failing, keep the best
            return
        state["count"] += 1
        try:
            harness.check(case)
        except Exception as e:  # noqa: BLE001 -- any failure of a case is a finding
            if state["fail"] is None or _size(case) < _size(state["fail"]):
                state["fail"], state["err"] = case, f"{type(e).__name__}: {e}"
                log(f"  failing case ({_size(case)} chars): {state['err'][:300]}")
            raise

    try:
        body()
    except Exception:  # noqa: BLE001 -- hypothesis re-raises the minimal failure (or Flaky after a timeout)
        if state["fail"] is None:
            raise
    return state["count"], state["fail"], state["err"]


def write_failure(out: str, family: str, case, err: str) -> str:
    os.makedirs(out, exist_ok=True)
    name = f"{family}-{hashlib.sha1(json.dumps(case, sort_keys=True).encode()).hexdigest()[:10]}"
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump({"error": err, "case": case}, f, indent=1)
    with open(os.path.join(out, name + ".py"), "w") as f:
        f.write(f"# {err.splitlines()[0][:300] if err else ''}\n" + harness.reproducer(case))
    return name


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="time budget (default 10)")
    ap.add_argument("--families", default="exact,decode,linear", help="comma-separated subset of " + ",".join(FAMILIES))
    ap.add_argument("--batch", type=int, default=8, help="examples per hypothesis round")
    ap.add_argument("--seed", type=int, default=None, help="campaign seed (default: from the clock)")
    ap.add_argument("--out", default="results/fuzz", help="where failures and campaign.json go")
    args = ap.parse_args(argv)
    fams = [f for f in args.families.split(",") if f]
    unknown = [f for f in fams if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"--families: unknown {unknown}; expected a subset of {sorted(FAMILIES)}")
    rng = random.Random(args.seed if args.seed is not None else time.time_ns())
    start = time.time()
    deadline = start + 60 * args.minutes
    summary = {"minutes": args.minutes, "families": fams, "cases": {f: 0 for f in fams}, "failures": []}

    def log(msg):
        print(f"[{time.time() - start:7.1f}s] {msg}", flush=True)

    r = 0
    while time.time() < deadline:
        fam = fams[r % len(fams)]
        s = rng.randrange(2 ** 31)
        log(f"round {r}: {fam}, seed {s}")
        try:
            count, fail, err = run_round(fam, args.batch, s, deadline, log)
        except Exception:  # noqa: BLE001 -- a crash of the round itself is reported, the campaign goes on
            count, fail, err = 0, {"family": fam, "round_seed": s}, traceback.format_exc()
        summary["cases"][fam] += count
        if fail is not None:
            name = write_failure(args.out, fam, fail, err)
            summary["failures"].append({"name": name, "family": fam, "error": err[:500]})
            log(f"  -> wrote {args.out}/{name}.json / .py")
        r += 1
    summary["seconds"] = round(time.time() - start, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "campaign.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"done: {summary['cases']} cases, {len(summary['failures'])} failures -> {args.out}/campaign.json")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
