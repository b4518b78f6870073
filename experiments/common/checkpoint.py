"""Orbax checkpoints of the whole training state, with validated resume.

Saves are synchronous (``enable_async_checkpointing=False`` plus ``wait_until_finished``), so
``save`` returns only after orbax has written into ``<step>.orbax-checkpoint-tmp-*``, renamed it
to ``<step>`` and written ``commit_success.txt``: a kill leaves either a finalised step or an
unfinalised one, never a half-written finalised one.

On open, step directories that were never finalised (temporary names, or no
``commit_success.txt``) are moved to ``<workdir>/bad_checkpoints`` with a ``RuntimeWarning``
naming the step; ``restore_latest`` tries steps newest first and sets aside any that fails to
restore or holds non-finite values (again with a warning), so a run resumes from the newest
good checkpoint.

Readers (``experiments.evaluate``, ``experiments.generate``) open the directory with
``read_only=True``: nothing under the workdir is created, moved or deleted (an evaluator next to a
running trainer must not disturb its in-flight save); unfinalised or unrestorable steps are skipped
with a warning and left where they are — only the trainer sets them aside.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "COMMIT_MARKER"]

COMMIT_MARKER = "commit_success.txt"
_STEP_DIR = re.compile(r"^(\d+)(\.orbax-checkpoint-tmp.*)?$")


def _finite(tree) -> bool:
    for x in jax.tree.leaves(tree):
        if jnp.issubdtype(x.dtype, jnp.inexact) and not np.all(np.isfinite(np.asarray(x, np.float32))):
            return False
    return True


class Checkpointer:
    """Periodic orbax checkpoints of a training state (see the module docstring).

    ``read_only=True`` opens an existing directory for restoring only: it never writes, and skips
    (with a ``RuntimeWarning``) the steps the trainer would set aside.
    """

    def __init__(self, directory: str, keep: int, *, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self.bad_dir = os.path.join(os.path.dirname(self.directory), "bad_checkpoints")
        self.read_only = read_only
        self._skipped: set[int] = set()
        if read_only:
            if not os.path.isdir(self.directory):
                raise FileNotFoundError(f"directory: no checkpoint directory {self.directory!r}")
        else:
            os.makedirs(self.directory, exist_ok=True)
        for name in sorted(os.listdir(self.directory)):
            m = _STEP_DIR.match(name)
            path = os.path.join(self.directory, name)
            if m and os.path.isdir(path) and (m.group(2) or not os.path.exists(os.path.join(path, COMMIT_MARKER))):
                self._set_aside(int(m.group(1)), name, "was never finalised (no orbax commit marker)")
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=False, create=not read_only, read_only=read_only))

    def _set_aside(self, step: int, name: str, why: str) -> None:
        if self.read_only:                      # readers never change the workdir: skip, don't move
            if not name.isdigit() or step in self._skipped:
                return                          # a temporary directory is never listed as a step anyway
            self._skipped.add(step)
            warnings.warn(f"checkpoint step {step} ({os.path.join(self.directory, name)}) {why}; skipped "
                          f"(read-only: left in place)", RuntimeWarning, stacklevel=3)
            return
        os.makedirs(self.bad_dir, exist_ok=True)
        dest = os.path.join(self.bad_dir, f"{name}.{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(os.path.join(self.directory, name), dest)
        msg = f"checkpoint step {step} ({os.path.join(self.directory, name)}) {why}; moved to {dest}"
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def steps(self) -> list[int]:
        return sorted(set(self.manager.all_steps()) - self._skipped)

    def restore_latest(self, abstract):
        """``(step, tree)`` of the newest good checkpoint, or ``(None, None)``."""
        for step in reversed(self.steps()):
            try:
                tree = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
                if not _finite(tree):
                    raise ValueError("it holds non-finite values")
                return step, tree
            except Exception as e:  # noqa: BLE001 -- any failure means: fall back to an older step
                reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                self._set_aside(step, str(step), f"could not be restored ({type(e).__name__}: {reason}); "
                                                 f"falling back to an earlier checkpoint")
                if not self.read_only:
                    self.manager.reload()
        return None, None

    def save(self, step: int, tree) -> None:
        if self.read_only:
            raise ValueError(f"step: checkpoint directory {self.directory!r} was opened read-only")
        self.manager.save(step, args=ocp.args.StandardSave(tree), force=True)
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
