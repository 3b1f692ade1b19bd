"""Crash recovery at the start of a nightly run: put back what a killed run left half-done.

One call, :func:`recover`, made by the nightly flow once it holds the concurrency slot (so no live
run is writing) and after the dead runs' MLflow runs were closed FAILED (:func:`flows.slot.fail_orphans`):

- the data: ``data/raw``, ``data.dvc`` and the DVC remote back into agreement
  (:func:`hllm.data.journal.recover`: an interrupted swap undone, ``data/raw`` rolled back to what
  ``data.dvc`` names, that version pushed);
- the exports: half-written ``.tmp-`` folders removed (:func:`hllm.serving.export.clean_partial`);
- the registry: aliases made consistent with the audit log, versions whose promotion never ran
  tagged ``hllm.incomplete`` (:func:`hllm.ops.registry.recover`).

Each part is idempotent and costs little when there is nothing to do (a marker lookup, a glob, the
audit log read), so every run calls it.
"""

from __future__ import annotations

import logging

from hllm.config import Config

log = logging.getLogger(__name__)


def recover(cfg: Config) -> list[str]:
    """Recover data, exports and registry after a crash; returns what was done (empty: nothing)."""
    from hllm.data import journal, versioning
    from hllm.ops import registry
    from hllm.serving.export import clean_partial

    done = journal.recover(cfg, remote=versioning.choose_remote(cfg.flow.dvc_remote))
    done += clean_partial(cfg.paths.export_dir)
    done += registry.recover(cfg)
    if not done:
        log.info("crash recovery: nothing to recover")
    return done
