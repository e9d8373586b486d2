"""mmr5.metrics: MMDocIR recall@k on hand-computed cases, and macro/micro against a plain loop."""
import random

import pytest

from mmr5.metrics import format_table, recall_at_k, summarize


def test_recall_single_positive():
    order = [2, 0, 1, 3, 4]  # candidate 3 (1-based) ranked first
    assert recall_at_k(order, [3], 1) == 1.0
    assert recall_at_k(order, [1], 1) == 0.0
    assert recall_at_k(order, [1], 2) == 1.0
    assert recall_at_k(order, [5], 4) == 0.0
    assert recall_at_k(order, [5], 5) == 1.0


def test_recall_multi_positive():
    order = [4, 1, 0, 2, 3]  # ids in rank order: 5, 2, 1, 3, 4
    assert recall_at_k(order, [2, 3], 1) == 0.0
    assert recall_at_k(order, [2, 3], 3) == 0.5
    assert recall_at_k(order, [2, 3], 4) == 1.0
    assert recall_at_k(order, [5, 2], 1) == 0.5


def test_recall_divides_by_all_relevant_pages():
    # Two of the question's four evidence pages are among the candidates; both ranked on top still give 0.5.
    assert recall_at_k([0, 1, 2], [1, 2], 2, num_relevant=4) == 0.5
    assert recall_at_k([0, 1, 2], [], 3, num_relevant=2) == 0.0  # evidence missed by the retriever


def test_recall_edge_cases():
    assert recall_at_k([0, 1], [], 1) == 0.0  # no positives: 0.0 by definition
    assert recall_at_k([1, 0], [1], 10) == 1.0  # k beyond the list
    with pytest.raises(ValueError):
        recall_at_k([0], [1], 0)
    with pytest.raises(ValueError):
        recall_at_k([0, 1], [1, 2], 1, num_relevant=1)


def test_summarize_macro_differs_from_micro():
    records = [{"domain": "a", "recall@1": 1.0}, {"domain": "a", "recall@1": 1.0}, {"domain": "a", "recall@1": 0.0},
               {"domain": "b", "recall@1": 0.0}]  # b has one question
    s = summarize(records, ks=(1,))
    assert s["domains"] == {"a": {"recall@1": pytest.approx(2 / 3)}, "b": {"recall@1": 0.0}}
    assert s["counts"] == {"a": 3, "b": 1}
    assert s["macro"]["recall@1"] == pytest.approx(1 / 3)  # (2/3 + 0) / 2
    assert s["micro"]["recall@1"] == pytest.approx(1 / 2)  # 2 / 4


def test_summarize_macro_ties_micro_with_equal_domains():
    records = [{"domain": "a", "recall@1": 1.0}, {"domain": "a", "recall@1": 0.5},
               {"domain": "b", "recall@1": 0.0}, {"domain": "b", "recall@1": 0.5}]
    s = summarize(records, ks=(1,))
    assert s["macro"]["recall@1"] == pytest.approx(0.5)
    assert s["micro"]["recall@1"] == pytest.approx(0.5)


def test_summarize_computes_from_order_and_retriever():
    records = [{"domain": "x", "order": [1, 0, 2], "positives": [2]},
               {"order": [2, 1, 0], "positives": [1, 2], "num_relevant": 3}]  # no domain: "default"
    s = summarize(records, ks=(1, 2))
    assert s["domains"]["x"] == {"recall@1": 1.0, "recall@2": 1.0}
    assert s["domains"]["default"] == {"recall@1": 0.0, "recall@2": pytest.approx(1 / 3)}
    base = summarize(records, ks=(1, 2), key="retriever_recall")  # candidates in their given order
    assert base["domains"]["x"] == {"recall@1": 0.0, "recall@2": 1.0}
    assert base["domains"]["default"] == {"recall@1": pytest.approx(1 / 3), "recall@2": pytest.approx(2 / 3)}
    with pytest.raises(ValueError):
        summarize([])


def test_summarize_fixture_against_plain_loop():
    rng = random.Random(0)
    records = []
    for i in range(60):
        n = rng.randint(3, 6)
        order = rng.sample(range(n), n)
        positives = rng.sample(range(1, n + 1), rng.randint(1, 2))
        records.append({"domain": rng.choice(["finance", "law", "news"]), "order": order, "positives": positives,
                        "num_relevant": len(positives) + rng.randint(0, 1)})
    s = summarize(records)
    for k in (1, 3, 5):
        hits = {}
        for r in records:  # recall written out again, independently of recall_at_k
            top = [i + 1 for i in r["order"][:k]]
            hits.setdefault(r["domain"], []).append(sum(p in top for p in r["positives"]) / r["num_relevant"])
        per_domain = {d: sum(v) / len(v) for d, v in hits.items()}
        assert s["macro"][f"recall@{k}"] == pytest.approx(sum(per_domain.values()) / len(per_domain))
        assert s["micro"][f"recall@{k}"] == pytest.approx(sum(sum(v) for v in hits.values()) / len(records))
        for d, value in per_domain.items():
            assert s["domains"][d][f"recall@{k}"] == pytest.approx(value)
    assert sum(s["counts"].values()) == 60


def test_format_table():
    records = [{"domain": "a", "recall@1": 1.0, "retriever_recall@1": 0.0},
               {"domain": "bb", "recall@1": 0.5, "retriever_recall@1": 0.5}]
    s, base = summarize(records, ks=(1,)), summarize(records, ks=(1,), key="retriever_recall")
    lines = format_table(s).splitlines()
    assert lines[0].split() == ["domain", "n", "recall@1"]
    assert lines[1].split() == ["a", "1", "100.0"]
    assert lines[-2].split() == ["macro", "2", "75.0"]
    assert lines[-1].split() == ["micro", "2", "75.0"]
    lines = format_table(s, base).splitlines()
    assert lines[0].split() == ["domain", "n", "recall@1", "retr", "diff"]
    assert lines[1].split() == ["a", "1", "100.0", "0.0", "+100.0"]
    assert lines[-1].split() == ["micro", "2", "75.0", "25.0", "+50.0"]
    with pytest.raises(ValueError):
        format_table(s, summarize([{"recall@1": 1.0, "recall@3": 1.0}], ks=(1, 3)))
