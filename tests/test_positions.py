"""IntervalSet against a plain Python set (hypothesis), and the position encoding."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vbatch.io.positions import IntervalSet, position_array, position_of


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 200), max_size=30), max_size=6),
       st.lists(st.integers(-5, 210), max_size=50))
def test_interval_set_is_the_set_of_its_positions(chunks, probes):
    reference: set[int] = set()
    intervals = IntervalSet()
    for chunk in chunks:
        reference.update(chunk)
        intervals.add_positions(chunk)
    assert len(intervals) == len(reference)
    assert intervals.contains(probes).tolist() == [p in reference for p in probes]
    spans = intervals.to_list()
    assert all(s < e for s, e in spans)
    assert all(e0 < s1 for (_, e0), (s1, _) in zip(spans, spans[1:]))   # disjoint, not adjacent
    assert IntervalSet(spans) == intervals
    merged = IntervalSet()
    for chunk in chunks:
        merged.update(IntervalSet.from_positions(chunk))
    assert merged == intervals


def test_consecutive_batches_collapse_to_one_interval():
    intervals = IntervalSet()
    for start in (256, 0, 512, 128, 384):            # out of order, as replicas finish
        intervals.add_positions(np.arange(start, start + 128))
    assert intervals.to_list() == [[0, 640]]
    assert intervals.contains([639, 640]).tolist() == [True, False]


def test_positions_encode_file_and_row():
    assert position_of(0, 5) == 5
    assert position_of(2, 7) == (2 << 40) + 7
    assert position_array(1, 3, 2).to_pylist() == [(1 << 40) + 3, (1 << 40) + 4]
