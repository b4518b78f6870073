"""The training progress bar (tqdm, on stderr): step count, ETA, loss and tokens/s."""

from __future__ import annotations

from tqdm.auto import tqdm

__all__ = ["Progress"]


class Progress:
    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                        desc="train")

    def update(self, n: int = 1, **postfix) -> None:
        if postfix:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                 refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
