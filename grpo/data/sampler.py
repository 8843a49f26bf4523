"""The order in which rows are drawn: endless passes, shuffled (or in file order), resumable."""

from __future__ import annotations

import torch


class PromptSampler:
    """Endless passes over the rows, each in a fresh random order (`shuffle`, TRL's
    shuffle_dataset) or in the rows' own order; its position is part of a checkpoint."""

    def __init__(self, num_rows: int, seed: int, shuffle: bool = True):
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._shuffle()

    @property
    def epochs_done(self) -> float:
        """Passes over the data so far, fractional (TRL's TrainerState.epoch)."""
        return self.epoch + self.index / max(1, self.num_rows)

    def _shuffle(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_rows))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_rows, generator=g).tolist()

    def next(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.index == self.num_rows:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self._order[self.index])
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._shuffle()
