"""Clock: the only reader of time in storage/ and broker/.

``SystemClock`` reads the real clocks; ``conveyor.testing.SimClock`` advances
only when told. Code that waits for a deadline calls ``clock.sleep_ms`` so a
simulated clock can fast-forward it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic_ms(self) -> int:
        """Milliseconds on a clock that never goes backwards (for deadlines)."""
        ...

    def wall_ms(self) -> int:
        """Milliseconds since the Unix epoch (for record timestamps)."""
        ...

    async def sleep_ms(self, duration_ms: int) -> None:
        """Wait ``duration_ms`` on this clock."""
        ...


class SystemClock:
    def monotonic_ms(self) -> int:
        return time.monotonic_ns() // 1_000_000

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000

    async def sleep_ms(self, duration_ms: int) -> None:
        await asyncio.sleep(max(0, duration_ms) / 1000)
