"""OA / BWT / FWT by hand, density and Jaccard overlap on real delta objects."""

import torch

from jlserve.delta import diff_tensors
from trainer.metrics import AccuracyMatrix, DeltaDensity, LossMatrix, SupportOverlap


def test_oa_bwt_fwt_and_gain_over_the_base_row_by_hand() -> None:
    acc = AccuracyMatrix(["a", "b", "c"])
    # Rows after each task: the tasks seen so far plus the next one (before training on it).
    rows = [[0.8, 0.3], [0.6, 0.9, 0.2], [0.5, 0.7, 1.0]]
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            acc.update(i, j, v, v)
    assert "FWT" not in acc.result() and "gain_over_base" not in acc.result()  # no base row yet
    for j, b in enumerate([0.1, 0.4, 0.1]):
        acc.update(-1, j, b, b)
    r = acc.result()
    assert r["base"] == [0.1, 0.4, 0.1]
    assert abs(r["OA"] - (0.5 + 0.7 + 1.0) / 3) < 1e-12
    assert abs(r["BWT"] - ((0.5 - 0.8) + (0.7 - 0.9)) / 2) < 1e-12
    assert abs(r["FWT"] - ((0.3 - 0.4) + (0.2 - 0.1)) / 2) < 1e-12  # a[j-1][j] - b[j]
    assert abs(r["gain_over_base"] - (r["OA"] - 0.6 / 3)) < 1e-12
    acc.reset()
    assert "OA" not in acc.result() and acc.base == [None] * 3


def test_oa_and_bwt_read_the_last_whole_row() -> None:
    """Under eval_schedule "needed" the middle rows hold only the diagonal and the next task:
    OA/BWT come from the last row evaluated on every task seen, and say which one."""
    acc = AccuracyMatrix(["a", "b", "c"])
    for i, j, v in [(0, 0, 0.8), (0, 1, 0.3), (1, 1, 0.9), (1, 2, 0.2)]:
        acc.update(i, j, v, v)
    r = acc.result()
    assert r["OA_after"] == "a" and r["OA"] == 0.8 and r["BWT"] is None  # row 1 is not whole
    for j, v in enumerate([0.5, 0.7, 1.0]):
        acc.update(2, j, v, v)
    r = acc.result()
    assert r["OA_after"] == "c" and abs(r["OA"] - (0.5 + 0.7 + 1.0) / 3) < 1e-12
    assert abs(r["BWT"] - ((0.5 - 0.8) + (0.7 - 0.9)) / 2) < 1e-12


def test_held_out_loss_forgetting_by_hand() -> None:
    losses = LossMatrix(["a", "b", "c"])
    for i, j, v in [(0, 0, 1.0), (0, 1, 3.0), (1, 1, 0.5), (1, 2, 2.0)]:
        losses.update(i, j, v)
    assert "forgetting" not in losses.result()  # no whole row after the first task yet
    for j, v in enumerate([1.5, 0.75, 0.25]):
        losses.update(2, j, v)
    r = losses.result()
    assert r["forgetting"] == {"a": 0.5, "b": 0.25} and r["mean_forgetting"] == 0.375
    losses.restore({"matrix": [[1.0, 2.0]], "base": [4.0, 5.0]})  # a stream that grew
    assert losses.matrix[0] == [1.0, 2.0, None] and losses.base == [4.0, 5.0, None]


def test_density_and_jaccard_overlap() -> None:
    base = {"w": torch.zeros(10), "other": torch.zeros(3)}
    one = {"w": base["w"].clone(), "other": base["other"]}
    one["w"][[0, 1, 2, 3]] = 1.0
    two = {"w": one["w"].clone(), "other": base["other"]}
    two["w"][[2, 3, 4, 5]] = 2.0
    d1 = diff_tensors(base, one, task="a", version=1)
    d2 = diff_tensors(one, two, task="b", version=2)
    density = DeltaDensity({"w": 10})
    density.update("a", d1)
    assert density.result()["a"]["density"] == 0.4
    assert density.summary()["task"] == {"min": 0.4, "median": 0.4, "max": 0.4}
    overlap = SupportOverlap()
    overlap.update("a", d1)
    overlap.update("b", d2)
    j = overlap.result()["jaccard"]
    assert j[0][1] == j[1][0] == 2 / 6 and j[0][0] == 1.0


def test_jaccard_rows_computed_as_tasks_arrive_equal_every_pair_computed_at_the_end() -> None:
    """The matrix is built one row per task; it must equal the pairwise Jaccard of the
    supports computed from scratch, an empty delta (a closed gate) included."""
    generator = torch.Generator().manual_seed(0)
    states = [{"w": torch.zeros(64), "v": torch.zeros(8)}]
    for keep in (0.3, 0.0, 0.6, 0.1):  # share of entries each task changes
        state = {n: t.clone() for n, t in states[-1].items()}
        for t in state.values():
            t[torch.rand(t.shape, generator=generator) < keep] += 1.0
        states.append(state)
    deltas = [diff_tensors(states[i], states[i + 1], task=f"t{i}", version=i + 1) for i in range(4)]
    overlap = SupportOverlap()
    for i, delta in enumerate(deltas):
        overlap.update(f"t{i}", delta)
    supports = [
        {(n, int(k)) for n, c in d.changes.items() for k in c.index.tolist()} for d in deltas
    ]

    def jaccard(a: set, b: set) -> float:
        return len(a & b) / len(a | b) if a | b else 0.0

    expected = [[jaccard(a, b) for b in supports] for a in supports]
    assert not supports[1] and expected[1][1] == 0.0 and 0 < expected[0][2] < 1
    assert overlap.result() == {"tasks": ["t0", "t1", "t2", "t3"], "jaccard": expected}
