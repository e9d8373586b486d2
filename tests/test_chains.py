"""mmr5.chains: the release's templates and assembly, the API teacher against a local server with real faults,
kill-and-resume, the checkpoint teacher feeding train_sft.py, and the bad inputs."""
import base64
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import page_images
from test_data import mmdocir  # noqa: F401 (the fixture: a small MMDocIR release on disk)

import train_sft
from mmr5 import chains
from mmr5.chains import Reply, assemble, judge, refine_question, refined, shuffled
from mmr5.data import Sample, read_samples
from mmr5.model import Qwen2VL
from mmr5.processor import Processor

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-0123456789"
# sha256 of the release's template strings as Python evaluates them: i2vec/MM-R5 (commit 0806019b)
# src/sft/gpt4o_cot.py lines 43-54 and src/sft/gpt4o_refine.py lines 22-30.
RELEASE_SHA256 = {
    "POSITIVE_TEMPLATE": "0070654f331c17de8f470e5b9e3d9f5196f6808af20196c655af531558745568",
    "NEGATIVE_TEMPLATE": "c9db6bb44efb9588877e441f2e1bde586d5225f8bae245aa4ca33f2c1e30a872",
    "REFINE_TEMPLATE": "d5301c54fa0168fe1dd554038cbae08d60bd7ac1fa664f365cc4c087a5162a9c",
}


def test_templates_are_the_releases():
    for name, digest in RELEASE_SHA256.items():
        assert hashlib.sha256(getattr(chains, name).encode()).hexdigest() == digest, name


def test_response_as_gpt4o_cot_and_refine_build_it():
    response = assemble(["a.", "b.", "c.", "d.", "e."], [4, 2])
    # gpt4o_cot.py lines 137-159: analyses in page order, then ids sorted by (not positive, id).
    assert response == ("<think>\nImage 1: a.\nImage 2: b.\nImage 3: c.\nImage 4: d.\nImage 5: e.\n</think>"
                        "<answer>[2, 4, 1, 3, 5]</answer>")
    question = refine_question("Q?", response, [2, 4])
    # gpt4o_refine.py lines 74-86: the think without its tags, "image" + ", ".join(ids), summary between tags.
    assert question == chains.REFINE_TEMPLATE.format(question="Q?", positive_image="image2, 4",
                                                     think="Image 1: a.\nImage 2: b.\nImage 3: c.\nImage 4: d.\nImage 5: e.")
    assert refined(response, "Two sentences.") == "<think>Two sentences.</think><answer>[2, 4, 1, 3, 5]</answer>"


def test_shuffle_keeps_labels_with_their_pages():
    sample = Sample("q", [f"/p{i}.png" for i in range(6)], [2, 5], id="x")
    a, b = shuffled(sample, 0), shuffled(sample, 0)
    assert a == b and sorted(a.images) == sample.images and a.images != sample.images
    assert sorted(a.images[p - 1] for p in a.positives) == ["/p1.png", "/p4.png"]
    assert shuffled(sample, 1).images != a.images


@pytest.mark.parametrize("reply,label,problem", [
    (Reply("The table lists the 2023 revenue the question asks for."), True, None),
    (Reply("The page is a cover sheet; it cannot help answer the question."), False, None),
    (Reply("  "), True, "empty"),
    (Reply("The table lists", finished=False), True, "cut off"),
    (Reply(" ".join(["word"] * 61)), False, "over 60 words"),
    (Reply("This chart doesn't help answer the question."), True, "unable to help"),
    (Reply("I'm sorry, I can't help with that."), False, "refused"),
    (Reply("Nothing I can say.", refused=True), False, "refused"),
    (Reply(None, error="HTTP 500, 5 tries"), True, "request failed"),
])
def test_quality_guards(reply, label, problem):
    verdict = judge(reply, label, 60)
    assert verdict is None if problem is None else problem in verdict


# ---------------------------------------------------------------- a chat-completions server with faults

class Endpoint(ThreadingHTTPServer):
    """Answers by the fault named in the question ("fault-NAME"), counting requests per question and page."""
    daemon_threads = True

    def __init__(self, delay=0.0):
        super().__init__(("127.0.0.1", 0), Handler)
        self.delay, self.log, self.counts, self.lock = delay, [], {}, threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request, client_address):
        pass  # a client that timed out closed its socket: nothing to report


def page_answer(url):
    return f"Page {hashlib.sha1(url.encode()).hexdigest()[:8]} shows what matters here."


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, body, headers=()):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        text, url = content[-1]["text"], content[0]["image_url"]["url"] if len(content) == 2 else None
        server = self.server
        with server.lock:
            n = server.counts[text, url] = server.counts.get((text, url), 0) + 1
            server.log.append(dict(time=time.time(), path=self.path, auth=self.headers.get("Authorization"),
                                   body=body, text=text, url=url, n=n))
        time.sleep(server.delay)
        fault = (re.findall(r"fault-(\w+)", text) or ["none"])[0]
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self.reply(401, {"error": {"message": "Incorrect API key provided."}})
        if (fault == "e500" and n == 1) or fault == "always500":
            return self.reply(500, {"error": {"message": "internal error"}})
        if fault == "e429" and n == 1:
            return self.reply(429, {"error": {"message": "rate limited"}}, [("Retry-After", "1")])
        if fault == "html" and n == 1:
            return self.reply(200, b"<html>502 Bad Gateway</html>")
        if fault == "slow" and n == 1:
            time.sleep(1.5)
        message, finish = {"role": "assistant", "content": page_answer(url) if url else "Summary."}, "stop"
        if fault == "empty" or (fault == "emptyonce" and n == 1):
            message["content"] = ""
        if fault == "refusal":
            message = {"role": "assistant", "content": None, "refusal": "I'm sorry, I cannot help with that."}
        if fault == "cut":
            finish = "length"
        if fault == "deny" and " can help" in text:
            message["content"] = "This page does not help answer the question."
        self.reply(200, {"choices": [{"index": 0, "message": message, "finish_reason": finish}],
                         "usage": {"prompt_tokens": 100, "completion_tokens": 10}})


def write_data(folder, queries, pages=2):
    """data.jsonl with one sample per query, `pages` distinct pages each, the last one relevant."""
    rows = []
    for i, query in enumerate(queries):
        names = []
        for j, image in enumerate(page_images(pages, seed=i)):
            names.append(f"p{i}_{j}.{'jpg' if j == 0 else 'png'}")
            image.save(folder / names[-1])
        rows.append({"query": query, "images": names, "positives": [pages]})
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "data.jsonl"


def expected_response(folder, images, positives):
    """What a good run writes: each page's server answer, keyed by its data URL."""
    urls = [chains.data_url(str(folder / name)) for name in images]
    return assemble([page_answer(u) for u in urls], positives)


def api_args(endpoint, data, out, *extra):
    return ["--data", str(data), "--out", str(out), "--teacher", endpoint.url, "--teacher-model", "teach-1",
            "--workers", "3", "--timeout", "0.5", "--tries", "3", "--retry-delay", "0.01", *map(str, extra)]


def test_api_teacher_through_faults(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    faults = ["none", "e500", "e429", "html", "slow", "emptyonce", "empty", "refusal", "cut", "deny", "always500"]
    data = write_data(tmp_path, [f"Which page? fault-{f}" for f in faults])
    endpoint = Endpoint()
    chains.main(api_args(endpoint, data, tmp_path / "sft.jsonl"))
    printed = capsys.readouterr()

    written = {s.query.split("-")[1]: s for s in read_samples(tmp_path / "sft.jsonl", require_response=True)}
    assert sorted(written) == sorted(["none", "e500", "e429", "html", "slow", "emptyonce"])
    for s in written.values():
        assert s.response == expected_response(tmp_path, [Path(p).name for p in s.images], [2])
    out = printed.out
    for fault, why in [("empty", "empty answer"), ("refusal", "refused"), ("cut", "cut off"),
                       ("deny", "unable to help"), ("always500", "HTTP 500")]:
        assert re.search(rf"skipped data.jsonl:{faults.index(fault) + 1}: page \d: .*{why}", printed.err), fault
    assert "done 6 (now 6 in" in out and "skipped 5" in out
    # 29 answers came back: 2 per good sample (5), 4 for emptyonce, empty, refusal, cut (asked twice), 3 for deny
    assert f"teacher tokens: {100 * 29} prompt + {10 * 29} completion" in out

    log = endpoint.log
    assert {r["path"] for r in log} == {"/v1/chat/completions"} and {r["auth"] for r in log} == {f"Bearer {KEY}"}
    assert KEY not in printed.out + printed.err + (tmp_path / "sft.jsonl").read_text()
    first = next(r for r in log if "fault-none" in r["text"] and r["url"].startswith("data:image/jpeg"))
    assert first["body"]["model"] == "teach-1" and first["body"]["max_tokens"] == 256
    assert "temperature" not in first["body"]  # the endpoint's default, as the release
    assert first["text"] == chains.NEGATIVE_TEMPLATE.format(question="Which page? fault-none")
    jpeg = (tmp_path / "p0_0.jpg").read_bytes()
    assert first["url"] == "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    assert any(r["text"] == chains.POSITIVE_TEMPLATE.format(question="Which page? fault-none") for r in log)
    rate_limited = [r["time"] for r in log if "fault-e429" in r["text"] and r["url"] == log_url(log, "e429")]
    assert rate_limited[1] - rate_limited[0] >= 0.95  # Retry-After: 1 honoured (the backoff alone is 0.01 s)
    assert endpoint.counts[next(k for k in endpoint.counts if "fault-empty " in k[0] + " ")] == 2  # retried once


def log_url(log, fault):
    return next(r["url"] for r in log if f"fault-{fault}" in r["text"] and r["n"] == 1)


def test_refine_pass_and_shuffle(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    data = write_data(tmp_path, ["first?", "second?"], pages=4)
    endpoint = Endpoint()
    chains.main(api_args(endpoint, data, tmp_path / "sft.jsonl", "--refine", "--shuffle", "--seed", 3))
    samples = read_samples(tmp_path / "sft.jsonl", require_response=True)
    source = {s.id: s for s in read_samples(data)}
    for s in samples:
        original = source[s.id]
        assert s.images != original.images and sorted(s.images) == sorted(original.images)
        assert [s.images[p - 1] for p in s.positives] == [original.images[3]]
        chain = expected_response(tmp_path, [Path(p).name for p in s.images], s.positives)
        asked = [r["text"] for r in endpoint.log if r["url"] is None and s.query in r["text"]]
        assert asked == [refine_question(s.query, chain, s.positives)]
        assert s.response == refined(chain, "Summary.")


def test_mmdocir_inputs(mmdocir, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    args = api_args(Endpoint(), mmdocir / "unused.jsonl", mmdocir / "sft.jsonl")
    args[:2] = ["--mmdocir-annotations", str(mmdocir / "MMDocIR_annotations.jsonl"), "--mmdocir-pages",
                str(mmdocir / "pages"), "--mmdocir-retrieval", str(mmdocir / "retrieval.jsonl")]
    chains.main(args)
    assert "1 of 4 MMDocIR questions have no evidence page in the retriever's top 5: left out" in capsys.readouterr().out
    samples = {s.id: s for s in read_samples(mmdocir / "sft.jsonl", require_response=True)}
    assert sorted(samples) == ["a.pdf#0", "a.pdf#1", "b.pdf#0"]  # in the order they finished
    assert samples["a.pdf#0"].response.endswith("</think><answer>[2, 1, 3, 4, 5]</answer>")


def test_kill_and_rerun_writes_every_sample_once(tmp_path, monkeypatch, capsys):
    data = write_data(tmp_path, [f"question {i}?" for i in range(12)])
    out = tmp_path / "sft.jsonl"
    endpoint = Endpoint(delay=0.1)
    env = {**os.environ, "OPENAI_API_KEY": KEY, "PYTHONPATH": str(ROOT)}
    args = api_args(endpoint, data, out)
    first = subprocess.Popen([sys.executable, "-m", "mmr5.chains", *args], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert 2 <= out.read_text().count("\n") < 12, "the kill came after the run ended"
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    chains.main(args)  # the same command again (in this process: one interpreter start less)
    stdout = capsys.readouterr().out
    lines = out.read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]  # every line valid JSON
    assert sorted(ids) == sorted(f"data.jsonl:{i}" for i in range(1, 13))  # each sample exactly once
    assert f"already in {out}" in stdout and "skipped 0" in stdout
    assert len(read_samples(out, require_response=True)) == 12


def test_rerun_drops_a_cut_last_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    data = write_data(tmp_path, ["one?", "two?", "three?"])
    endpoint = Endpoint()
    chains.main(api_args(endpoint, data, tmp_path / "sft.jsonl", "--limit", 1))
    whole = (tmp_path / "sft.jsonl").read_text()
    (tmp_path / "sft.jsonl").write_text(whole + whole[:40])  # a second line cut short
    chains.main(api_args(endpoint, data, tmp_path / "sft.jsonl"))
    assert "removed an incomplete last line" in capsys.readouterr().err
    lines = (tmp_path / "sft.jsonl").read_text().splitlines()
    assert lines[0] == whole.strip() and sorted(json.loads(x)["id"] for x in lines) == [
        "data.jsonl:1", "data.jsonl:2", "data.jsonl:3"]


# ---------------------------------------------------------------- the checkpoint teacher

def chatty_copy(src, dst):
    """A copy of a tiny checkpoint that ignores its prompt and says a few words, then stops: each step draws one
    of three words or <|im_end|> with equal odds. (An untrained tiny model rambles to the token budget, which the
    guards reject.) Every hidden state is e_0: embeddings and the merger give e_0, the layers add nothing, so the
    logits are lm_head's column 0."""
    model, proc = Qwen2VL.from_pretrained(src), Processor.from_pretrained(src)
    hidden = model.config.text.hidden_size
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        last = model.visual.merger.mlp[2]
        last.weight.zero_()
        last.bias.zero_()[0] = 1.0
        model.model.norm.weight.zero_()[0] = hidden ** -0.5
        model.lm_head.weight.zero_()[:, 0] = -30.0
        model.lm_head.weight[proc.encode(" page shows red")[:3] + [proc.im_end_id], 0] = 0.0
    model.save_pretrained(dst, side_files_from=src)
    return dst


def test_checkpoint_teacher_feeds_train_sft(tiny_model_dirs, tmp_path, capsys):
    data = write_data(tmp_path, [f"item {i}?" for i in range(4)], pages=3)
    teacher = chatty_copy(tiny_model_dirs["qwen2_5_vl"], tmp_path / "teacher")
    out = tmp_path / "sft.jsonl"
    chains.main([str(a) for a in ["--data", data, "--out", out, "--teacher", teacher, "--batch-size", 4,
                                  "--max-new-tokens", 24, "--temperature", 1.0, "--seed", 0, "--max-pixels", 56 * 56]])
    printed = capsys.readouterr().out
    samples = read_samples(out, require_response=True)
    assert len(samples) >= 2, printed
    for s in samples:
        assert re.fullmatch(r"<think>\nImage 1: .+\nImage 2: .+\nImage 3: .+\n</think><answer>\[3, 1, 2\]</answer>",
                            s.response), s.response
    assert re.search(r"teacher tokens: [1-9]\d* prompt \+ [1-9]\d* completion", printed)
    train_sft.main(["--model", str(tiny_model_dirs["qwen2_5_vl"]), "--train", str(out), "--out", str(tmp_path / "run"),
                    "--steps", "2", "--batch-size", "2", "--log-every", "1", "--save-every", "2"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    losses = [json.loads(x).get("loss") for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and all(l is None or l == l and l > 0 for l in losses)


# ---------------------------------------------------------------- bad inputs

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case,match", [
    ("no-positives", r"data.jsonl: 2 of 3 samples have no positives \(data.jsonl:1, data.jsonl:3\)"),
    ("unreachable", r"cannot reach http://127.0.0.1:\d+/v1/chat/completions: connection failed"),
    ("wrong-key", r"refused the key \(HTTP 401 Incorrect API key provided.\): check \$OPENAI_API_KEY"),
    ("not-a-checkpoint", r"--teacher .*pages is not a Qwen2-VL / Qwen2.5-VL checkpoint folder: no config.json"),
    ("no-such-teacher", r"--teacher .*nowhere: no such folder, and not an http\(s\):// URL"),
])
def test_bad_inputs(tmp_path, monkeypatch, case, match):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong" if case == "wrong-key" else KEY)
    data = write_data(tmp_path, ["a?", "b?", "c?"])
    if case == "no-positives":
        rows = [json.loads(x) for x in data.read_text().splitlines()]
        for row in rows[0], rows[2]:
            row.update(positives=[], num_relevant=1)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher = {"unreachable": f"http://127.0.0.1:{free_port()}/v1", "not-a-checkpoint": str(tmp_path / "pages"),
               "no-such-teacher": str(tmp_path / "nowhere")}.get(case, None)
    (tmp_path / "pages").mkdir()
    page_images(1)[0].save(tmp_path / "pages" / "1.png")
    args = api_args(Endpoint(), data, tmp_path / "sft.jsonl")
    if teacher:
        args[args.index("--teacher") + 1] = teacher
    with pytest.raises(SystemExit) as e:
        chains.main(args)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message and "sk-wrong" not in message
    assert re.search(match, message), message
