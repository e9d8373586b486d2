"""Recall@k as MMDocIR reports it: per question, per domain (macro) and over all questions (micro).

Pipeline: data -> processor -> model -> sampler -> [rewards] -> ppo; metrics.py scores evaluations with the rewards.
Evaluation reranks each
question's candidates, `evaluation_records` scores each ranking (recall_at_k, the rewards), and `summarize` /
`format_table` turn the per-question records into the numbers and the table a run prints. No torch.

MMDocIR's recall@k of a question is |top-k ∩ ground truth| / |ground truth|, where the ground truth counts every
relevant page of the question, also those the first-stage retriever did not put among the candidates: a reranker
cannot recover what it never saw, and the metric says so. Its tables give per-domain means and their macro
average; we print the micro average (over questions) too.
"""
from mmr5.rewards import fused_reward



def recall_at_k(order: list[int], positives: list[int], k: int, num_relevant: int | None = None) -> float:
    """Share of the relevant pages found in the top k of `order`.

    order: 0-based candidate indices, most relevant first. positives: 1-based ids of the relevant candidates.
    num_relevant: the question's relevant pages in all (default len(positives)). 0.0 when there are none:
    such a question has no defined recall, and counting it as a miss keeps it visible in the averages.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    num_relevant = len(positives) if num_relevant is None else num_relevant
    if num_relevant < len(set(positives)):
        raise ValueError(f"num_relevant {num_relevant} is less than the {len(set(positives))} positives")
    if num_relevant == 0:
        return 0.0
    top = {i + 1 for i in order[:k]}
    return len(top & set(positives)) / num_relevant


def evaluation_records(samples, results, ks=(1, 3, 5)) -> list[dict]:
    """One record per `mmr5.data.Sample` and its `RerankResult`: the answer, recall@k (MMDocIR), the retriever's
    recall@k, the recall of ordering by the first-id scores, and the rewards."""
    records = []
    for s, r in zip(samples, results):
        # Ordering by the first-id scores (ties and missing scores keep the generated order).
        by_score = r.order if r.scores is None else sorted(r.order, key=lambda i: -r.scores[i])
        rec = {"id": s.id, "domain": s.domain, "query": s.query, "order": r.order, "parsed": r.parsed,
               "text": r.text, "scores": r.scores, "score_order": by_score, "num_tokens": r.num_tokens,
               "positives": s.positives, "num_relevant": s.num_relevant}
        for k in ks:
            rec[f"recall@{k}"] = recall_at_k(r.order, s.positives, k, s.num_relevant)
            rec[f"score_recall@{k}"] = recall_at_k(by_score, s.positives, k, s.num_relevant)
            rec[f"retriever_recall@{k}"] = recall_at_k(list(range(len(s.images))), s.positives, k, s.num_relevant)
        rec.update({f"reward_{k}" if k != "reward" else k: v
                    for k, v in fused_reward(r.text, s.positives, len(s.images)).items()})
        records.append(rec)
    return records


def _recall(record: dict, key: str, k: int) -> float:
    """The record's `{key}@{k}`, or recall@k computed from its order and positives (order from `order` for
    "recall", from the candidates' own order for "retriever_recall")."""
    if f"{key}@{k}" in record:
        return float(record[f"{key}@{k}"])
    if key == "retriever_recall":
        order = list(range(len(record["order"])))
    elif key == "recall":
        order = record["order"]
    else:
        raise KeyError(f"record has no {key}@{k}")
    return recall_at_k(order, record["positives"], k, record.get("num_relevant"))


def summarize(records: list[dict], ks=(1, 3, 5), key: str = "recall") -> dict:
    """Mean recall@k per domain, `macro` (unweighted mean of the domain means, as MMDocIR) and `micro` (mean
    over questions), plus `counts` per domain. Records carry `domain` (default "default") and `{key}@k`, or
    `order` + `positives` (+ `num_relevant`) to compute it from; key="retriever_recall" scores the retriever.

    Returns {"domains": {domain: {"recall@1": ...}}, "macro": {...}, "micro": {...}, "counts": {domain: n}}
    (metric names always "recall@k", whatever `key`, so a model and a retriever summary line up).
    """
    if not records:
        raise ValueError("no records to summarize")
    by_domain: dict[str, list[dict]] = {}
    for r in records:
        by_domain.setdefault(r.get("domain", "default"), []).append(r)
    names = [f"recall@{k}" for k in ks]
    domains = {d: {n: sum(_recall(r, key, k) for r in rs) / len(rs) for n, k in zip(names, ks)}
               for d, rs in sorted(by_domain.items())}
    macro = {n: sum(m[n] for m in domains.values()) / len(domains) for n in names}
    micro = {n: sum(_recall(r, key, k) for r in records) / len(records) for n, k in zip(names, ks)}
    return {"domains": domains, "macro": macro, "micro": micro,
            "counts": {d: len(rs) for d, rs in sorted(by_domain.items())}}


def format_table(summary: dict, baseline: dict | None = None) -> str:
    """A plain-text table, one row per domain then macro and micro, recall in percent.

    With `baseline` (the retriever's order summarized the same way) each recall@k gets three columns: the model,
    the retriever and the difference.
    """
    names = list(summary["macro"])
    if baseline is not None and list(baseline["macro"]) != names:
        raise ValueError(f"baseline has metrics {list(baseline['macro'])}, the summary {names}")
    rows = [(d, summary["domains"][d], baseline and baseline["domains"][d], summary["counts"][d])
            for d in summary["domains"]]
    total = sum(summary["counts"].values())
    rows += [("macro", summary["macro"], baseline and baseline["macro"], total),
             ("micro", summary["micro"], baseline and baseline["micro"], total)]
    width = max(len("domain"), *(len(r[0]) for r in rows))
    header = [f"{'domain':<{width}}", f"{'n':>5}"]
    for metric in names:
        header += [f"{metric:>9}"] + ([] if baseline is None else [f"{'retr':>6}", f"{'diff':>6}"])
    lines = ["  ".join(header)]
    for i, (name, model, base, n) in enumerate(rows):
        if i == len(rows) - 2:
            lines.append("-" * len(lines[0]))
        cells = [f"{name:<{width}}", f"{n:>5}"]
        for metric in names:
            cells.append(f"{100 * model[metric]:>9.1f}")
            if base is not None:
                cells += [f"{100 * base[metric]:>6.1f}", f"{100 * (model[metric] - base[metric]):>+6.1f}"]
        lines.append("  ".join(cells))
    return "\n".join(lines)
