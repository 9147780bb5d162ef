from collections import deque

import numpy as np
import pytest

from constmig.apps.graph import Graph
from constmig.enclave.heap import Heap
from constmig.errors import ConfigError, EnclaveError

MiB = 1 << 20


def make(size: int = 4 * MiB, chunk: int = 1 << 20, **config) -> Graph:
    app = Graph(Heap(size, chunk_size=chunk))
    app.setup(**config)
    return app


def adjacency(app: Graph) -> list[list[int]]:
    ptr = app.indptr[: app.n_vertices + 1].tolist()
    idx = app.indices[: app.n_edges].tolist()
    return [idx[ptr[v] : ptr[v + 1]] for v in range(app.n_vertices)]


def python_bfs(adj: list[list[int]], s: int) -> list[int]:
    dist = [-1] * len(adj)
    dist[s] = 0
    q = deque([s])
    while q:
        u = q.popleft()
        for v in adj[u]:
            if dist[v] < 0:
                dist[v] = dist[u] + 1
                q.append(v)
    return dist


def test_sizing_fills_the_heap():
    app = make(16 * MiB)
    assert app.heap.free_bytes < 4096 * 4
    assert app.capacity * (20 + 4 * 16) > 0.99 * 16 * MiB
    assert make(vertices=100, avg_degree=2).capacity == 100


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown graph option 'edges'"):
        make(edges=3)
    with pytest.raises(ConfigError, match="at most"):
        make(vertices=10**7)
    with pytest.raises(ConfigError):
        make(avg_degree=0)
    with pytest.raises(ConfigError):
        make(vertices=0)


def test_fill_writes_a_csr_graph():
    app = make(vertices=5000, avg_degree=8)
    r = app.fill(1.0, seed=3)
    assert r["vertices"] == 5000 and r["edges"] == 40000 == app.indptr[5000]
    deg = np.diff(app.indptr[:5001])
    assert deg.min() >= 1 and deg.max() <= 15 and app.indptr[0] == 0
    idx = app.indices[:40000]
    assert idx.min() >= 0 and idx.max() < 5000
    assert (idx < 1250).mean() > 0.4  # squared uniform targets: half land in the first quarter
    assert np.allclose(app.rank[:5000], 1 / 5000)
    assert app.neighbors(17) == idx[app.indptr[17] : app.indptr[18]].tolist()


def test_bfs_matches_a_python_bfs():
    app = make(vertices=300, avg_degree=2)
    app.fill(1.0, seed=5)
    adj = adjacency(app)
    for s in (0, 7, 299):
        ref = python_bfs(adj, s)
        r = app.bfs(s)
        assert app.dist[:300].tolist() == ref
        assert r["reached"] == sum(d >= 0 for d in ref) and r["depth"] == max(ref)
        assert app.distance(s) == 0


def test_pagerank_matches_a_dense_reference():
    app = make(vertices=40, avg_degree=3)
    app.fill(1.0, seed=2)
    n, d = 40, 0.85
    m = np.zeros((n, n))
    for u, nbrs in enumerate(adjacency(app)):
        for v in nbrs:
            m[v, u] += 1 / len(nbrs)
    r = np.full(n, 1 / n)
    for _ in range(30):
        r = (1 - d) / n + d * m @ r
    out = app.pagerank(30, d)
    assert np.allclose(app.rank[:n], r, rtol=1e-10, atol=0)
    assert abs(out["sum"] - 1) < 1e-12 and out["argmax"] == int(r.argmax())
    assert out["delta"] < 1e-3 and app.stats()["pagerank_iterations"] == 30


def test_step_is_a_bounded_bfs():
    app = make(vertices=20000, avg_degree=8)
    app.fill(1.0, seed=1)
    adj = adjacency(app)
    for seed in range(5):
        r = app.step(n=1000, seed=seed)
        assert 1000 <= r["ops"] < 1000 + 16
        dist = python_bfs(adj, r["source"])
        assert r["depth"] >= 1 and 1 < r["reached"] <= sum(0 <= x <= r["depth"] for x in dist)
    small = make(vertices=30, avg_degree=1)
    small.fill(1.0, seed=1)
    r = small.step(n=10**6, seed=3)  # the whole reachable graph, then stops
    assert r["reached"] == sum(x >= 0 for x in python_bfs(adjacency(small), r["source"]))


def test_step_is_deterministic_and_checksum_tracks_state():
    a, b = make(), make()
    a.fill(0.9, seed=2)
    b.fill(0.9, seed=2)
    assert a.checksum() == b.checksum()
    c = make()
    c.fill(0.9, seed=3)
    assert c.checksum() != a.checksum()
    before = a.checksum()
    a.neighbors(3)
    a.stats()
    assert a.checksum() == before
    assert [a.step(seed=s) for s in range(4)] == [b.step(seed=s) for s in range(4)]
    assert a.checksum() == b.checksum() != before
    a.pagerank(1)
    assert a.checksum() != b.checksum()


def test_bad_arguments():
    app = make(vertices=50, avg_degree=2)
    for call in (app.step, app.bfs, lambda: app.pagerank(1)):
        with pytest.raises(EnclaveError, match="fill first"):
            call()
    app.fill(1.0)
    for bad in (-1, 50, "1", None, 1.0):
        with pytest.raises(EnclaveError):
            app.bfs(bad)
        with pytest.raises(EnclaveError):
            app.neighbors(bad)
    with pytest.raises(EnclaveError):
        app.pagerank(0)
    with pytest.raises(EnclaveError):
        app.pagerank(1, 1.0)
    with pytest.raises(EnclaveError):
        app.step(n=0)
    with pytest.raises(EnclaveError):
        app.fill(2)


def test_runs_unchanged_on_a_tracked_heap(tracked):
    app = make(8 * MiB, chunk=64 << 10)
    app.fill(0.9, seed=4)
    copy = tracked(app)
    assert copy.app.neighbors(12345) == app.neighbors(12345)
    assert copy.tracker.demanded <= 4, "one vertex's neighbours: its indptr entries and its edges"
    for s in range(3):
        assert copy.app.step(seed=s) == app.step(seed=s)
    assert copy.app.bfs(5) == app.bfs(5)
    assert copy.app.pagerank(2) == app.pagerank(2)
    assert copy.app.checksum() == app.checksum()
    app.heap.close()
