"""A/A false-positive rate and planted-lift detection rate of the A/B analysis, on the pure simulator.

Each simulated test: users assigned by the real assignment function (a fresh experiment id per seed),
entering on a uniform day of a 7-day test and requesting once a day (at most 7 requests), a latent-quality
user model with a position-biased click model (:mod:`hllm.abtest.simulate`), analysed as
``hllm ab analyze`` does: daily cumulative looks, CUPED on pre-experiment activity, always-valid mSPRT
(tau = mde x pooled hit rate), SRM on assignment. The false-positive rate is the share of A/A tests whose
always-valid p-value fell below alpha at any daily look; the detection rate the share of planted-lift tests
where the challenger was significantly better.

    .venv/bin/python benchmarks/ab_power.py [--seeds 200] [--users 10000] [--lift 0.1] [--alpha 0.05]
"""

from __future__ import annotations

import argparse
import json
import time

from hllm.abtest.simulate import power_study


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--requests-per-user", type=int, default=7)
    ap.add_argument("--lift", type=float, default=0.1, help="planted relative lift of the challenger")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--mde", type=float, default=0.1)
    args = ap.parse_args()
    kw = {"n_users": args.users, "days": args.days, "requests_per_user": args.requests_per_user}
    t0 = time.perf_counter()
    aa = power_study(range(args.seeds), alpha=args.alpha, mde=args.mde, **kw)
    ab = power_study(range(10_000, 10_000 + args.seeds), planted_lift=args.lift, alpha=args.alpha, mde=args.mde, **kw)
    print(json.dumps({"simulation": {**kw, "k": 10, "alpha": args.alpha, "mde": args.mde}}, indent=None))
    print(
        f"A/A: false-positive rate {aa.rejection_rate:.3f} +- {aa.standard_error(aa.rejection_rate):.3f} "
        f"over {len(aa.seeds)} tests with {args.days} daily looks (seeds {aa.seeds[0]}..{aa.seeds[-1]}); "
        f"SRM flagged in {int(aa.srm.sum())}; decisions {aa.summary()['decisions']}; "
        f"relative effect {aa.summary()['relative_lift_mean']:+.4f} sd {aa.summary()['relative_lift_sd']:.4f}"
    )
    print(
        f"A/B +{args.lift:.0%}: detected in {ab.detection_rate:.3f} +- {ab.standard_error(ab.detection_rate):.3f} "
        f"of {len(ab.seeds)} tests (seeds {ab.seeds[0]}..{ab.seeds[-1]}); decisions {ab.summary()['decisions']}; "
        f"estimated lift {ab.summary()['relative_lift_mean']:+.4f} sd {ab.summary()['relative_lift_sd']:.4f}"
    )
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
