"""Evaluate an MM-R5 reranker as MMDocIR does: Recall@1/3/5 per domain, macro and micro, next to the retriever.

    python evaluate.py --model PATH --data FILE.jsonl            # mmr5 JSONL (see README)
    python evaluate.py --model PATH --mmdocir-annotations MMDocIR_annotations.jsonl --mmdocir-pages DIR
                       --mmdocir-retrieval colqwen_top.jsonl      # the MMDocIR release + a retriever's ranking
    python evaluate.py                                            # the newest built-in model, built-in eval split

Writes to --out: results.json (all numbers), predictions.jsonl (per query: order, reasoning, rewards, scores),
report.html (every query with its pages in the model's order, furthest from the best answer first) and prints the
table. --resume continues an interrupted evaluation from predictions.jsonl.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mmr5.data import DataError, read_mmdocir, read_samples
from mmr5.checkpoint import check_output_folder
from mmr5.metrics import evaluation_records, format_table, summarize
from mmr5.reranker import Reranker, check_before_loading
from mmr5.report import write_report

BUILT_IN = ["runs/demo/ppo/model", "runs/demo/sft/model"]  # newest first


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local HF-layout checkpoint (default: the newest built-in model)")
    p.add_argument("--data", help="samples in mmr5 JSONL (default with no --model: the built-in eval split)")
    p.add_argument("--mmdocir-annotations", help="MMDocIR_annotations.jsonl (instead of --data)")
    p.add_argument("--mmdocir-pages", help="folder of exported MMDocIR page images: DIR/<doc_name>/<page>.jpg")
    p.add_argument("--mmdocir-retrieval", help="retriever ranking JSONL: doc_name, question_index, ranked_pages")
    p.add_argument("--top-k", type=int, default=5, help="candidates per MMDocIR question (MM-R5: ColQwen's top 5)")
    p.add_argument("--out", help="output folder (default: <model>/../eval)")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N samples only (0 = all)")
    p.add_argument("--batch-size", type=int, default=8, help="queries per generate call")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="generation budget per answer (release: 8192)")
    p.add_argument("--temperature", type=float, default=0.0, help="main run's temperature (0 = greedy)")
    p.add_argument("--samples", type=int, default=0, help="K extra sampled runs: report their mean and spread")
    p.add_argument("--sample-temperature", type=float, default=0.3, help="temperature of the K runs (release: 0.3)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--min-pixels", type=int, help="override the checkpoint's preprocessor min_pixels")
    p.add_argument("--max-pixels", type=int, help="override the checkpoint's preprocessor max_pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled runs")
    p.add_argument("--resume", action="store_true", help="keep predictions.jsonl's finished queries, do the rest")
    args = p.parse_args(argv)
    mmdocir = [args.mmdocir_annotations, args.mmdocir_pages, args.mmdocir_retrieval]
    if any(mmdocir) and not all(mmdocir):
        p.error("MMDocIR needs all of --mmdocir-annotations, --mmdocir-pages and --mmdocir-retrieval")
    if args.data and any(mmdocir):
        p.error("give --data or the MMDocIR inputs, not both")
    for name in ("batch_size", "max_new_tokens", "top_k"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.samples < 0 or args.limit < 0 or args.temperature < 0 or args.sample_temperature <= 0:
        p.error("--samples and --limit must be >= 0, temperatures non-negative (--sample-temperature > 0)")
    if args.min_pixels and args.max_pixels and args.max_pixels < args.min_pixels:
        p.error(f"--max-pixels ({args.max_pixels}) is smaller than --min-pixels ({args.min_pixels})")
    if not args.model:
        found = next((m for m in BUILT_IN if (Path(m) / "config.json").exists()), None)
        if found is None:
            p.error("no --model and no built-in model yet: run `python train_sft.py` first")
        args.model = found
        if not (args.data or any(mmdocir)):
            from mmr5.synthetic import build_demo, build_rl_demo

            args.data = (build_rl_demo() if found == BUILT_IN[0] else build_demo())["eval"]  # its own stage's
    if not (args.data or any(mmdocir)):
        p.error("give --data FILE.jsonl or the three --mmdocir-* inputs")
    args.out = args.out or str(Path(args.model).parent / "eval")
    return args


def read_predictions(path: Path) -> dict:
    """Finished queries of an interrupted run, by id (a line cut by a kill is ignored)."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                done[r["id"]] = r
            except (json.JSONDecodeError, KeyError):
                pass
    return done


def spread(summaries: list[dict]) -> dict:
    """Mean and standard deviation of macro/micro recall@k over K runs."""
    out = {}
    for avg in ("macro", "micro"):
        for metric in summaries[0][avg]:
            values = [s[avg][metric] for s in summaries]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
            out[f"{avg} {metric}"] = {"mean": mean, "std": std}
    return out


def load_samples(args) -> list:
    """The samples to evaluate, every one, its images, the output folder and the checkpoint's files checked before
    any model work."""
    try:
        check_output_folder(Path(args.out))
        if args.data:
            samples = read_samples(args.data)
        else:
            samples = read_mmdocir(args.mmdocir_annotations, args.mmdocir_pages, args.mmdocir_retrieval, args.top_k)
        samples = samples[: args.limit] if args.limit else samples
        if not samples:
            sys.exit("error: no samples to evaluate")
        check_before_loading(args.model, samples, args.min_pixels, args.max_pixels)
    except (DataError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    return samples


def rerank_all(reranker: Reranker, todo: list, pred_path: Path, done: dict, args):
    """Rerank and score `todo`, appending each query's record to predictions.jsonl as soon as it is done."""
    bar = tqdm(total=len(todo), desc="evaluate", unit="query", dynamic_ncols=True)
    gen = torch.Generator(reranker.model.device).manual_seed(args.seed)
    for start in range(0, len(todo), args.batch_size):
        chunk = todo[start:start + args.batch_size]
        results = reranker.rerank_batch([s.query for s in chunk], [s.images for s in chunk], args.temperature,
                                        args.max_new_tokens, generator=gen)
        with open(pred_path, "a", encoding="utf-8") as f:
            for r in evaluation_records(chunk, results):
                f.write(json.dumps(r) + "\n")
                done[r["id"]] = r
        bar.update(len(chunk))
    bar.close()


def sampled_runs(reranker: Reranker, samples: list, args) -> dict:
    """Mean and spread of recall over `args.samples` runs sampled at `args.sample_temperature`."""
    runs = []
    for k in range(args.samples):
        g = torch.Generator(reranker.model.device).manual_seed(args.seed + 1 + k)
        results = reranker.rerank_batch([s.query for s in samples], [s.images for s in samples],
                                        args.sample_temperature, args.max_new_tokens, generator=g, progress=True)
        runs.append(summarize(evaluation_records(samples, results)))
    return {"k": args.samples, "temperature": args.sample_temperature, **spread(runs)}


def results_of(records: list[dict], args, seconds: float, reranked: int) -> dict:
    """Every number results.json holds: recall of the reranker, the retriever and the first-id scores, rewards."""
    n = len(records)
    return {
        "model": args.model, "data": args.data or args.mmdocir_annotations, "queries": n,
        "reranker": summarize(records), "retriever": summarize(records, key="retriever_recall"),
        "by_score": summarize([r for r in records if r["scores"] is not None] or records, key="score_recall"),
        "scored_queries": sum(r["scores"] is not None for r in records),
        "parse_failure_rate": sum(not r["parsed"] for r in records) / n,
        "mean_format_reward": sum(r["reward_format"] for r in records) / n,
        "mean_rerank_reward": sum(r["reward_rerank"] for r in records) / n,
        "mean_output_tokens": sum(r["num_tokens"] for r in records) / n,
        "queries_per_s": reranked / seconds if reranked else None,
        "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
    }


def print_results(results: dict, table: str, args):
    print(f"\nRecall (%) of the reranker vs the retriever's order (MMDocIR: macro = mean of domain means):\n{table}")
    if results["scored_queries"]:
        s = results["by_score"]
        print(f"ordering by first-id scores ({results['scored_queries']} queries): macro R@1 "
              f"{100 * s['macro']['recall@1']:.1f}  micro R@1 {100 * s['micro']['recall@1']:.1f}")
    for name, v in results.get("sampled_runs", {}).items():
        if isinstance(v, dict):
            print(f"{args.samples} sampled runs (T={args.sample_temperature}): {name} {100 * v['mean']:.1f} "
                  f"+- {100 * v['std']:.1f}")
    qps = f"{results['queries_per_s']:.2f} queries/s" if results["queries_per_s"] else "all resumed"
    print(f"parse failures {100 * results['parse_failure_rate']:.1f}%  mean format reward "
          f"{results['mean_format_reward']:.3f}  mean output {results['mean_output_tokens']:.0f} tokens  {qps}")


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    samples = load_samples(args)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        check_before_loading(args.model, samples, args.min_pixels, args.max_pixels)
        reranker = Reranker.from_pretrained(args.model, args.device, dtype, args.min_pixels, args.max_pixels,
                                            batch_size=args.batch_size)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / "predictions.jsonl"
    done = read_predictions(pred_path) if args.resume else {}
    if not args.resume and pred_path.exists():
        pred_path.unlink()
    todo = [s for s in samples if s.id not in done]
    print(f"{args.model} on {len(samples)} queries ({len(done)} already done), {reranker.model.device} "
          f"{str(reranker.model.dtype).removeprefix('torch.')} -> {out}")
    t0 = time.time()
    rerank_all(reranker, todo, pred_path, done, args)
    records = [done[s.id] for s in samples]
    results = results_of(records, args, time.time() - t0, len(todo))
    if args.samples:
        results["sampled_runs"] = sampled_runs(reranker, samples, args)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = format_table(results["reranker"], results["retriever"])
    write_report(out / "report.html", records, {s.id: s.images for s in samples}, table, f"MM-R5 rerank: {args.model}")
    print_results(results, table, args)
    print(f"wrote {out / 'results.json'}, {pred_path}, {out / 'report.html'}")


if __name__ == "__main__":
    main()
