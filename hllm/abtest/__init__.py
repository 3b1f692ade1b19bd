"""A/B tests of recommendation models: the pure parts.

- ``hllm.abtest.assignment``: which user sees which model version. A pure, deterministic function of the
  experiment and the user id (SHA-256 over UTF-8), so the service, the simulator and the analysis agree
  without sharing state, and so any other language can reproduce it (see ``tests/abtest/vectors``).
- ``hllm.abtest.stats``: the statistics that decide a test on per-user data (SRM, CUPED, Welch,
  always-valid mSPRT, non-inferiority guardrails, power/MDE, and the ship/stop/keep_running/invalid rule).

Both modules depend on the standard library, numpy and scipy only, and nothing is imported here, so that
importing the package costs nothing.
"""
