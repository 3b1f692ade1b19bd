"""``python -m hllm.data.dvc_child ARGS``: ``dvc ARGS`` that dies with the process that started it.

A DVC command the flow runs (``dvc commit``, ``dvc push``) is a child process. When the flow is
SIGKILLed (OOM killer, preemption) an ordinary child lives on and keeps writing the cache, the
``.dvc`` file or the remote behind the back of the next run, which by then is recovering the very
same files. Here the child asks the kernel for SIGKILL when its parent dies
(``PR_SET_PDEATHSIG``, Linux) before DVC starts, so a dead flow leaves no writer behind. (The
signal follows the *thread* that forked the child; :func:`hllm.data.versioning.dvc` waits for the
child in that same thread, so it never ends first.)

Failpoints inside DVC (:mod:`hllm.faults`, only when ``HLLM_FAILPOINTS`` names them; they kill the
parent flow process and then this child, i.e. "the flow was killed while DVC ran"):

- ``dvc-add:cache-written``: ``dvc commit`` has written the new version into the cache, not yet
  ``data.dvc``;
- ``dvc-push:files-uploaded``: ``dvc push`` has uploaded a directory's files to the remote, not
  yet its ``.dir`` manifest (DVC 3 uploads the manifest last, and only when every file made it:
  ``dvc_data.hashfile.transfer._do_transfer``; so a remote never lists a version with files missing).
"""

from __future__ import annotations

import os
import sys

from hllm import faults

POINTS = ("dvc-add:cache-written", "dvc-push:files-uploaded")


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _install_failpoints() -> None:
    parent = os.getppid()
    if faults.is_armed("dvc-add:cache-written"):
        from dvc.dvcfile import SingleStageFile

        dump = SingleStageFile.dump

        def dump_after_kill(self, *a, **kw):
            faults.kill("dvc-add:cache-written", (parent,))
            return dump(self, *a, **kw)

        SingleStageFile.dump = dump_after_kill
    if faults.is_armed("dvc-push:files-uploaded"):
        from dvc_data.hashfile import transfer

        add = transfer._add

        def add_or_kill(src, dest, hash_infos, **kw):
            if any(h.isdir for h in hash_infos):  # the files are up, the manifest is next
                faults.kill("dvc-push:files-uploaded", (parent,))
            return add(src, dest, hash_infos, **kw)

        transfer._add = add_or_kill


def main(argv: list[str]) -> int:
    die_with_parent()
    if any(faults.is_armed(p) for p in POINTS):
        _install_failpoints()
    from dvc.cli import main as dvc_main

    return int(dvc_main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
