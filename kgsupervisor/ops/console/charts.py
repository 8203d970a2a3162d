"""The overview's two charts over the last hour, drawn on the server as SVG (no script, no CDN):
documents per second from the attempt history, and the queue's depth from the samples.
Here only geometry; templates/_chart.html writes the SVG, escaped like any other value."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from kgsupervisor.ops.console.formats import when

WIDTH, HEIGHT = 600, 160
LEFT, RIGHT, TOP, BOTTOM = 48, 8, 10, 22  # margins around the plot: axis labels live there
HOUR = 3600.0

Point = tuple[float, float]  # (unix seconds, value)


@dataclasses.dataclass(frozen=True)
class Series:
    name: str  # also its CSS class: series-<name>
    points: str  # an SVG polyline's points, "x,y x,y ..."
    latest: float | None


@dataclasses.dataclass(frozen=True)
class Chart:
    element_id: str
    title: str
    unit: str
    series: list[Series]
    top: float  # the value at the top of the plot
    x_labels: list[tuple[float, str, str]]  # (x, text-anchor, text) under the plot
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    plot_top: int = TOP
    plot_bottom: int = HEIGHT - BOTTOM
    plot_right: int = WIDTH - RIGHT

    @property
    def empty(self) -> bool:
        return not any(s.points for s in self.series)


def nice_top(highest: float) -> float:
    """A round number at or above `highest` (1, 2, 5 times a power of ten), at least 1."""
    if highest <= 1:
        return 1.0
    power = 10 ** math.floor(math.log10(highest))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= highest)


def _x(t: float, start: float) -> float:
    return LEFT + (t - start) / HOUR * (WIDTH - LEFT - RIGHT)


def _y(value: float, top: float) -> float:
    return HEIGHT - BOTTOM - value / top * (HEIGHT - BOTTOM - TOP)


def line_chart(element_id: str, title: str, unit: str, series: dict[str, Sequence[Point]],
               now: float) -> Chart:
    """A chart of each named series over the hour before `now`; points outside it are dropped."""
    start = now - HOUR
    kept = {name: [(t, v) for t, v in points if start <= t <= now] for name, points in series.items()}
    top = nice_top(max((v for points in kept.values() for _, v in points), default=0.0))
    drawn = [Series(name, " ".join(f"{_x(t, start):.1f},{_y(v, top):.1f}" for t, v in points),
                    points[-1][1] if points else None) for name, points in kept.items()]
    labels = [(_x(t, start), anchor, when(t)[11:16] + " UTC" * (anchor == "end"))
              for t, anchor in ((start, "start"), (start + HOUR / 2, "middle"), (now, "end"))]
    return Chart(element_id, title, unit, drawn, top, labels)


def throughput_chart(minutes: Sequence[tuple[float, int, int]], now: float) -> Chart:
    """Documents per second, completed and failed, each minute of the hour (the history's); the
    minute under way is drawn at `now`, its rate over the seconds it has had."""
    def at(start: float) -> tuple[float, float]:
        end = min(start + 60, now)
        return end, max(1.0, end - start)
    completed = [(at(start)[0], done / at(start)[1]) for start, done, _ in minutes]
    failed = [(at(start)[0], bad / at(start)[1]) for start, _, bad in minutes]
    return line_chart("chart-throughput", "Documents per second", "docs/s",
                      {"completed": completed, "failed": failed}, now)


def depth_chart(samples: Sequence[tuple[float, dict[str, int]]], now: float,
                latest: dict[str, int]) -> Chart:
    """Rows pending and processing, sampled every 10 s by this console, and `latest` at `now`."""
    taken = [*samples, (now, latest)]
    return line_chart("chart-depth", "Queue depth", "rows",
                      {status: [(t, counts.get(status, 0)) for t, counts in taken]
                       for status in ("pending", "processing")}, now)
