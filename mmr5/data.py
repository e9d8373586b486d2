"""Rerank samples from user files: JSON Lines in, validated `Sample`s out (and back), plus a reader for MMDocIR.

Pipeline: [data] -> processor -> model -> sampler -> rewards -> ppo. Training and evaluation start here; the processor
turns a Sample's query and images into model inputs, and `positives` feed the rewards and the recall metrics. Every
file is checked whole before anything uses it, so a bad line costs seconds, not a crashed run: the first problem is
raised as a `DataError` with the message `{file}:{line}: {what is wrong}`.

One line per sample (blank lines are skipped):

    {"query": "What was the 2019 revenue?", "images": ["pages/a_3.png", "pages/a_7.png", "/abs/b_1.png"],
     "positives": [2], "domain": "finance", "response": "<think>...</think><answer>[2, 1, 3]</answer>",
     "num_relevant": 2, "id": "q17"}

- query: non-empty string. images: the candidates in the retriever's order, at least one, no path twice; relative
  paths are relative to the JSONL file's folder. positives: the 1-based ids of the relevant candidates, no repeats.
- domain (default "default"): the group for macro-averaged recall. response (optional): the SFT target.
- num_relevant (default len(positives)): how many relevant images the query has in all, counting those the
  retriever did not put among the candidates. Recall@k divides by it (MMDocIR: |top-k ∩ gt| / |gt|), so a query
  whose evidence was missed keeps its place in the average with a score of 0 instead of silently vanishing.
  It must be >= 1 and >= len(positives): every sample has a defined recall. So `positives` may be empty only with
  an explicit num_relevant; such samples are right for evaluation and carry no rerank signal for training.
- id (default "{file name}:{line}"): unique within a file; names the sample in evaluation output.
Unknown fields are errors, so a typo ("postives") cannot turn into a silent default.
"""
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

# Qwen-VL's image processor refuses pages whose long side is over 200 times the short one (smart_resize).
MAX_ASPECT_RATIO = 200
FIELDS = ("id", "query", "images", "positives", "num_relevant", "domain", "response")


class DataError(ValueError):
    """A bad input file; the message is one line, `{file}:{line}: {what is wrong}`."""


@dataclass
class Sample:
    """One query with its candidate images (absolute paths, retriever order) and the 1-based ids of the relevant
    ones. num_relevant=None means len(positives)."""
    query: str
    images: list[str]
    positives: list[int]
    domain: str = "default"
    response: str | None = None
    num_relevant: int | None = None
    id: str = ""

    def __post_init__(self):
        if self.num_relevant is None:
            self.num_relevant = len(self.positives)


def _kind(value) -> str:
    """A JSON value's type in JSON's words, for error messages."""
    if isinstance(value, bool):
        return "true/false"
    names = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}
    return names.get(type(value), "null")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # json gives true/false as bool, a subclass of int


def _records(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file."""
    if path.is_dir():
        raise DataError(f"{path} is a folder; give the JSON Lines file in it")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the data file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text") from None
    records = []
    # Split on "\n" only: JSON strings may hold U+2028 and friends, which str.splitlines would cut at.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            if n == 1 and line.strip() in ("[", "{"):  # a pretty-printed .json export, not JSON Lines
                raise DataError(f"{path}:1: invalid JSON Lines: one whole JSON object per line, not a JSON document "
                                "spread over lines") from None
            raise DataError(f"{path}:{n}: invalid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {_kind(obj)}")
        records.append((n, obj))
    if not records:
        raise DataError(f"{path}:1: empty file, no samples")
    return records


def _image_problem(path: str) -> str | None:
    """Why an image file cannot be used, or None. Opening reads the header; verify() checks what the format allows
    without decoding the pixels (PNG: every chunk's CRC). A JPEG's verify() checks nothing, so one that does not end
    with its end-of-image marker (an interrupted copy or export) is decoded whole to find out."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            jpeg = image.format == "JPEG"
            image.verify()
        if jpeg and not _ends_like_jpeg(path):
            with Image.open(path) as image:
                image.load()
    except FileNotFoundError:
        return f"image file not found: {path}"
    except Image.DecompressionBombError as e:
        return f"image {path} is too large to decode safely ({e.args[0].split(',')[0]}): re-export it smaller"
    except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, ...); all mean unusable
        return f"cannot read image {path} ({e}): re-export or copy it again"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return (f"image {path} is {width}x{height}, aspect ratio {max(width, height) / min(width, height):.0f}; "
                f"Qwen-VL takes at most {MAX_ASPECT_RATIO}: crop or split it into pages")
    return None


def _ends_like_jpeg(path: str) -> bool:
    """True if the file ends with JPEG's end-of-image marker (FF D9), allowing trailing padding."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 64))
        return f.read().rstrip(b"\0\r\n ").endswith(b"\xff\xd9")


def _check_images(paths: list[str], checked: dict[str, str | None]):
    for path in paths:
        if path not in checked:
            checked[path] = _image_problem(path)
        if checked[path]:
            raise DataError(checked[path])


def _sample(obj: dict, folder: Path, default_id: str, require_response: bool, max_candidates: int | None) -> Sample:
    """Validate one line of the sample format; raises DataError without the file:line prefix."""
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise DataError(f"unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    for key in ("query", "images", "positives"):
        if key not in obj:
            raise DataError(f"missing field {key!r}")
    query, images, positives = obj["query"], obj["images"], obj["positives"]
    if not isinstance(query, str) or not query.strip():
        raise DataError(f"query must be a non-empty string, got {_kind(query)}")
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise DataError("images must be an array of file paths (non-empty strings)")
    if not images:
        raise DataError("images is empty: a sample needs at least one candidate")
    if max_candidates is not None and len(images) > max_candidates:
        raise DataError(f"{len(images)} images, more than max_candidates={max_candidates}")
    paths = [os.path.abspath(folder / p) for p in images]  # an absolute p replaces folder
    if len(set(paths)) < len(paths):
        twice = next(p for p in paths if paths.count(p) > 1)
        raise DataError(f"image {twice} is listed twice")
    if not isinstance(positives, list) or not all(_is_int(p) for p in positives):
        raise DataError("positives must be an array of integers (1-based image ids)")
    for p in positives:
        if not 1 <= p <= len(images):
            raise DataError(f"positive id {p} is outside 1..{len(images)} (ids are 1-based)")
    if len(set(positives)) < len(positives):
        raise DataError(f"positives {positives} repeat an id")
    num_relevant = obj.get("num_relevant", len(positives))
    if not _is_int(num_relevant):
        raise DataError(f"num_relevant must be an integer, got {_kind(num_relevant)}")
    if num_relevant < max(1, len(positives)):
        if not positives:
            raise DataError("no positives: list at least one, or give num_relevant >= 1 if the relevant images "
                            "are not among the candidates")
        raise DataError(f"num_relevant {num_relevant} is less than the {len(positives)} positives")
    domain = obj.get("domain", "default")
    if not isinstance(domain, str) or not domain:
        raise DataError(f"domain must be a non-empty string, got {_kind(domain)}")
    response = obj.get("response")
    if response is not None and not isinstance(response, str):
        raise DataError(f"response must be a string, got {_kind(response)}")
    if require_response and not (response or "").strip():
        raise DataError("no response: this use (SFT) needs the target completion")
    sample_id = obj.get("id", default_id)
    if not isinstance(sample_id, str) or not sample_id:
        raise DataError(f"id must be a non-empty string, got {_kind(sample_id)}")
    return Sample(query, paths, positives, domain, response, num_relevant, sample_id)


def read_samples(path, require_response: bool = False, check_images: bool = True,
                 max_candidates: int | None = None) -> list[Sample]:
    """Read and check a whole sample file (format in the module docstring). check_images opens every image once
    (header and checksums, no decoding); max_candidates bounds the images per sample (None: no bound).
    Raises DataError `{file}:{line}: ...` on the first problem; OSError if the file itself cannot be read."""
    path = Path(path)
    folder = path.absolute().parent
    samples, first_line, checked = [], {}, {}
    for n, obj in _records(path):
        try:
            sample = _sample(obj, folder, f"{path.name}:{n}", require_response, max_candidates)
            if sample.id in first_line:
                raise DataError(f"id {sample.id!r} already used on line {first_line[sample.id]}")
            first_line[sample.id] = n
            if check_images:
                _check_images(sample.images, checked)
        except DataError as e:
            raise DataError(f"{path}:{n}: {e}") from None
        samples.append(sample)
    return samples


def sample_order(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the samples for optimizer step `step`: epochs are seeded shuffles, read in order, so a resumed
    run (which knows only `step`) sees exactly the batches the uninterrupted run would have."""
    start = step * batch_size
    indices = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        indices += order[offset: offset + batch_size - len(indices)]
    return indices


def _relative(image: str, folder: str) -> str:
    """The path as written to a file in `folder`: relative if the image lies inside it, else absolute."""
    image = os.path.abspath(image)
    rel = os.path.relpath(image, folder)
    return image if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def sample_record(s: Sample, folder) -> dict:
    """One sample as a line of a file in `folder` holds it (image paths relative to that folder when inside it)."""
    record = {"id": s.id, "query": s.query, "images": [_relative(p, folder) for p in s.images],
              "positives": s.positives, "num_relevant": s.num_relevant, "domain": s.domain, "response": s.response}
    if not s.id:  # read_samples gives it the default id
        del record["id"]
    if s.response is None:
        del record["response"]
    return record


def write_samples(samples: list[Sample], path) -> None:
    """Write samples in the format read_samples reads, atomically: a temporary file in the same folder, then
    os.replace, so a crash never leaves half a file under the real name."""
    if not samples:
        raise ValueError("no samples to write (read_samples rejects an empty file)")
    path = Path(path)
    folder = os.path.abspath(path.parent)
    lines = [json.dumps(sample_record(s, folder), ensure_ascii=False) + "\n" for s in samples]
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _mmdocir_doc(obj: dict) -> tuple[str, str, int, list[tuple[str, list[int]]]]:
    """One document line of MMDocIR_annotations.jsonl -> (doc_name, domain, page count, [(question, gt pages)])."""
    name, domain, rows, questions = (obj.get(k) for k in ("doc_name", "domain", "page_indices", "questions"))
    if not isinstance(name, str) or not name or os.sep in name or name in (".", ".."):
        raise DataError(f"doc_name must be a file name, got {name!r}")
    if not isinstance(domain, str) or not domain:
        raise DataError(f"domain must be a non-empty string, got {_kind(domain)}")
    if not (isinstance(rows, list) and len(rows) == 2 and all(_is_int(r) for r in rows) and 0 <= rows[0] <= rows[1]):
        raise DataError(f"page_indices must be [first row, last row], got {rows!r}")
    num_pages = rows[1] - rows[0] + 1
    if not isinstance(questions, list):
        raise DataError(f"questions must be an array, got {_kind(questions)}")
    parsed = []
    for i, qa in enumerate(questions):
        q, gt = (qa.get("Q"), qa.get("page_id")) if isinstance(qa, dict) else (None, None)
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"question {i}: Q must be a non-empty string")
        if not (isinstance(gt, list) and gt and all(_is_int(p) and 0 <= p < num_pages for p in gt)):
            raise DataError(f"question {i}: page_id must be a non-empty array of page ids in 0..{num_pages - 1}")
        parsed.append((q, gt))
    return name, domain, num_pages, parsed


def _mmdocir_ranking(obj: dict, docs: dict, ranked: dict, top_k: int, annotations: str) -> tuple[str, int, list]:
    """One retrieval line checked against the annotations -> (doc_name, question index, ranked pages)."""
    unknown = sorted(set(obj) - {"doc_name", "question_index", "ranked_pages", "question"})
    if unknown:
        raise DataError(f"unknown field {unknown[0]!r} (fields: doc_name, question_index, ranked_pages, question)")
    name, i, pages = obj.get("doc_name"), obj.get("question_index"), obj.get("ranked_pages")
    if name not in docs:
        raise DataError(f"doc_name {name!r} is not in {annotations}")
    _, _, num_pages, questions = docs[name]
    if not _is_int(i) or not 0 <= i < len(questions):
        raise DataError(f"question_index must be an integer in 0..{len(questions) - 1}, got {i!r}")
    if "question" in obj and obj["question"] != questions[i][0]:
        raise DataError(f"question does not match question {i} of {name!r}: {questions[i][0]!r}")
    if (name, i) in ranked:
        raise DataError(f"question {i} of {name!r} already on line {ranked[name, i][0]}")
    if not (isinstance(pages, list) and all(_is_int(p) and 0 <= p < num_pages for p in pages)):
        raise DataError(f"ranked_pages must be an array of page ids in 0..{num_pages - 1}")
    if len(set(pages)) < len(pages):
        raise DataError("ranked_pages repeats a page")
    if len(pages) < min(top_k, num_pages):
        raise DataError(f"ranked_pages has {len(pages)} pages, fewer than top_k={top_k}")
    return name, i, pages


def read_mmdocir(annotations_jsonl, pages_dir, retrieval_jsonl, top_k: int = 5,
                 check_images: bool = True) -> list[Sample]:
    """MMDocIR's evaluation set as Samples: each question with its retriever's top_k pages, in annotation order.

    annotations_jsonl: MMDocIR's `dataset/MMDocIR_annotations.jsonl`, one document per line: `doc_name`, `domain`,
    `page_indices` ([first, last] row of the document in MMDocIR_pages.parquet) and `questions`, each with `Q` and
    `page_id`, the evidence pages as 0-based page numbers within the document (page p is parquet row first + p;
    MMDocIR's own metric_eval.py compares page_id with positions in the document's page list).

    pages_dir: the page screenshots as `{pages_dir}/{doc_name}/{page}.jpg` (doc_name as in the annotations, ".pdf"
    included). MMDocIR ships them as JPEG bytes in MMDocIR_pages.parquet, one row per page, each document's rows
    together and in page order; export them with pyarrow (not a dependency of mmr5):

        import os, pyarrow.parquet as pq
        seen = {}  # pages written so far per document
        for batch in pq.ParquetFile("MMDocIR_pages.parquet").iter_batches(64, columns=["doc_name", "image_binary"]):
            for doc, jpeg in zip(batch.column("doc_name").to_pylist(), batch.column("image_binary").to_pylist()):
                page = seen[doc] = seen.get(doc, -1) + 1
                os.makedirs(f"pages/{doc}", exist_ok=True)
                with open(f"pages/{doc}/{page}.jpg", "wb") as f:
                    f.write(jpeg)

    retrieval_jsonl: the first-stage retriever's output, one line per question:
    `{"doc_name": str, "question_index": i, "ranked_pages": [page, ...]}` -- i the 0-based position in the
    document's `questions`, pages 0-based within the document, best first, at least min(top_k, pages in the
    document) of them. An optional `"question": Q` is checked against the annotation (catches misaligned indices).
    From MMDocIR's search.py, whose page scores `s` for a question are in `scores_page`, the ranking its metric
    uses (ties in page order) is `sorted(range(len(s)), key=s.__getitem__, reverse=True)`.

    Every annotated question must have exactly one retrieval line, so micro and macro recall run over the whole
    set as MMDocIR computes them. A Sample's positives are the evidence pages among its candidates, possibly none;
    num_relevant is the number of evidence pages in all (recall's denominator); id is "{doc_name}#{i}".
    """
    if not _is_int(top_k) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    annotations_jsonl, retrieval_jsonl = Path(annotations_jsonl), Path(retrieval_jsonl)
    if not Path(pages_dir).is_dir():
        raise DataError(f"{pages_dir}: no such folder of page images; export them first (mmr5/data.py, read_mmdocir)")
    docs = {}  # doc_name -> (line, domain, num_pages, questions)
    for n, obj in _records(annotations_jsonl):
        try:
            name, domain, num_pages, questions = _mmdocir_doc(obj)
            if name in docs:
                raise DataError(f"document {name!r} already on line {docs[name][0]}")
        except DataError as e:
            raise DataError(f"{annotations_jsonl}:{n}: {e}") from None
        docs[name] = (n, domain, num_pages, questions)

    ranked = {}  # (doc_name, question index) -> (line, ranked pages)
    for n, obj in _records(retrieval_jsonl):
        try:
            name, i, pages = _mmdocir_ranking(obj, docs, ranked, top_k, annotations_jsonl.name)
        except DataError as e:
            raise DataError(f"{retrieval_jsonl}:{n}: {e}") from None
        ranked[name, i] = (n, pages)

    pages_dir = Path(pages_dir).absolute()
    samples, checked = [], {}
    for name, (line, domain, _, questions) in docs.items():
        for i, (q, gt) in enumerate(questions):
            if (name, i) not in ranked:
                raise DataError(f"{annotations_jsonl}:{line}: question {i} of {name!r} has no line in "
                                f"{retrieval_jsonl.name}")
            n, pages = ranked[name, i]
            top = pages[:top_k]
            images = [str(pages_dir / name / f"{p}.jpg") for p in top]
            if check_images:
                try:
                    _check_images(images, checked)
                except DataError as e:
                    raise DataError(f"{retrieval_jsonl}:{n}: {e}") from None
            positives = [k + 1 for k, p in enumerate(top) if p in gt]
            samples.append(Sample(q, images, positives, domain, None, len(set(gt)), f"{name}#{i}"))
    return samples
