"""Running Pallas kernels on a CPU-only machine: interpret-mode parameters and lowering checks.

* :func:`interpret_params` -- what to pass as ``interpret=`` so a kernel written for a platform
  runs on CPU: for TPU kernels ``pltpu.InterpretParams`` with race detection, NaN-filled
  uninitialised memory and raising out-of-bounds reads (it simulates VMEM/SMEM and DMAs); for
  GPU (Triton) kernels the generic ``interpret=True``.
* :func:`lower_for` -- ``jax.export`` of a function for ``cuda`` or ``tpu`` without the device.
  This runs tracing, block-spec checks and the Pallas -> Triton / Mosaic lowering, not the
  Triton or Mosaic compilers.  The Triton custom call is not covered by export's stability
  guarantee, so its safety check is disabled.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax import export

__all__ = ["interpret_params", "lower_for", "custom_call_targets", "tpu_race_check", "KERNEL_CALL_TARGET"]

#: custom-call target a kernel of each lowering platform produces
KERNEL_CALL_TARGET = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


def interpret_params(platform: str):
    """The ``interpret=`` value that runs a kernel for ``platform`` ("tpu" or "gpu") on CPU."""
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan", out_of_bounds_reads="raise")
    if platform in ("gpu", "cuda"):
        return True
    raise ValueError(f"platform: expected 'tpu' or 'gpu', got {platform!r}")


def lower_for(fn: Callable, platform: str, *args) -> export.Exported:
    """``jax.export`` ``fn`` for ``platform`` ("cuda" or "tpu"); ``args`` are arrays or ShapeDtypeStructs."""
    if platform not in KERNEL_CALL_TARGET:
        raise ValueError(f"platform: expected 'cuda' or 'tpu', got {platform!r}")
    disabled = [export.DisabledSafetyCheck.custom_call(KERNEL_CALL_TARGET["cuda"])] if platform == "cuda" else []
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) if hasattr(a, "shape") else a for a in args]
    return export.export(jax.jit(fn), platforms=[platform], disabled_checks=disabled)(*structs)


def custom_call_targets(exported: export.Exported) -> list[str]:
    """Custom-call targets named in the exported StableHLO text, in order of appearance."""
    import re
    text = exported.mlir_module()
    return [a or b for a, b in re.findall(r'custom_call @([\w$.]+)|call_target_name = "([^"]+)"', text)]


class RaceRecorder:
    """Collects the race-detection states of TPU interpret mode (see :func:`tpu_race_check`)."""

    def __init__(self):
        self.states = []

    @property
    def races_found(self) -> bool:
        return any(s.races_found for s in self.states)


def tpu_race_check():
    """Context manager: record every TPU-interpret race detector created inside it.

    ``InterpretParams(detect_races=True)`` only prints and sets ``races_found`` on a detector
    that is replaced at the next kernel, so this wraps the (private) detector class to keep
    them all.  Use ``with tpu_race_check() as rec: ...; assert not rec.races_found``.
    Results must be materialised inside the block (the kernels run asynchronously).
    """
    import contextlib

    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

    @contextlib.contextmanager
    def ctx():
        rec = RaceRecorder()
        orig = ipc.RaceDetectionState

        class Recording(orig):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                rec.states.append(self)

        ipc.RaceDetectionState = Recording
        try:
            yield rec
        finally:
            ipc.RaceDetectionState = orig

    return ctx()
