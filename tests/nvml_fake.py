"""The part every fake NVML of the tests shares: nvmlInit/nvmlShutdown counted, and the fake
functions put in pynvml's place (each must stand for a real pynvml name)."""

from collections.abc import Callable

import pynvml
import pytest


class NvmlFake:
    def __init__(self) -> None:
        self.inits = 0
        self.shutdowns = 0

    def patch(self, monkeypatch: pytest.MonkeyPatch, functions: dict[str, Callable]) -> None:
        fakes = {"nvmlInit": self._init, "nvmlShutdown": self._shutdown, **functions}
        for name, fake in fakes.items():
            assert hasattr(pynvml, name), name
            monkeypatch.setattr(pynvml, name, fake)

    def _init(self) -> None:
        self.inits += 1

    def _shutdown(self) -> None:
        self.shutdowns += 1
