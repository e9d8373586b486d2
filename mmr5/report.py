"""report.html: one self-contained page a person reads to see *why* the reranker ranked as it did.

Pipeline: beside metrics (evaluation), after the whole data -> processor -> model -> sampler -> rewards -> ppo line.
Written by evaluate.py from its predictions: each query with
its candidate pages as thumbnails (embedded as base64 JPEG, so the file can be mailed or opened offline) in the
model's order, relevant pages outlined in green, and the model's reasoning beside them. Worst queries first:
that is where a person looks.
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


def write_report(path, predictions: list[dict], images: dict[str, list[str]], summary_table: str, title: str):
    """`predictions`: evaluate.py's records (id, query, order, positives, text, recall@k ...); `images`: id ->
    candidate image paths in the file's (retriever's) order."""
    worst_first = sorted(predictions, key=lambda r: (r["recall@1"], r.get("recall@3", 0), r.get("recall@5", 0)))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<pre>{html.escape(summary_table)}</pre>",
             f"<p>{len(predictions)} queries, worst first. Pages in the model's order; green = relevant.</p>"]
    for r in worst_first:
        paths = images[r["id"]]
        pages = []
        for rank, i in enumerate(r["order"], 1):
            cls = "page positive" if i + 1 in r["positives"] else "page"
            pages.append(f"<div class='{cls}'><img src='{thumbnail(paths[i])}' alt='candidate {i + 1}'>"
                         f"<br>#{rank}: image {i + 1}</div>")
        flag = "" if r["parsed"] else " <span class='bad'>(no readable answer: retriever order)</span>"
        parts.append(
            f"<div class='query' data-id='{html.escape(str(r['id']))}'><div class='pages'>"
            f"<div style='width:100%'><b>{html.escape(r['query'])}</b> [{html.escape(r.get('domain', ''))}] "
            f"R@1 {r['recall@1']:.2f}{flag}</div>{''.join(pages)}</div>"
            f"<div class='reasoning'>{html.escape(r['text'])}</div></div>")
    parts.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(parts))
