"""A graph analytics app: a directed graph in CSR form in the heap, with BFS and PageRank.

It stands for graph workloads, whose reads chase edges to vertices scattered over the whole heap with
little locality. CSR: vertex v's out-neighbours are indices[indptr[v]:indptr[v+1]]. `fill` generates a
random graph straight into CSR (no edge list to sort): each vertex gets 1 to 2*avg_degree-1 edges, the
total being exactly vertices*avg_degree, to targets skewed towards low ids (squared uniform draws), so
some vertices are hubs.
A step is a BFS from a random source that stops after about `n` edges: bounded work at any size.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np

from constmig.apps.common import PAGE, check_options, int_arg, largest_fitting
from constmig.enclave.app import EnclaveApp, ecall
from constmig.errors import ConfigError, EnclaveError

_OPTIONS = ("vertices", "avg_degree")
_BATCH_EDGES = 1 << 22  # bounds the temporaries of whole-graph operations
_S32 = np.uint64(32)



class Graph(EnclaveApp):
    """CSR arrays `indptr` (V+1) and `indices` (V*avg_degree), PageRank `rank` and BFS `dist` (V)."""

    name = "graph"

    def setup(self, **config: Any) -> None:
        """Size the graph to fill the free heap (or to `vertices`) at `avg_degree` edges per vertex."""
        check_options("graph", config, _OPTIONS)
        deg = int_arg(config.get("avg_degree", 16), "graph avg_degree", 1, 1025, ConfigError)
        free = self.heap.free_bytes
        fit = largest_fitting(lambda k: self._bytes(k, deg), free, min(free // (20 + 4 * deg), (1 << 31) - 2))
        n = config.get("vertices")
        if n is None:
            n = fit
        else:
            n = int_arg(n, "graph vertices", 1, 1 << 31, ConfigError)
            if n > fit:
                raise ConfigError(
                    f"graph of {n} vertices with avg_degree {deg} needs more heap; at most {fit} fit"
                )
        if n < 1:
            raise ConfigError(f"heap of {self.heap.size} bytes is too small for a graph")
        self.capacity = n
        self.avg_degree = deg
        self.n_vertices = 0
        self.n_edges = 0
        self.pr_iterations = 0
        self.steps = 0
        self.indptr = self.heap.alloc("g.indptr", n + 1, np.int64)
        self.indices = self.heap.alloc("g.indices", n * deg, np.int32)
        self.rank = self.heap.alloc("g.rank", n, np.float64)
        self.dist = self.heap.alloc("g.dist", n, np.int32)

    @staticmethod
    def _bytes(n: int, deg: int) -> int:
        return sum(-(-x // PAGE) * PAGE for x in (8 * (n + 1), 4 * n * deg, 8 * n, 4 * n))

    # -- ECALLs ------------------------------------------------------------------------------------

    @ecall
    def neighbors(self, v: int) -> list[int]:
        """Out-neighbours of vertex `v`."""
        v = int_arg(v, "graph vertex", 0, max(self.n_vertices, 1))
        self._need_graph()
        return self.indices[int(self.indptr[v]) : int(self.indptr[v + 1])].tolist()

    @ecall
    def bfs(self, source: int = 0) -> dict[str, int]:
        """Full BFS from `source`; hop counts land in `dist` (-1: unreached). Reads the reachable graph."""
        self._need_graph()
        s = int_arg(source, "bfs source", 0, self.n_vertices)
        nv = self.n_vertices
        self.dist[:nv] = -1
        self.dist[s] = 0
        frontier = np.array([s], dtype=np.int64)
        level, reached, edges = 0, 1, 0
        per = max(1, _BATCH_EDGES // (2 * self.avg_degree))
        while True:
            found = []
            for a in range(0, len(frontier), per):
                nb, deg = self._neighbors(frontier[a : a + per])
                edges += int(deg.sum())
                nb = np.unique(nb)
                new = nb[self.dist[nb] < 0]
                self.dist[new] = level + 1
                found.append(new)
            frontier = np.concatenate(found)
            if not frontier.size:
                break
            level += 1
            reached += len(frontier)
        return {"reached": reached, "depth": level, "edges": edges}

    @ecall
    def distance(self, v: int) -> int:
        """Hop count of `v` found by the last BFS (-1: not reached)."""
        v = int_arg(v, "graph vertex", 0, max(self.n_vertices, 1))
        self._need_graph()
        return int(self.dist[v])

    @ecall
    def pagerank(self, iterations: int = 10, damping: float = 0.85) -> dict[str, Any]:
        """Power iterations of PageRank over the whole graph (dangling mass spread evenly); ranks in `rank`."""
        self._need_graph()
        its = int_arg(iterations, "pagerank iterations", 1, 1001)
        if isinstance(damping, bool) or not isinstance(damping, int | float) or not 0 <= damping < 1:
            raise EnclaveError(f"pagerank damping must be a number in [0, 1), not {damping!r}")
        nv = self.n_vertices
        ptr = self.indptr[: nv + 1].copy()
        deg = np.diff(ptr)
        r = self.rank[:nv].copy()
        per = max(1, _BATCH_EDGES // (2 * self.avg_degree))
        delta = 0.0
        for _ in range(its):
            contrib = r / np.maximum(deg, 1)
            dangling = float(r[deg == 0].sum())
            acc = np.zeros(nv)
            for a in range(0, nv, per):
                z = min(nv, a + per)
                w = np.repeat(contrib[a:z], deg[a:z])
                np.add.at(acc, self.indices[int(ptr[a]) : int(ptr[z])], w)
            new = (1.0 - damping) / nv + damping * (acc + dangling / nv)
            delta = float(np.abs(new - r).sum())
            r = new
        self.rank[:nv] = r
        self.pr_iterations += its
        top = int(r.argmax())
        return {"iterations": its, "delta": delta, "sum": float(r.sum()), "max": float(r[top]), "argmax": top}

    @ecall
    def step(self, n: int = 4096, seed: int = 0) -> dict[str, Any]:
        """BFS from a random source, frontier by frontier, until about `n` edges were scanned.

        The last frontier is cut so the work stays near `n` edges (at most one vertex's degree over).
        """
        n = int_arg(n, "step n", 1, 1 << 24)
        seed = int_arg(seed, "step seed", 0, 1 << 64)
        self._need_graph()
        rng = np.random.Generator(np.random.PCG64(seed))
        src = int(rng.integers(0, self.n_vertices))
        visited = np.array([src], dtype=np.int64)
        frontier = visited
        edges = depth = 0
        while frontier.size and edges < n:
            start, deg = self._edges(frontier)
            k = max(1, int(np.searchsorted(np.cumsum(deg), n - edges, side="right")))
            nb = self._gather(start[:k], deg[:k])
            edges += int(deg[:k].sum())
            frontier = np.setdiff1d(nb, visited)  # unique, sorted
            visited = np.union1d(visited, frontier)
            depth += bool(frontier.size)
        self.steps += 1
        return {"ops": edges, "reached": len(visited), "depth": depth, "source": src}

    @ecall
    def fill(self, fraction: float = 0.9, seed: int = 0) -> dict[str, Any]:
        """Generate a random graph on `fraction` of the vertex capacity, written straight into CSR.

        indptr[v] = v*avg_degree + jitter (jitter < avg_degree, 0 at both ends), so degrees are
        1..2*avg_degree-1 and sum exactly; targets are squared uniform draws (skewed low).
        Replaces the graph; ranks restart uniform.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
            raise EnclaveError(f"fill fraction must be a number from 0 to 1, not {fraction!r}")
        seed = int_arg(seed, "fill seed", 0, 1 << 64)
        t0 = time.perf_counter()
        nv = min(self.capacity, round(fraction * self.capacity))
        d = self.avg_degree
        ne = nv * d
        rng = np.random.Generator(np.random.PCG64(seed))
        batch = 1 << 20
        for a in range(0, nv + 1, batch):
            z = min(nv + 1, a + batch)
            v = np.arange(a, z, dtype=np.int64)
            jitter = rng.integers(0, d, z - a, dtype=np.int64)
            jitter[(v == 0) | (v == nv)] = 0
            self.indptr[a:z] = v * d + jitter
        nvu = np.uint64(nv)
        for a in range(0, ne, batch):
            z = min(ne, a + batch)
            u = rng.bit_generator.random_raw(-(-(z - a) // 2)).view(np.uint32)[: z - a].astype(np.uint64)
            u *= u  # the square of a uniform 32-bit draw: 64 bits, skewed towards 0
            u >>= _S32
            u *= nvu
            u >>= _S32
            self.indices[a:z] = u
        for a in range(0, nv, batch):
            z = min(nv, a + batch)
            self.rank[a:z] = 1.0 / nv
            self.dist[a:z] = -1
        self.n_vertices, self.n_edges = nv, ne
        return {
            "vertices": nv,
            "edges": ne,
            "bytes": 8 * (nv + 1) + 4 * ne + 12 * nv,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    @ecall
    def stats(self) -> dict[str, Any]:
        """Sizes from small state only (reads no heap chunk)."""
        return {
            "vertices": self.n_vertices,
            "edges": self.n_edges,
            "capacity": self.capacity,
            "avg_degree": self.avg_degree,
            "pagerank_iterations": self.pr_iterations,
            "steps": self.steps,
            "used_bytes": self.heap.used_bytes,
        }

    @ecall
    def checksum(self) -> str:
        """sha256 over every heap array and the small state (hashlib over buffers, no Python loop)."""
        h = hashlib.sha256()
        h.update(
            f"graph:{self.capacity}:{self.avg_degree}:{self.n_vertices}:{self.n_edges}:"
            f"{self.pr_iterations}:{self.steps}:".encode()
        )
        for arr in (self.indptr, self.indices, self.rank, self.dist):
            h.update(memoryview(arr).cast("B"))
        return h.hexdigest()

    # -- internals ---------------------------------------------------------------------------------

    def _need_graph(self) -> None:
        if not self.n_vertices:
            raise EnclaveError("graph has no vertices; call fill first")

    def _edges(self, vs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First edge and degree of each vertex in `vs` (two gathers from indptr)."""
        start = self.indptr[vs]
        return start, self.indptr[vs + 1] - start

    def _gather(self, start: np.ndarray, deg: np.ndarray) -> np.ndarray:
        """The edges [start, start+deg) of each vertex, concatenated: one gather from indices, no loop."""
        pos = np.repeat(start - (np.cumsum(deg) - deg), deg) + np.arange(int(deg.sum()), dtype=np.int64)
        return self.indices[pos].astype(np.int64)

    def _neighbors(self, vs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated out-neighbours of vertices `vs`, and their degrees."""
        start, deg = self._edges(vs)
        return self._gather(start, deg), deg
