"""The dependency analysis' connected components against a plain breadth-first search."""

import numpy as np
from hypothesis import given, settings, strategies as st

from torchpruner.graph.dependency import connected_components


def _bfs_labels(n, a, b):
    neighbours = [[] for _ in range(n)]
    for u, v in zip(a, b):
        neighbours[u].append(v)
        neighbours[v].append(u)
    labels, current = [-1] * n, 0
    for start in range(n):
        if labels[start] >= 0:
            continue
        labels[start], queue = current, [start]
        while queue:
            node = queue.pop()
            for other in neighbours[node]:
                if labels[other] < 0:
                    labels[other] = current
                    queue.append(other)
        current += 1
    return np.array(labels)


@settings(max_examples=60)
@given(
    st.integers(1, 60).flatmap(
        lambda n: st.tuples(st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=80))
    )
)
def test_matches_breadth_first_search(case):
    n, edges = case
    a = np.array([u for u, _ in edges], dtype=np.int64)
    b = np.array([v for _, v in edges], dtype=np.int64)
    assert np.array_equal(connected_components(n, a, b), _bfs_labels(n, a, b))


def test_long_chain_in_reverse_order():
    n = 3000
    a = np.arange(n - 1)[::-1]
    assert np.array_equal(connected_components(n, a, a + 1), np.zeros(n, dtype=np.int64))
