"""The overview's charts: server-side SVG geometry from the history's minutes and the samples."""
from __future__ import annotations

from kgsupervisor.ops.console import charts

NOW = 1_800_000_030.0  # 30 s into a minute


def points(chart: charts.Chart, name: str) -> list[tuple[float, float]]:
    series = next(s for s in chart.series if s.name == name)
    return [tuple(map(float, point.split(","))) for point in series.points.split()]


def test_documents_per_second_scale_to_a_round_top_and_the_minute_under_way_is_drawn_at_now():
    minute = NOW - NOW % 60
    done = [(minute - 120, 60, 0), (minute - 60, 120, 30), (minute, 45, 0)]  # 1/s, 2/s, 45 in 30 s

    chart = charts.throughput_chart(done, NOW)

    assert chart.element_id == "chart-throughput" and chart.top == 2.0  # 2/s the most, a round top
    completed = points(chart, "completed")
    bottom, height = charts.HEIGHT - charts.BOTTOM, charts.HEIGHT - charts.BOTTOM - charts.TOP
    assert [round(bottom - y, 1) for _, y in completed] == [round(v / 2 * height, 1) for v in (1, 2, 1.5)]
    assert completed[-1][0] == charts.WIDTH - charts.RIGHT  # the last point is now, at the right edge
    assert [s.latest for s in chart.series] == [1.5, 0.0]


def test_queue_depth_keeps_the_last_hour_and_ends_at_the_counts_of_now():
    samples = [(NOW - 4000, {"pending": 999}), (NOW - 600, {"pending": 80, "processing": 2})]

    chart = charts.depth_chart(samples, NOW, {"pending": 70, "processing": 3})

    assert chart.top == 100.0 and not chart.empty
    assert len(points(chart, "pending")) == 2  # the sample older than an hour is left out
    assert [s.latest for s in chart.series] == [70, 3]
