"""The largest local batch that fits (`retinaperf sweep --find-batch`), searched as PyTorch
Lightning's batch-size finder does in its `binsearch` mode: double the batch from the start while
it fits, then bisect between the largest that fitted and the smallest that ran out of memory.

Where the start itself runs out of memory, the batch is halved until one fits (or batch 1 does
not). A point that fails for another reason, or is interrupted, ends the search where it stands:
nothing above it can be told to fit or not. So does a limit on the batches tried (Lightning's
`max_trials`), for a search that must fit a time budget: its answer is then a bracket, the
largest batch that fitted and the smallest that did not, with the batches between untried.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Outcome = Literal["fits", "out_of_memory", "stop"]


@dataclass
class SearchResult:
    largest_fit: int | None = None  # None: no batch tried fitted
    smallest_out_of_memory: int | None = None  # None: no batch tried ran out of memory
    stopped_at: int | None = None  # the batch whose failure (or interruption) ended the search
    tried: list[int] = field(default_factory=list)  # in the order they ran
    out_of_trials: bool = False  # the limit on the batches tried ended the search


def search(start: int, attempt: Callable[[int], Outcome], max_trials: int = 0) -> SearchResult:
    """Run `attempt(batch)` for the batches of the search from `start` (>= 1), at most
    `max_trials` of them (0: no limit); the result holds the largest that fitted and the smallest
    that did not: they differ by 1 unless the search stopped early."""
    result = SearchResult()

    def tried(batch: int) -> Outcome:
        if max_trials and len(result.tried) == max_trials:
            result.out_of_trials = True
            return "stop"
        result.tried.append(batch)
        outcome = attempt(batch)
        if outcome == "fits":
            result.largest_fit = batch
        elif outcome == "out_of_memory":
            result.smallest_out_of_memory = batch
        else:
            result.stopped_at = batch
        return outcome

    batch = start
    outcome = tried(batch)
    if outcome == "fits":
        while outcome == "fits":  # doubling: nothing but memory (or the data) bounds it
            batch *= 2
            outcome = tried(batch)
    while outcome == "out_of_memory" and result.largest_fit is None and batch > 1:
        batch //= 2  # halving: the start did not fit
        outcome = tried(batch)
    while outcome != "stop":  # bisecting
        low, high = result.largest_fit, result.smallest_out_of_memory
        if low is None or high is None or high - low <= 1:
            break
        outcome = tried((low + high) // 2)
    return result
