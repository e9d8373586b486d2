"""evaluate.py end to end on a tiny checkpoint: the four outputs, resume, one-line errors, the report renders."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import page_images, save_pages

import evaluate
from mmr5.metrics import summarize

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_data")
    rows = []
    for i in range(5):
        images = save_pages(d, i, page_images(3 + i % 2, seed=i))
        rows.append({"query": f"item {i}", "images": images, "positives": [i % 3 + 1],
                     "domain": ["finance", "science"][i % 2]})
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def run(model, data, out, *extra):
    evaluate.main(["--model", str(model), "--data", str(data / "eval.jsonl"), "--out", str(out),
                   "--max-new-tokens", "6", "--batch-size", "2", *map(str, extra)])


def test_writes_all_outputs(tiny_model_dirs, eval_data, tmp_path, capsys):
    run(tiny_model_dirs["qwen2_5_vl"], eval_data, tmp_path / "e", "--samples", 2)
    printed = capsys.readouterr().out
    assert "finance" in printed and "macro" in printed and "micro" in printed and "retr" in printed
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    predictions = [json.loads(line) for line in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 5 and results["queries"] == 5
    assert results["reranker"] == summarize(predictions)  # the file's numbers are the predictions' numbers
    assert set(results["reranker"]["domains"]) == {"finance", "science"}
    assert results["parse_failure_rate"] == 1.0  # a random model writes no answer: the retriever's order stands
    assert results["reranker"]["macro"] == results["retriever"]["macro"]
    assert results["sampled_runs"]["k"] == 2 and "macro recall@1" in results["sampled_runs"]
    assert all({"order", "text", "reward_format", "scores", "num_tokens"} <= set(p) for p in predictions)
    html = (tmp_path / "e" / "report.html").read_text()
    assert html.count("class='query'") == 5 and "data:image/jpeg;base64," in html


def test_resume_keeps_finished_queries(tiny_model_dirs, eval_data, tmp_path, monkeypatch):
    out = tmp_path / "r"
    run(tiny_model_dirs["qwen2_vl"], eval_data, out, "--limit", 2)
    first = (out / "predictions.jsonl").read_text().splitlines()
    seen = []
    real = evaluate.Reranker.rerank_batch

    def counting(self, queries, *a, **k):
        seen.extend(queries)
        return real(self, queries, *a, **k)

    monkeypatch.setattr(evaluate.Reranker, "rerank_batch", counting)
    run(tiny_model_dirs["qwen2_vl"], eval_data, out, "--resume")
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert lines[:2] == first and len(lines) == 5
    assert len(seen) == 3  # only the three unfinished queries were reranked


def test_bad_data_stops_before_model_work(tiny_model_dirs, eval_data, tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded for bad data")

    monkeypatch.setattr(evaluate.Reranker, "from_pretrained", no_model)
    bad = tmp_path / "bad"
    shutil.copytree(eval_data, bad)
    (bad / "p3_1.png").unlink()
    with pytest.raises(SystemExit, match=r"eval.jsonl:4: .*p3_1.png"):
        run(tiny_model_dirs["qwen2_vl"], bad, tmp_path / "x")
    (bad / "eval.jsonl").write_text('{"query": "q", "images": []}\n')
    with pytest.raises(SystemExit, match="eval.jsonl:1"):
        run(tiny_model_dirs["qwen2_vl"], bad, tmp_path / "x")
    r = subprocess.run([sys.executable, "evaluate.py", "--model", str(tiny_model_dirs["qwen2_vl"]), "--data",
                        str(eval_data / "eval.jsonl"), "--batch-size", "0"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_report_puts_the_answers_furthest_from_the_best_first(eval_data, tmp_path):
    """Parse failures first, then by gap = 1 - rerank reward, not by Recall@1: a perfect answer to a question with
    two relevant pages (R@1 0.5) comes after a real mistake (R@1 0, but its positive is second: gap 0.875)."""
    from mmr5.report import write_report
    from mmr5.rewards import fused_reward

    def record(id, text, positives, n=3):
        rewards = fused_reward(text, positives, n)
        order, parsed = ([int(i) - 1 for i in text[text.index("[") + 1:text.index("]")].split(",")], True) \
            if "<answer>" in text else (list(range(n)), False)
        return {"id": id, "query": f"query {id}", "domain": "d", "order": order, "parsed": parsed, "text": text,
                "positives": positives, "recall@1": float(order[0] + 1 in positives) / len(positives),
                "reward_rerank": rewards["rerank"]}

    records = [record("perfect-two", "<answer>[1, 2, 3]</answer>", [1, 2]),
               record("second", "<answer>[1, 2, 3]</answer>", [2]),
               record("unparsed", "no answer", [1]),
               record("last", "<answer>[1, 2, 3]</answer>", [3]),
               record("perfect-one", "<answer>[3, 1, 2]</answer>", [3])]
    images = {r["id"]: [str(eval_data / f"p0_{j}.png") for j in range(3)] for r in records}
    write_report(tmp_path / "report.html", records, images, "table", "title")
    html = (tmp_path / "report.html").read_text()
    ids = re.findall(r"data-id='([^']+)' data-mistakes='(\d)' data-unparsed='(\d)'", html)
    assert ids == [("unparsed", "1", "1"), ("last", "1", "0"), ("second", "1", "0"), ("perfect-two", "0", "0"),
                   ("perfect-one", "0", "0")]
    assert re.findall(r"gap (\d\.\d\d)", html) == ["1.00", "0.96", "0.88", "0.00", "0.00"]
    assert "mistakes (3)" in html and "parse failures (1)" in html and "<script>" in html


def test_report_renders_in_headless_chromium(tiny_model_dirs, eval_data, tmp_path):
    """The HTML report renders in a real browser. Chromium is a system package, not a pip one: on a machine
    without it (a fresh one running the README's test command) this is skipped; CI installs it and sets
    MMR5_REQUIRE_CHROMIUM=1, so there a missing browser fails instead."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        assert not os.environ.get("MMR5_REQUIRE_CHROMIUM"), "Chromium is needed for this test (.ci/run installs it)"
        pytest.skip("Chromium is not installed (apt-get install chromium); .ci/run installs it and runs this test")
    run(tiny_model_dirs["qwen2_5_vl"], eval_data, tmp_path / "e")
    report = tmp_path / "e" / "report.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    r = subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1200,900", report.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.exists() and shot.stat().st_size > 5000
    from PIL import Image

    with Image.open(shot) as im:
        assert len(set(im.convert("L").resize((64, 48)).getdata())) > 5  # not a blank page
    dom = subprocess.run([chromium, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.stdout.count('class="query"') == 5  # every query made it into the rendered page
    assert "5 shown" in dom.stdout  # the filter script ran
    assert dom.stdout.count("<img") == 3 + 4 + 3 + 4 + 3


def test_built_in_model_is_evaluated_on_its_own_stage(tmp_path, monkeypatch):
    """No flags: the newest built-in model, the PPO one on the RL stage's held-out prompts, else SFT's on SFT's."""
    import mmr5.synthetic

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mmr5.synthetic, "build_demo", lambda: {"eval": "sft-eval.jsonl"})
    monkeypatch.setattr(mmr5.synthetic, "build_rl_demo", lambda: {"eval": "rl-eval.jsonl"})
    for stage, data in (("sft", "sft-eval.jsonl"), ("ppo", "rl-eval.jsonl")):
        (tmp_path / "runs" / "demo" / stage / "model").mkdir(parents=True)
        (tmp_path / "runs" / "demo" / stage / "model" / "config.json").write_text("{}")
        args = evaluate.parse_args([])
        assert (args.model, args.data) == (f"runs/demo/{stage}/model", data)
