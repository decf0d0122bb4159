"""The critical-path passes against brute force: every simple path of small random graphs,
enumerated by networkx, with loops collapsed into one node by hand."""

from __future__ import annotations

import random

import networkx as nx
import pytest

from kvrt.runtime.graph.critical_path import GraphStructure, critical_path


def random_dag(rng: random.Random, n: int) -> list[tuple[int, int]]:
    return [(s, t) for s in range(n) for t in range(s + 1, n) if rng.random() < 0.3]


def brute_force(n: int, edges: list[tuple[int, int]], costs: list[float]):
    """Longest path through each node, over all simple source-to-sink paths."""
    graph = nx.DiGraph(edges)
    graph.add_nodes_from(range(n))
    sources = [v for v in graph if graph.in_degree(v) == 0]
    sinks = [v for v in graph if graph.out_degree(v) == 0]
    through = [0.0] * n
    for s in sources:
        for t in sinks:
            paths = [[s]] if s == t else nx.all_simple_paths(graph, s, t)
            for path in paths:
                length = sum(costs[v] for v in path)
                for v in path:
                    through[v] = max(through[v], length)
    return max(through), through


@pytest.mark.parametrize("seed", range(20))
def test_dags_match_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    edges = random_dag(rng, n)
    costs = [rng.choice([0.0, 0.5, 1.0, 2.0, 3.5]) for _ in range(n)]
    result = critical_path(GraphStructure.build(n, [(s, t, None) for s, t in edges]), costs)
    length, through = brute_force(n, edges, costs)
    assert result.length == pytest.approx(length)
    assert result.through == pytest.approx(through)
    path = result.path
    assert sum(costs[v] for v in path) == pytest.approx(length)
    assert all((a, b) in edges for a, b in zip(path, path[1:])), "the path follows edges"


def test_a_loop_is_one_node_weighing_its_members_costs() -> None:
    # 0 -> 1 <-> 2 -> 3, the loop stated 4 times; 0 -> 4 -> 3 bypasses it. The costs are each
    # agent's whole work, repetitions included: the stated count is reported, not applied.
    edges = [(0, 1, None), (1, 2, None), (2, 1, 4), (2, 3, None), (0, 4, None), (4, 3, None)]
    costs = [1.0, 8.0, 2.0, 1.0, 3.0]
    structure = GraphStructure.build(5, edges)
    assert structure.component[1] == structure.component[2]
    assert structure.iterations[structure.component[1]] == 4
    result = critical_path(structure, costs)
    # Expanded by hand: the loop becomes one node of 8 + 2 = 10 s.
    length, through = brute_force(4, [(0, 1), (1, 2), (0, 3), (3, 2)], [1.0, 10.0, 1.0, 3.0])
    assert result.length == length == 12
    assert [result.through[a] for a in (0, 1, 2, 3, 4)] == [12, 12, 12, 12, through[3]]
    assert through[3] == 5
    assert result.path == [0, 1, 2, 3]


def test_ties_follow_declaration_order() -> None:
    result = critical_path(GraphStructure.build(3, [(0, 1, None), (0, 2, None)]), [1, 1, 1])
    assert result.path == [0, 1]
    assert result.on_critical_path(2) and result.criticality(2) == 1


def networkx_structure(n: int, edges: list[tuple[int, int]]):
    """The condensation as networkx makes it: components in a topological order, ties broken
    by their first agent; members, successors and predecessors sorted."""
    graph = nx.DiGraph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from(edges)
    dag = nx.condensation(graph)
    order = list(nx.lexicographical_topological_sort(
        dag, key=lambda c: min(dag.nodes[c]["members"])))
    renumber = {old: new for new, old in enumerate(order)}
    component = tuple(renumber[dag.graph["mapping"][a]] for a in range(n))
    members = tuple(tuple(sorted(dag.nodes[old]["members"])) for old in order)
    successors = tuple(tuple(sorted(renumber[s] for s in dag.successors(old))) for old in order)
    predecessors = tuple(tuple(sorted(renumber[p] for p in dag.predecessors(old)))
                         for old in order)
    return component, members, successors, predecessors


@pytest.mark.parametrize("seed", range(40))
def test_the_structure_is_the_networkx_condensation(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 60)
    density = rng.choice([0.02, 0.05, 0.1, 0.3])
    edges = [(s, t) for s in range(n) for t in range(n) if rng.random() < density]
    built = GraphStructure.build(n, [(s, t, None) for s, t in edges])
    assert (built.component, built.members, built.successors,
            built.predecessors) == networkx_structure(n, edges)


def test_a_deep_chain_needs_no_recursion() -> None:
    n = 50_000  # far past Python's recursion limit
    built = GraphStructure.build(n, [(a, a + 1, None) for a in range(n - 1)] + [(n - 1, 0, 2)])
    assert built.members == (tuple(range(n)),) and built.iterations == (2,)
