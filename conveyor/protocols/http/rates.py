"""Message rates for the management API: a small sampler, not per-message work.

Owns: ``RateSampler`` — once a second (``interval_ms``) it reads counters the
broker keeps anyway (each partition's high watermark = records ever appended;
each shared group's delivered count) and keeps a short history per topic or
queue plus a longer one of the totals, from which it answers rates (per second,
over the last ``RATE_WINDOW_SAMPLES`` samples) and the overview chart's series.
Must not know: HTTP, JSON shapes (management.py builds those).

Bounds: ``OBJECTS_MAX`` topics/queues are sampled (the rest report rate 0, said in
docs/management.md); per object ``OBJECT_SAMPLES`` samples; the totals keep
``TOTAL_SAMPLES`` (10 minutes at 1 s).
"""

from __future__ import annotations

import collections
import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from conveyor.tasks import Supervisor

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker

logger = logging.getLogger("conveyor.http.rates")

INTERVAL_MS: Final = 1_000
RATE_WINDOW_SAMPLES: Final = 5  # a rate is the slope over the last 5 s (RabbitMQ: 5 s)
OBJECT_SAMPLES: Final = RATE_WINDOW_SAMPLES + 1
TOTAL_SAMPLES: Final = 600  # 10 minutes of the overview chart
OBJECTS_MAX: Final = 5_000


@dataclass(frozen=True, slots=True)
class Sample:
    time_ms: int
    published: int  # records appended, all time (sum of high watermarks)
    delivered: int  # records handed to shared-group consumers since the broker opened


class RateSampler:
    def __init__(self, broker: Broker, interval_ms: int = INTERVAL_MS) -> None:
        self.broker = broker
        self.interval_ms = interval_ms
        # topic or queue name -> its recent samples
        self._objects: dict[str, collections.deque[Sample]] = {}
        self._totals: collections.deque[Sample] = collections.deque(maxlen=TOTAL_SAMPLES)
        self._tasks = Supervisor("rate-sampler")

    def start(self) -> None:
        if not self._tasks:
            self.sample()
            self._tasks.start(self._run())

    async def close(self) -> None:
        await self._tasks.close(cancel=True)

    async def _run(self) -> None:
        while True:
            await self.broker.clock.sleep_ms(self.interval_ms)
            self.sample()

    def sample(self) -> None:
        """Read the counters once (cheap: one integer per partition and per group)."""
        now_ms = self.broker.clock.monotonic_ms()
        delivered: dict[str, int] = collections.defaultdict(int)
        shared = self.broker.shared_groups
        if shared is not None:
            for (_, topic), count in shared.delivered_totals().items():
                delivered[topic] += count
        published_total = delivered_total = 0
        seen = set()
        for info in self.broker.list_topics()[:OBJECTS_MAX]:
            published = 0
            for partition in range(info.partitions):
                published += self.broker.offsets(info.name, partition).high_watermark
            sample = Sample(now_ms, published, delivered.get(info.name, 0))
            published_total += sample.published
            delivered_total += sample.delivered
            history = self._objects.get(info.name)
            if history is None or (history and (history[-1].published > published
                                                or history[-1].delivered > sample.delivered)):
                history = collections.deque(maxlen=OBJECT_SAMPLES)  # new or recreated
                self._objects[info.name] = history
            history.append(sample)
            seen.add(info.name)
        for name in [name for name in self._objects if name not in seen]:
            del self._objects[name]
        self._totals.append(Sample(now_ms, published_total, delivered_total))

    def rates(self, name: str) -> tuple[float, float]:
        """(publish, deliver) per second of one topic or queue."""
        return _slope(self._objects.get(name))

    def totals(self, name: str) -> Sample | None:
        history = self._objects.get(name)
        return history[-1] if history else None

    def totals_all(self) -> tuple[int, int]:
        """(published, delivered) over every sampled topic and queue, at the last sample."""
        last = self._totals[-1] if self._totals else None
        return (last.published, last.delivered) if last else (0, 0)

    def total_rates(self) -> tuple[float, float]:
        return _slope(self._totals)

    def history(self, samples_max: int = TOTAL_SAMPLES) -> list[dict[str, float]]:
        """Per-second rates of the totals over time, oldest first (the overview chart)."""
        points = list(self._totals)[-(samples_max + 1):]
        # wall time of a sample = now (wall) - its age (monotonic): jumps do not bend it
        wall_offset_ms = self.broker.clock.wall_ms() - self.broker.clock.monotonic_ms()
        series = []
        for before, after in itertools.pairwise(points):
            elapsed_s = max(1, after.time_ms - before.time_ms) / 1000
            series.append({
                "time_ms": after.time_ms + wall_offset_ms,
                "publish": max(0, after.published - before.published) / elapsed_s,
                "deliver": max(0, after.delivered - before.delivered) / elapsed_s,
            })
        return series


def _slope(history: collections.deque[Sample] | None) -> tuple[float, float]:
    if not history or len(history) < 2:
        return 0.0, 0.0
    first = history[max(0, len(history) - 1 - RATE_WINDOW_SAMPLES)]
    last = history[-1]
    elapsed_s = max(1, last.time_ms - first.time_ms) / 1000
    return (round(max(0, last.published - first.published) / elapsed_s, 2),
            round(max(0, last.delivered - first.delivered) / elapsed_s, 2))
