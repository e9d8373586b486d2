"""Data: the JSONL sample format (round trip, one clear file:line error per kind of bad input) and MMDocIR."""
import json
import os

import pytest
from PIL import Image

from mmr5.data import DataError, Sample, read_mmdocir, read_samples, sample_order, write_samples


def png(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), color).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        png(tmp_path / "pages" / name)
    return tmp_path


def line(**fields):
    record = {"query": "q?", "images": ["pages/a.png", "pages/b.png", "pages/c.png"], "positives": [2]}
    record.update(fields)
    return json.dumps({k: v for k, v in record.items() if v is not DROP})


DROP = object()


def write_lines(path, *lines):
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------- valid files

def test_read_fields_and_defaults(folder):
    outside = png(folder.parent / (folder.name + "_elsewhere") / "d.png")
    path = write_lines(folder / "s.jsonl",
                       line(),
                       "",                                              # blank lines are skipped
                       line(images=["pages/a.png", str(outside)], positives=[1, 2], domain="news",
                            response="<think>t</think><answer>[1, 2]</answer>", num_relevant=3, id="q7"))
    first, second = read_samples(path)
    assert first == Sample("q?", [str(folder / "pages" / n) for n in ("a.png", "b.png", "c.png")], [2],
                           "default", None, 1, "s.jsonl:1")
    assert second.images == [str(folder / "pages/a.png"), str(outside)]
    assert (second.positives, second.domain, second.num_relevant, second.id) == ([1, 2], "news", 3, "q7")
    assert second.response.startswith("<think>")


def test_round_trip(folder):
    outside = png(folder.parent / (folder.name + "_elsewhere") / "d.png")
    samples = [
        Sample("Qué ingresos?\u2028", [str(folder / "pages/a.png"), str(outside)], [1], "finance",
               "<think>Image 1</think><answer>[1, 2]</answer>", 2, "x"),
        Sample("no positives here", [str(folder / "pages/c.png")], [], num_relevant=1),
    ]
    path = folder / "out" / "samples.jsonl"
    path.parent.mkdir()
    write_samples(samples, path)
    written = [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n")[:-1]]  # not splitlines: U+2028
    assert written[0]["images"] == [str(folder / "pages/a.png"), str(outside)]   # outside the folder: absolute
    assert "response" not in written[1] and "id" not in written[1]
    back = read_samples(path)
    samples[1].id = "samples.jsonl:2"
    assert back == samples
    assert os.listdir(path.parent) == ["samples.jsonl"]                  # the temporary file is gone

    inside = folder / "inside.jsonl"                                      # inside the folder: relative
    write_samples(back, inside)
    assert json.loads(inside.read_text(encoding="utf-8").split("\n")[1])["images"] == ["pages/c.png"]
    assert read_samples(inside) == back


def test_write_replaces_atomically(folder):
    path = folder / "s.jsonl"
    write_samples([Sample("q", [str(folder / "pages/a.png")], [1])], path)
    write_samples([Sample("other", [str(folder / "pages/b.png")], [1])], path)
    assert [s.query for s in read_samples(path)] == ["other"]
    with pytest.raises(ValueError, match="no samples"):
        write_samples([], path)


def test_check_images_off_and_max_candidates(folder):
    path = write_lines(folder / "s.jsonl", line(images=["missing.png", "pages/a.png"], positives=[1]))
    assert read_samples(path, check_images=False)[0].images[0] == str(folder / "missing.png")
    with pytest.raises(DataError, match=r"s\.jsonl:1: .*not found"):
        read_samples(path)
    ok = write_lines(folder / "t.jsonl", line())
    assert len(read_samples(ok, max_candidates=3)) == 1
    with pytest.raises(DataError, match=r"t\.jsonl:1: 3 images, more than max_candidates=2"):
        read_samples(ok, max_candidates=2)


# ---------------------------------------------------------------- bad input: one line, file:line

BAD = [  # (second line of the file, words the message must contain)
    ('{"query": "q?", "images": [', "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got an array"),
    ('"just a string"', "expected a JSON object, got a string"),
    ('{"query": "q", "images": ["pages/a.png"], "positives": [' + "1" * 5000 + "]}", "invalid JSON"),
    (line(positives=DROP), "missing field 'positives'"),
    (line(query=DROP), "missing field 'query'"),
    (line(images=DROP), "missing field 'images'"),
    (line(query=5), "query must be a non-empty string, got a number"),
    (line(query="  "), "query must be a non-empty string"),
    (line(images="pages/a.png"), "images must be an array"),
    (line(images=["pages/a.png", 3]), "images must be an array"),
    (line(images=["pages/a.png", ""]), "images must be an array"),
    (line(images=[], positives=[]), "images is empty"),
    (line(positives=2), "positives must be an array of integers"),
    (line(positives=["2"]), "positives must be an array of integers"),
    (line(positives=[True]), "positives must be an array of integers"),
    (line(positives=[2.0]), "positives must be an array of integers"),
    (line(positives=[0]), "positive id 0 is outside 1..3"),
    (line(positives=[4]), "positive id 4 is outside 1..3"),
    (line(positives=[2, 2]), "repeat an id"),
    (line(images=["pages/a.png", "pages/../pages/a.png"]), "is listed twice"),
    (line(positives=[]), "no positives"),
    (line(positives=[1, 2], num_relevant=1), "num_relevant 1 is less than the 2 positives"),
    (line(positives=[], num_relevant=0), "no positives"),
    (line(num_relevant=True), "num_relevant must be an integer, got true/false"),
    (line(num_relevant=2.0), "num_relevant must be an integer"),
    (line(domain=""), "domain must be a non-empty string"),
    (line(domain=None), "domain must be a non-empty string, got null"),
    (line(response=["x"]), "response must be a string"),
    (line(id=3), "id must be a non-empty string"),
    (line(id="first"), "id 'first' already used on line 1"),
    (line(postives=[1]), "unknown field 'postives'"),
    (line(images=["pages/a.png", "pages/nope.png"]), "image file not found"),
    (line(images=["pages/a.png", "pages/junk.png"]), "cannot read image"),
    (line(images=["pages/a.png", "pages/crc.png"]), "cannot read image"),
    (line(images=["pages/a.png", "pages"]), "cannot read image"),
]


@pytest.mark.parametrize("bad, words", BAD, ids=[w for _, w in BAD])
def test_bad_line(folder, bad, words):
    (folder / "pages" / "junk.png").write_bytes(b"not an image at all")
    data = bytearray(png(folder / "pages" / "crc.png", (1, 2, 3)).read_bytes())
    data[data.index(b"IDAT") + 6] ^= 0xFF                                # corrupt the pixel data: CRC fails
    (folder / "pages" / "crc.png").write_bytes(bytes(data))
    path = write_lines(folder / "bad.jsonl", line(id="first"), bad)
    with pytest.raises(DataError) as err:
        read_samples(path)
    message = str(err.value)
    assert message.startswith(f"{path}:2: ") and words in message and "\n" not in message


def test_require_response(folder):
    path = write_lines(folder / "s.jsonl", line(response="<think>a</think><answer>[2]</answer>"), line())
    assert len(read_samples(path)) == 2
    with pytest.raises(DataError, match=r"s\.jsonl:2: no response"):
        read_samples(path, require_response=True)


def test_empty_and_undecodable_files(folder):
    for content in (b"", b"\n  \n\n"):
        (folder / "e.jsonl").write_bytes(content)
        with pytest.raises(DataError, match=r"e\.jsonl:1: empty file"):
            read_samples(folder / "e.jsonl")
    (folder / "u.jsonl").write_bytes(line().encode() + b"\n\n" + b'{"query": "\xff"}\n')
    with pytest.raises(DataError, match=r"u\.jsonl:3: not UTF-8"):
        read_samples(folder / "u.jsonl")


def test_line_numbers_count_blank_lines_and_bom(folder):
    path = folder / "s.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (line() + "\n\n\r\n" + line(positives=[9]) + "\n").encode())
    with pytest.raises(DataError, match=r"s\.jsonl:4: positive id 9"):
        read_samples(path)


# ---------------------------------------------------------------- MMDocIR

DOCS = [  # (doc_name, domain, number of pages, [(question, evidence pages)])
    ("a.pdf", "Academic paper", 6, [("Which year?", [1]), ("What total?", [0, 4]), ("Who signed?", [5])]),
    ("b.pdf", "News", 3, [("Where?", [2])]),
]
RANKED = {("a.pdf", 0): [3, 1, 0, 2, 4, 5], ("a.pdf", 1): [0, 2, 3, 1, 5, 4], ("a.pdf", 2): [0, 1, 2, 3, 4, 5],
          ("b.pdf", 0): [2, 0, 1]}


@pytest.fixture
def mmdocir(tmp_path):
    """Annotations in MMDocIR's own layout (extra fields included), page JPEGs, and a retrieval file."""
    rows, annotations = 0, []
    for name, domain, pages, questions in DOCS:
        for page in range(pages):
            path = tmp_path / "pages" / name / f"{page}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 28), (page * 40, 0, 0)).save(path)
        annotations.append({"doc_name": name, "domain": domain, "page_indices": [rows, rows + pages - 1],
                            "layout_indices": [0, 0], "questions": [
                                {"Q": q, "A": "?", "type": "['Text']", "page_id": gt, "layout_mapping": []}
                                for q, gt in questions]})
        rows += pages
    write_lines(tmp_path / "MMDocIR_annotations.jsonl", *map(json.dumps, annotations))
    retrieval = [{"doc_name": d, "question_index": i, "ranked_pages": r} for (d, i), r in RANKED.items()]
    write_lines(tmp_path / "retrieval.jsonl", *map(json.dumps, reversed(retrieval)))   # any order
    return tmp_path


def read(root, top_k=5, **kw):
    return read_mmdocir(root / "MMDocIR_annotations.jsonl", root / "pages", root / "retrieval.jsonl", top_k, **kw)


def test_mmdocir_samples(mmdocir):
    samples = read(mmdocir)
    page = lambda d, p: str(mmdocir / "pages" / d / f"{p}.jpg")
    assert [s.id for s in samples] == ["a.pdf#0", "a.pdf#1", "a.pdf#2", "b.pdf#0"]     # annotation order
    a0, a1, a2, b0 = samples
    assert a0 == Sample("Which year?", [page("a.pdf", p) for p in (3, 1, 0, 2, 4)], [2], "Academic paper",
                        None, 1, "a.pdf#0")
    assert (a1.positives, a1.num_relevant) == ([1], 2)          # page 4 is evidence but ranked 6th
    assert (a2.positives, a2.num_relevant) == ([], 1)           # evidence missed: kept, recall 0
    assert b0.images == [page("b.pdf", p) for p in (2, 0, 1)] and b0.positives == [1] and b0.domain == "News"

    # MMDocIR recall@k on the retriever's order = |top-k ∩ gt| / |gt|, via positives and num_relevant.
    recall = lambda s, k: sum(p <= k for p in s.positives) / s.num_relevant
    assert [recall(s, 1) for s in samples] == [0.0, 0.5, 0.0, 1.0]
    assert [recall(s, 5) for s in samples] == [1.0, 0.5, 0.0, 1.0]

    assert [s.images for s in read(mmdocir, top_k=2)][0] == [page("a.pdf", 3), page("a.pdf", 1)]
    assert read(mmdocir, top_k=1)[0].positives == []


def test_mmdocir_round_trips_through_jsonl(mmdocir):
    samples = read(mmdocir)
    write_samples(samples, mmdocir / "eval.jsonl")
    assert read_samples(mmdocir / "eval.jsonl") == samples


def rewrite(path, index, **changes):
    records = [json.loads(x) for x in path.read_text().splitlines()]
    records[index].update(changes)
    write_lines(path, *(json.dumps({k: v for k, v in r.items() if v is not DROP}) for r in records))


@pytest.mark.parametrize("changes, words", [
    (dict(doc_name="c.pdf"), "doc_name 'c.pdf' is not in MMDocIR_annotations.jsonl"),
    (dict(question_index=3), "question_index must be an integer in 0..2"),
    (dict(question_index="0"), "question_index must be an integer"),
    (dict(ranked_pages=[0, 1, 2, 3, 6]), "ranked_pages must be an array of page ids in 0..5"),
    (dict(ranked_pages=[0, 1, 2, 3, 3]), "repeats a page"),
    (dict(ranked_pages=[0, 1, 2]), "fewer than top_k=5"),
    (dict(question="Something else?"), "question does not match"),
    (dict(scores=[1.0]), "unknown field 'scores'"),
])
def test_mmdocir_bad_retrieval(mmdocir, changes, words):
    # Line 1 of retrieval.jsonl holds b.pdf #0 (reversed order), so change line 2, a.pdf #2 (6 pages).
    rewrite(mmdocir / "retrieval.jsonl", 1, **changes)
    with pytest.raises(DataError) as err:
        read(mmdocir)
    assert str(err.value).startswith(f"{mmdocir / 'retrieval.jsonl'}:2: ") and words in str(err.value)


def test_mmdocir_retrieval_question_check_passes(mmdocir):
    rewrite(mmdocir / "retrieval.jsonl", 1, question="Who signed?")
    assert len(read(mmdocir)) == 4


def test_mmdocir_missing_and_duplicate_questions(mmdocir):
    path = mmdocir / "retrieval.jsonl"
    lines = path.read_text().splitlines()
    write_lines(path, *lines[:-1])                       # drop a.pdf #0
    with pytest.raises(DataError, match=r"MMDocIR_annotations\.jsonl:1: question 0 of 'a.pdf' has no line"):
        read(mmdocir)
    write_lines(path, *lines, lines[0])
    with pytest.raises(DataError, match=r"retrieval\.jsonl:5: question 0 of 'b.pdf' already on line 1"):
        read(mmdocir)


def test_mmdocir_bad_annotations_and_pages(mmdocir):
    path = mmdocir / "MMDocIR_annotations.jsonl"
    good = path.read_text()
    rewrite(path, 1, page_indices=[6, 7])                # b.pdf shrinks to 2 pages: evidence page 2 is out
    with pytest.raises(DataError, match=r"annotations\.jsonl:2: question 0: page_id must be .* in 0\.\.1"):
        read(mmdocir)
    path.write_text(good)
    rewrite(path, 1, doc_name="a.pdf")
    with pytest.raises(DataError, match=r"annotations\.jsonl:2: document 'a.pdf' already on line 1"):
        read(mmdocir)
    path.write_text(good)
    rewrite(path, 0, doc_name="../a.pdf")
    with pytest.raises(DataError, match=r"annotations\.jsonl:1: doc_name must be a file name"):
        read(mmdocir)
    path.write_text(good)
    os.remove(mmdocir / "pages" / "b.pdf" / "0.jpg")
    with pytest.raises(DataError, match=r"retrieval\.jsonl:1: image file not found: .*b\.pdf/0\.jpg"):
        read(mmdocir)
    assert len(read(mmdocir, check_images=False)) == 4
    with pytest.raises(ValueError, match="top_k"):
        read(mmdocir, top_k=0)


def test_sample_order():
    seen = [i for step in range(5) for i in sample_order(7, 3, step, seed=1)]  # 15 draws over epochs of 7
    assert sorted(seen[:7]) == list(range(7)) and sorted(seen[7:14]) == list(range(7))
    assert seen[:7] != seen[7:14]  # each epoch is its own shuffle
    assert sample_order(7, 3, 3, seed=1) == seen[9:12]  # a resumed run at step 3 draws the same batch
