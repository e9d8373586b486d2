"""Reasoning chains for SFT from a teacher model: MM-R5's data stage, for a user's own documents.

Pipeline: [data] -> processor -> model -> sampler -> rewards -> ppo; chains.py writes SFT data with a teacher (the
model and sampler, or an API).

    python -m mmr5.chains --data samples.jsonl --out sft.jsonl --teacher /models/Qwen2.5-VL-72B-Instruct
    python -m mmr5.chains --data samples.jsonl --out sft.jsonl --teacher http://localhost:8000/v1 \\
        --teacher-model Qwen/Qwen2.5-VL-72B-Instruct      # vLLM's server, GPT-4o, any chat-completions API

Why: the paper's SFT targets were written by GPT-4o with the release's src/sft/gpt4o_cot.py (and, optionally,
gpt4o_refine.py), scripts wired to Azure. The method is kept exactly: the teacher sees one candidate page at a time
and is *told* whether it is relevant ("why ... can help" / "why ... cannot help"), so each analysis is a rationale
for a known label rather than a guess; the analyses become `<think>\\nImage 1: ...\\nImage 2: ...\\n</think>` and
the answer lists the relevant ids ascending, then the rest ascending. `--refine` asks once more for a two-sentence
summary of those analyses, which replaces the think. Cost: one teacher call per page, one more per sample with
--refine (plus a retry for each answer a guard rejects).

A long job loses nothing: each finished sample is appended to --out as one complete line (one write call), so the
same command resumes after a crash or a kill (samples already in --out are skipped; a cut last line is removed).
A sample whose teacher requests keep failing, or whose analysis fails a quality guard twice (empty, cut off at the
token budget, far over the 40-word brief, a refusal, or a relevant page described as unable to help), is reported
and left out; rerunning asks for it again.
"""
import argparse
import base64
import email.utils
import http.client
import io
import json
import os
import random
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from mmr5.data import DataError, Sample, read_mmdocir, read_samples, sample_record
from mmr5.model import Qwen2VL
from mmr5.processor import Processor
from mmr5.reranker import check_pair, default_device_dtype
from mmr5.sampler import generate

# The release's questions, byte for byte: i2vec/MM-R5 src/sft/gpt4o_cot.py lines 43-54 (positive_template,
# negative_template) and src/sft/gpt4o_refine.py lines 22-30 (template), commit 0806019b.
POSITIVE_TEMPLATE = (
    "Given an image retrieved from the document, "
    "please analyze in a paragraph of 40 words or less "
    "why the information in this picture can help answer this question about the document: "
    "{question}"
)
NEGATIVE_TEMPLATE = (
    "Given an image retrieved from the document, "
    "please analyze in a paragraph of 40 words or less "
    "why the information in this picture cannot help answer this question about the document: "
    "{question}"
)
REFINE_TEMPLATE = (
    "Given a question and the analysis of the five retrieved images, "
    "please summarize in one sentence why {positive_image} can help answer the question, "
    "and in another sentence why the other images cannot."
    "\n\n"
    "Question: {question}"
    "\n\n"
    "Analysis of the images:\n{think}"
)
# A relevant page described as unable to help ("cannot help", "doesn't answer", "not relevant", ...).
DENIAL = re.compile(r"(?:cannot|n['’]t|\bnot|unable to)\s+(?:\w+\s+)?(?:help|assist|answer)\b|"
                    r"\bnot relevant\b|\birrelevant\b", re.IGNORECASE)
REFUSAL = re.compile(r"^\W*(?:I['’]m sorry|I am sorry|sorry|I apologi[sz]e|I can(?:not|['’]t) (?:help|assist)|"
                     r"I['’]m unable|I am unable)", re.IGNORECASE)
API_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


class TeacherError(RuntimeError):
    """The teacher cannot be used at all (unreachable, key refused, unknown model): the run stops."""


@dataclass
class Reply:
    text: str | None  # None: the request failed (error says why)
    finished: bool = True  # False: cut off at the token budget
    refused: bool = False  # the API flagged a refusal
    error: str | None = None


@dataclass
class Prompt:
    text: str
    image: str | None = None  # one page, or none (the refine pass)
    label: bool | None = None  # the page is relevant (None: not a page question)


def page_question(query: str, relevant: bool) -> str:
    return (POSITIVE_TEMPLATE if relevant else NEGATIVE_TEMPLATE).format(question=query)


def assemble(analyses: list[str], positives: list[int]) -> str:
    """The response as gpt4o_cot.py builds it: per-image analyses in page order, then the relevant ids ascending
    and the others ascending (its `answer.sort()` over (not positive, id))."""
    n = len(analyses)
    think = "<think>\n" + "\n".join(f"Image {i}: {a}" for i, a in enumerate(analyses, 1)) + "\n</think>"
    order = sorted(range(1, n + 1), key=lambda i: (i not in positives, i))
    return think + "<answer>[" + ", ".join(map(str, order)) + "]</answer>"


def refine_question(query: str, response: str, positives: list[int]) -> str:
    """gpt4o_refine.py's question about a gpt4o_cot.py response, its slicing and `positive_image` string kept
    (e.g. "image2, 4"): the analyses without the `<think>`/`</think>` tags."""
    think = response[: response.find("<answer>")][7:-8].strip()
    return REFINE_TEMPLATE.format(question=query, positive_image="image" + ", ".join(map(str, positives)),
                                  think=think)


def refined(response: str, summary: str) -> str:
    return "<think>" + summary + "</think>" + response[response.find("<answer>"):].strip()


def judge(reply: Reply, label: bool | None, max_words: int) -> str | None:
    """What is wrong with an answer (None: it passes the quality guards)."""
    if reply.error:
        return f"teacher request failed: {reply.error}"
    text = reply.text.strip()
    if not text:
        return "empty answer"
    if reply.refused or REFUSAL.match(text):
        return "the teacher refused"
    if not reply.finished:
        return "cut off at the token budget"
    if label is not None and len(text.split()) > max_words:
        return f"over {max_words} words (the brief: 40)"
    if label and DENIAL.search(text):
        return "a relevant page described as unable to help"
    return None


def shuffled(sample: Sample, seed: int) -> Sample:
    """The sample's pages in a shuffled order (as the release shuffles), the same on every run for this seed and id."""
    order = list(range(len(sample.images)))
    random.Random(f"{seed}:{sample.id}").shuffle(order)
    return replace(sample, images=[sample.images[i] for i in order],
                   positives=sorted(order.index(p - 1) + 1 for p in sample.positives))


# ---------------------------------------------------------------- teachers

class Tokens:
    """Teacher tokens used, summed over threads."""

    def __init__(self):
        self.prompt = self.completion = 0
        self.lock = threading.Lock()

    def add(self, prompt: int, completion: int):
        with self.lock:
            self.prompt, self.completion = self.prompt + prompt, self.completion + completion


class LocalTeacher:
    """A Qwen2-VL / Qwen2.5-VL checkpoint folder, through mmr5's model and sampler, `batch_size` prompts at a time."""

    def __init__(self, path, device=None, dtype=None, batch_size=8, max_new_tokens=256, temperature=0.7, seed=0,
                 min_pixels=None, max_pixels=None):
        device, dtype = default_device_dtype(device, dtype)
        self.model = Qwen2VL.from_pretrained(path, dtype=dtype, device=device)
        self.processor = Processor.from_pretrained(path, min_pixels=min_pixels, max_pixels=max_pixels)
        check_pair(self.model, self.processor)
        self.batch_size, self.max_new_tokens, self.temperature = batch_size, max_new_tokens, temperature
        self.generator = torch.Generator(self.model.device).manual_seed(seed)
        self.tokens, self.stop = Tokens(), threading.Event()

    def ask_many(self, prompts: list[Prompt]) -> list[Reply]:
        replies = []
        for s in range(0, len(prompts), self.batch_size):
            chunk = prompts[s:s + self.batch_size]
            conversations = [[{"role": "user", "content": [{"type": "image"}] * (p.image is not None)
                               + [{"type": "text", "text": p.text}]}] for p in chunk]
            batch = self.processor.chat_inputs(conversations, [[p.image] if p.image else [] for p in chunk])
            rollout = generate(self.model, self.processor, batch, self.max_new_tokens, self.temperature,
                               generator=self.generator)
            self.tokens.add(int(batch["attention_mask"].sum()), int(rollout.mask.sum()))
            replies += [Reply(text, bool(done)) for text, done in zip(rollout.texts, rollout.finished.tolist())]
        return replies


def data_url(path: str) -> str:
    """A page as a base64 data URL; formats chat APIs may not take (TIFF, BMP, ...) are sent as PNG."""
    with Image.open(path) as image:
        mime = API_FORMATS.get(image.format)
        if mime is None:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, "PNG")
            return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def retry_after(headers) -> float | None:
    """Seconds a 429/503 asks to wait: Retry-After as seconds or an HTTP date."""
    value = headers.get("Retry-After") if headers else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None


class HTTPTeacher:
    """Any OpenAI-compatible chat-completions endpoint, through the standard library. Each request is tried up to
    `tries` times, waiting retry_delay * 2^attempt (or what Retry-After says) after a 429, a 5xx, a timeout, a
    connection error or a body that is not the expected JSON."""

    def __init__(self, url, model, key=None, max_new_tokens=256, temperature=None, timeout=120.0, tries=5,
                 retry_delay=1.0, key_name="OPENAI_API_KEY"):
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.key, self.key_name = model, key, key_name
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.timeout, self.tries, self.retry_delay = timeout, tries, retry_delay
        self.tokens, self.stop = Tokens(), threading.Event()

    def ask_many(self, prompts: list[Prompt]) -> list[Reply]:
        """One sample's questions in turn (--workers samples run side by side); after a request that failed all
        its tries the rest are not sent, as the sample is lost anyway."""
        replies = []
        for prompt in prompts:
            replies.append(replies[-1] if replies and replies[-1].error else self.ask(prompt))
        return replies

    def ask(self, prompt: Prompt) -> Reply:
        content = [{"type": "image_url", "image_url": {"url": data_url(prompt.image)}}] if prompt.image else []
        body = {"model": self.model, "max_tokens": self.max_new_tokens,
                "messages": [{"role": "user", "content": content + [{"type": "text", "text": prompt.text}]}]}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        answer = self.post(json.dumps(body).encode())
        if isinstance(answer, str):
            return Reply(None, error=answer)
        message, finish = answer["choices"][0]["message"], answer["choices"][0].get("finish_reason")
        usage = answer.get("usage") or {}
        self.tokens.add(usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)
        refusal = message.get("refusal")
        return Reply(message.get("content") or refusal or "", finish != "length", bool(refusal))

    def post(self, data: bytes) -> dict | str:
        """The endpoint's answer, or why this request failed after its tries; raises TeacherError when the
        endpoint itself is unusable."""
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        unreachable = 0
        for attempt in range(self.tries):
            if self.stop.is_set():
                return "stopped"
            wait = None
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                answer = expected_json(raw)
                if answer is not None:
                    return answer
                why = f"the answer is not chat-completions JSON ({self.hide(raw[:80].decode(errors='replace'))!r})"
            except urllib.error.HTTPError as e:
                why = f"HTTP {e.code} {self.hide(error_message(e))}"
                if e.code in (401, 403):
                    raise TeacherError(f"{self.url} refused the key ({why}): check ${self.key_name}") from None
                if e.code == 404:
                    raise TeacherError(f"{self.url}: {why}; check the URL (it ends in /v1 for most servers) "
                                       f"and --teacher-model {self.model!r}") from None
                if e.code not in (408, 409, 429) and e.code < 500:
                    return why  # this request is wrong (an image too large, ...), not the endpoint
                wait = retry_after(e.headers)
            except (TimeoutError, urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                timed_out = isinstance(reason, TimeoutError)
                unreachable += not timed_out and isinstance(e, urllib.error.URLError)
                why = f"no answer in {self.timeout:g} s" if timed_out else f"connection failed ({reason})"
            if attempt + 1 < self.tries:
                backoff = self.retry_delay * 2 ** attempt * (0.5 + random.random())
                self.stop.wait(min(600.0, wait if wait is not None else backoff))
        if unreachable == self.tries:
            raise TeacherError(f"cannot reach {self.url}: {why}")
        return f"{why}, {self.tries} tries"

    def hide(self, text: str) -> str:
        """A server's words with the key blotted out, in case it echoes it."""
        return text.replace(self.key, "***") if self.key else text


def expected_json(raw: bytes) -> dict | None:
    """The parsed body if it is a chat completion with a message, else None."""
    try:
        answer = json.loads(raw)
        message = answer["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    ok = isinstance(message, dict) and isinstance(message.get("content") or "", str)
    return answer if ok and isinstance(message.get("refusal") or "", str) else None


def error_message(e: urllib.error.HTTPError) -> str:
    """The server's one-line reason for an HTTP error (OpenAI's {"error": {"message": ...}} or the raw text)."""
    try:
        body = e.read().decode(errors="replace")
    except OSError:
        body = ""
    try:
        body = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    return " ".join(str(body or e.reason).split())[:200]


# ---------------------------------------------------------------- chains

def ask_checked(teacher, prompts: list[Prompt], max_words: int) -> list[tuple[str | None, str | None]]:
    """Every prompt's answer, asked once more where the first fails a guard -> (text, None) or (None, why)."""
    replies = teacher.ask_many(prompts)
    verdicts = [judge(r, p.label, max_words) for r, p in zip(replies, prompts)]
    again = [i for i, (r, why) in enumerate(zip(replies, verdicts)) if why and not r.error]
    for i, reply in zip(again, teacher.ask_many([prompts[i] for i in again])):
        replies[i], verdicts[i] = reply, judge(reply, prompts[i].label, max_words)
    return [(None, why) if why else (r.text.strip(), None) for r, why in zip(replies, verdicts)]


def make_chains(samples: list[Sample], teacher, refine: bool, max_words: int) -> list[tuple[Sample, str | None]]:
    """Chains for a few samples, their pages asked together (a local teacher batches them) -> per sample
    (the sample with its response, None) or (the sample, why it was dropped)."""
    prompts = [Prompt(page_question(s.query, i in s.positives), image, i in s.positives)
               for s in samples for i, image in enumerate(s.images, 1)]
    answers = iter(ask_checked(teacher, prompts, max_words))
    results = []
    for s in samples:
        mine = [next(answers) for _ in s.images]
        bad = [f"page {i}: {why}" for i, (_, why) in enumerate(mine, 1) if why]
        results.append((s, bad[0]) if bad else (replace(s, response=assemble([t for t, _ in mine], s.positives)), None))
    if refine:
        ok = [k for k, (_, why) in enumerate(results) if why is None]
        chained = [results[k][0] for k in ok]
        questions = [Prompt(refine_question(s.query, s.response, s.positives)) for s in chained]
        for k, s, (summary, why) in zip(ok, chained, ask_checked(teacher, questions, max_words)):
            results[k] = (replace(s, response=refined(s.response, summary)), None) if why is None else (s, f"refine: {why}")
    return results


def read_done(out: Path) -> set[str]:
    """Ids of the samples already in --out; a last line cut short by a kill is removed first."""
    if not out.exists():
        return set()
    raw = out.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        os.truncate(out, end)
        print(f"{out}: removed an incomplete last line (a run was stopped while writing it)", file=sys.stderr)
    ids = set()
    for n, line in enumerate(raw[:end].split(b"\n")[:-1], 1):
        if line.strip():
            try:
                ids.add(json.loads(line)["id"])
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{out}:{n}: not a line mmr5.chains wrote; give another --out") from None
    return ids


def append_line(fd: int, sample: Sample, folder: str):
    """One complete line in one write call (O_APPEND): a kill leaves the line whole or absent."""
    data = (json.dumps(sample_record(sample, folder), ensure_ascii=False) + "\n").encode()
    while data:  # a regular file takes it whole; a short write (disk nearly full) is continued
        data = data[os.write(fd, data):]


def run(samples: list[Sample], teacher, out: Path, chunk: int, workers: int, refine: bool,
        max_words: int) -> tuple[int, Counter]:
    """Make chains for `samples`, `chunk` per task on `workers` threads, appending each finished one to `out`
    -> (samples written, Counter of why the others were dropped)."""
    folder = os.path.abspath(out.parent)
    done, skipped = 0, Counter()
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pool = ThreadPoolExecutor(workers)
    try:
        futures = [pool.submit(make_chains, samples[i:i + chunk], teacher, refine, max_words)
                   for i in range(0, len(samples), chunk)]
        with tqdm(total=len(samples), desc="chains", unit="sample", dynamic_ncols=True) as bar:
            for future in as_completed(futures):
                for sample, why in future.result():
                    if why is None:
                        append_line(fd, sample, folder)
                        done += 1
                    else:
                        skipped[why.split(": ", 1)[1]] += 1
                        tqdm.write(f"skipped {sample.id}: {why}", file=sys.stderr)
                    bar.update(1)
    finally:
        teacher.stop.set()  # a fatal error or Ctrl-C: requests in other threads stop retrying
        pool.shutdown(wait=True, cancel_futures=True)
        os.close(fd)
    return done, skipped


# ---------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mmr5.chains", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", help="samples in mmr5 JSONL (query, images, positives; a `response` is replaced)")
    d.add_argument("--mmdocir-annotations", help="MMDocIR_annotations.jsonl (instead of --data)")
    d.add_argument("--mmdocir-pages", help="folder of exported MMDocIR page images: DIR/<doc_name>/<page>.jpg")
    d.add_argument("--mmdocir-retrieval", help="retriever ranking JSONL: doc_name, question_index, ranked_pages")
    d.add_argument("--top-k", type=int, default=5, help="candidates per MMDocIR question (MM-R5: 5)")
    d.add_argument("--out", required=True, help="output JSONL (appended to; the same command resumes)")
    d.add_argument("--limit", type=int, default=0, help="the first N samples only, for a trial (0 = all)")
    d.add_argument("--shuffle", action="store_true", help="shuffle each sample's pages, as the release does "
                   "(default: the retriever's order)")
    d.add_argument("--seed", type=int, default=0, help="seed of --shuffle and of a local teacher's sampling")
    t = p.add_argument_group("teacher")
    t.add_argument("--teacher", required=True, help="a Qwen2-VL / Qwen2.5-VL checkpoint folder, or the base URL of "
                   "a chat-completions API (http://localhost:8000/v1, https://api.openai.com/v1)")
    t.add_argument("--teacher-model", help="model name the API serves (required with a URL)")
    t.add_argument("--refine", action="store_true", help="also ask for gpt4o_refine.py's two-sentence summary, "
                   "which becomes the think (one more call per sample)")
    t.add_argument("--max-new-tokens", type=int, default=256, help="answer budget per call; an answer cut off "
                   "here is rejected")
    t.add_argument("--temperature", type=float, help="default: the API's own (the release sent none); 0.7 for "
                   "a checkpoint (at 0 a re-ask repeats the answer)")
    t.add_argument("--max-words", type=int, default=60, help="reject page analyses longer than this (brief: 40)")
    h = p.add_argument_group("API teacher")
    h.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key "
                   "(unset default: no key is sent, as a local server wants)")
    h.add_argument("--workers", type=int, default=8, help="samples in flight at once")
    h.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one answer")
    h.add_argument("--tries", type=int, default=5, help="tries per request (429, 5xx, timeouts, bad bodies)")
    h.add_argument("--retry-delay", type=float, default=1.0, help="first wait before a retry, doubled each time "
                   "(a 429's Retry-After wins)")
    c = p.add_argument_group("checkpoint teacher")
    c.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    c.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    c.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA, float32 on CPU")
    c.add_argument("--min-pixels", type=int, help="override the checkpoint's preprocessor min_pixels")
    c.add_argument("--max-pixels", type=int, help="override the checkpoint's preprocessor max_pixels")
    args = p.parse_args(argv)
    mmdocir = [args.mmdocir_annotations, args.mmdocir_pages, args.mmdocir_retrieval]
    if any(mmdocir) and not all(mmdocir):
        p.error("MMDocIR needs all of --mmdocir-annotations, --mmdocir-pages and --mmdocir-retrieval")
    if bool(args.data) == any(mmdocir):
        p.error("give --data FILE.jsonl or the three --mmdocir-* inputs")
    for name in ("top_k", "max_new_tokens", "max_words", "workers", "tries", "batch_size", "timeout"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.limit < 0 or args.retry_delay < 0 or (args.temperature or 0) < 0:
        p.error("--limit, --retry-delay and --temperature must be >= 0")
    args.url = re.match(r"https?://", args.teacher) is not None
    if args.url and not args.teacher_model:
        p.error("a URL --teacher needs --teacher-model (the model name the API serves)")
    return args


def load_samples(args) -> list[Sample]:
    """The samples to make chains for, checked; each needs a relevant page to explain."""
    if args.data:
        samples = read_samples(args.data)
        missing = [s.id for s in samples if not s.positives]
        if missing:
            names = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise DataError(f"{args.data}: {len(missing)} of {len(samples)} samples have no positives ({names}); "
                            "a chain explains the relevant pages: list them, or leave these samples out")
    else:
        samples = read_mmdocir(args.mmdocir_annotations, args.mmdocir_pages, args.mmdocir_retrieval, args.top_k)
        kept = [s for s in samples if s.positives]
        if len(kept) < len(samples):  # as the release kept only questions with a positive in the top 5
            print(f"{len(samples) - len(kept)} of {len(samples)} MMDocIR questions have no evidence page in the "
                  f"retriever's top {args.top_k}: left out")
        samples = kept
    samples = samples[: args.limit] if args.limit else samples
    return [shuffled(s, args.seed) for s in samples] if args.shuffle else samples


def make_teacher(args):
    if args.url:
        key = os.environ.get(args.api_key_env)
        if not key and args.api_key_env != "OPENAI_API_KEY":
            raise ValueError(f"${args.api_key_env} is not set (--api-key-env names the variable holding the key)")
        return HTTPTeacher(args.teacher, args.teacher_model, key, args.max_new_tokens, args.temperature,
                           args.timeout, args.tries, args.retry_delay, args.api_key_env)
    if not os.path.isdir(args.teacher):
        raise ValueError(f"--teacher {args.teacher}: no such folder, and not an http(s):// URL")
    try:
        return LocalTeacher(args.teacher, args.device, getattr(torch, args.dtype) if args.dtype else None,
                            args.batch_size, args.max_new_tokens,
                            0.7 if args.temperature is None else args.temperature, args.seed,
                            args.min_pixels, args.max_pixels)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--teacher {args.teacher} is not a Qwen2-VL / Qwen2.5-VL checkpoint folder: {e}") from None


def main(argv=None):
    args = parse_args(argv)
    started, out = time.time(), Path(args.out)
    if args.data and out.resolve() == Path(args.data).resolve():
        sys.exit("error: --out is the --data file; give another path (it is appended to)")
    try:
        samples = load_samples(args)
        already = read_done(out)
        teacher = make_teacher(args)
    except (DataError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    todo = [s for s in samples if s.id not in already]
    where = teacher.url if args.url else f"{args.teacher} ({teacher.model.device})"
    print(f"{len(todo)} samples to do ({len(samples) - len(todo)} already in {out}), teacher {where}, "
          f"{sum(len(s.images) for s in todo) + args.refine * len(todo)} teacher calls at least")
    try:
        done, skipped = run(todo, teacher, out, 1 if args.url else args.batch_size, args.workers if args.url else 1,
                            args.refine, args.max_words)
    except TeacherError as e:
        sys.exit(f"error: {e}")
    reasons = "; ".join(f"{n} {why}" for why, n in skipped.most_common())
    print(f"done {done} (now {len(already) + done} in {out}), skipped {sum(skipped.values())}"
          + (f": {reasons} (rerun the same command to ask again)" if skipped else ""))
    minutes, seconds = divmod(time.time() - started, 60)
    print(f"teacher tokens: {teacher.tokens.prompt} prompt + {teacher.tokens.completion} completion; "
          f"time {int(minutes)} min {seconds:.0f} s")


if __name__ == "__main__":
    main()
