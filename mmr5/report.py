"""report.html: one self-contained page a person reads to see *why* the reranker ranked as it did.

Pipeline: beside metrics (evaluation), after the whole data -> processor -> model -> sampler -> rewards -> ppo line.
Written by evaluate.py from its predictions: each query with
its candidate pages as thumbnails (embedded as base64 JPEG, so the file can be mailed or opened offline) in the
model's order, relevant pages outlined in green, and the model's reasoning beside them. Furthest from the best
answer first (parse failures, then by `gap`), not by Recall@1: a perfect answer to a question with two relevant pages
has R@1 0.5, and sorting by it buried the real mistakes under perfect answers. A few lines of plain JS filter the
page to mistakes or parse failures (also on load from the address's #mistakes / #unparsed).
"""
import base64
import html
import io

from PIL import Image

STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; }
table.summary td, table.summary th { padding: 2px 10px; text-align: right; }
.query { border-top: 1px solid #ccc; padding: 12px 0; display: flex; gap: 16px; }
.pages { display: flex; gap: 6px; flex-wrap: wrap; max-width: 60%; }
.page { text-align: center; font-size: 12px; }
.page img { border: 3px solid #ddd; max-height: 140px; max-width: 140px; }
.page.positive img { border-color: #2a2; }
.reasoning { white-space: pre-wrap; font-family: monospace; font-size: 12px; max-width: 40%; }
.bad { color: #b00; }
.gap { font-family: monospace; }
"""
# Shows the queries the checked radio button selects; the address's #mistakes / #unparsed selects one on load.
FILTER_JS = """
function show(kind) {
  var n = 0;
  document.querySelectorAll("div.query").forEach(function (q) {
    var keep = kind === "all" || q.getAttribute("data-" + kind) === "1";
    q.style.display = keep ? "" : "none";
    n += keep ? 1 : 0;
  });
  document.getElementById("shown").textContent = n + " shown";
  document.querySelector("input[value=" + kind + "]").checked = true;
}
document.querySelectorAll("input[name=show]").forEach(function (input) {
  input.addEventListener("change", function () { show(input.value); });
});
var start = location.hash.slice(1);
show(start === "mistakes" || start === "unparsed" ? start : "all");
"""


def thumbnail(path: str, size: int = 160) -> str:
    """A data: URI of a small JPEG of the page (a placeholder text if the file cannot be read)."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    except OSError:
        return ""


def gap(record: dict) -> float:
    """How far an answer is from the best it could be: 1 - its rerank reward (the release's, 1 for the best order of
    these candidates, 0 for an unreadable answer); 0 when no relevant page is among the candidates to be found."""
    return round(1.0 - record["reward_rerank"], 6) if record["positives"] else 0.0  # a perfect order: exactly 0


def write_report(path, predictions: list[dict], images: dict[str, list[str]], summary_table: str, title: str):
    """`predictions`: evaluate.py's records (id, query, order, positives, text, recall@k ...); `images`: id ->
    candidate image paths in the file's (retriever's) order."""
    worst_first = sorted(predictions, key=lambda r: (r["parsed"], -gap(r), r["recall@1"]))
    mistakes, unparsed = sum(gap(r) > 0 for r in predictions), sum(not r["parsed"] for r in predictions)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<pre>{html.escape(summary_table)}</pre>",
             f"<p>{len(predictions)} queries: parse failures first, then by gap = 1 - rerank reward (how far the "
             "order is from the best one; 0 = relevant pages on top). Pages in the model's order; green = relevant."
             "</p>",
             f"<p>Show: <label><input type='radio' name='show' value='all' checked> all</label> "
             f"<label><input type='radio' name='show' value='mistakes'> mistakes ({mistakes})</label> "
             f"<label><input type='radio' name='show' value='unparsed'> parse failures ({unparsed})</label> "
             "<span id='shown'></span></p>"]
    for r in worst_first:
        paths = images[r["id"]]
        pages = []
        for rank, i in enumerate(r["order"], 1):
            cls = "page positive" if i + 1 in r["positives"] else "page"
            pages.append(f"<div class='{cls}'><img src='{thumbnail(paths[i])}' alt='candidate {i + 1}'>"
                         f"<br>#{rank}: image {i + 1}</div>")
        flag = "" if r["parsed"] else " <span class='bad'>(no readable answer: retriever order)</span>"
        flag += "" if r["positives"] else " (no relevant page among the candidates)"
        parts.append(
            f"<div class='query' data-id='{html.escape(str(r['id']))}' data-mistakes='{int(gap(r) > 0)}' "
            f"data-unparsed='{int(not r['parsed'])}'><div class='pages'>"
            f"<div style='width:100%'><span class='gap'>gap {gap(r):.2f}</span> <b>{html.escape(r['query'])}</b> "
            f"[{html.escape(r.get('domain', ''))}] R@1 {r['recall@1']:.2f}{flag}</div>{''.join(pages)}</div>"
            f"<div class='reasoning'>{html.escape(r['text'])}</div></div>")
    parts.append(f"<script>{FILTER_JS}</script></body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(parts))
