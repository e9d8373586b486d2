"""Reranker: valid permutations whatever the model writes, and first-id scores read at the right position."""
import pytest
import torch
from conftest import page_images

from mmr5 import sampler as sampler_module
from mmr5.processor import Processor
from mmr5.reranker import Reranker, RerankResult

ODD_OUTPUTS = ["", "no tags at all", "<think>x</think><answer>[3, 1]</answer>", "<answer>[9, 9, -2, 1]</answer>",
               "<answer>[2, 2, 2]</answer> trailing", "<think></think><answer>[a, b]</answer>", "<answer>[" * 50,
               "<think>" + "Image 1 " * 1000 + "</think><answer>[5, 4, 3, 2, 1]</answer>"]


def test_rerank_on_tiny_checkpoint_returns_a_permutation(tiny_model_dirs, tmp_path):
    reranker = Reranker.from_pretrained(tiny_model_dirs["qwen2_5_vl"])
    assert reranker.model.dtype == torch.float32 and reranker.model.device.type == "cpu"
    paths = []
    for i, image in enumerate(page_images(4)):  # paths and PIL images both work
        image.save(tmp_path / f"p{i}.png")
        paths.append(str(tmp_path / f"p{i}.png"))
    result = reranker.rerank("a red circle", paths[:2] + page_images(2, seed=9), max_new_tokens=12)
    assert isinstance(result, RerankResult)
    assert sorted(result.order) == [0, 1, 2, 3] and isinstance(result.text, str)
    assert result.parsed is False and result.order == [0, 1, 2, 3]  # a random model writes no answer
    with pytest.raises(TypeError, match="a single path is not a list"):  # not read as one image per character
        reranker.rerank("a red circle", paths[0])
    with pytest.raises(TypeError, match="list of queries"):
        reranker.rerank_batch("a red circle", [paths])


def test_any_output_gives_a_valid_permutation(tiny_model_dirs, monkeypatch):
    reranker = Reranker.from_pretrained(tiny_model_dirs["qwen2_vl"], batch_size=3)
    real_generate = sampler_module.generate
    outputs = iter(ODD_OUTPUTS)

    def fake_generate(*args, **kwargs):
        rollout = real_generate(*args, **{**kwargs, "max_new_tokens": 2})
        rollout.texts = [next(outputs) for _ in rollout.texts]
        return rollout

    monkeypatch.setattr("mmr5.reranker.generate", fake_generate)
    counts = [5, 3, 5, 1, 5, 2, 5, 5]
    results = reranker.rerank_batch(["q"] * len(counts), [page_images(c) for c in counts])
    for text, n, r in zip(ODD_OUTPUTS, counts, results):
        assert sorted(r.order) == list(range(n)) and r.text == text
        assert (r.scores is None) == ("<answer>[" not in text)
        if r.scores is not None:
            assert len(r.scores) == n and abs(sum(r.scores) - 1) < 1e-5
    assert results[2].order[:2] == [2, 0] and results[2].parsed


def test_scores_read_after_answer_open(tiny_model_dirs):
    """The batched score forward equals the next-token distribution of prompt + prefix built another way."""
    path = tiny_model_dirs["qwen2_5_vl"]
    reranker = Reranker.from_pretrained(path)
    proc = Processor.from_pretrained(path)
    texts = ["<think>Image 2 shows it.</think><answer>[2, 1, 3]</answer>", "<think>hmm</think><answer>[1]</answer>"]
    images = [page_images(3), page_images(2, seed=5)]
    batch = proc.rerank_inputs(["q one", "second query"], images)
    scores = reranker.first_id_scores(batch, texts, [3, 2])
    for b, text in enumerate(texts):
        prefix = text[: text.index("<answer>[") + len("<answer>[")]
        row = proc.rerank_inputs([["q one", "second query"][b]], [images[b]], responses=[prefix])
        end = int(row["labels_mask"][0].nonzero()[-1]) - 1  # the last prefix token (before the appended <|im_end|>)
        with torch.no_grad():
            logits = reranker.model(row["input_ids"], row["attention_mask"], row["pixel_values"], row["image_grid_thw"]).logits
        digits = [proc.encode(str(i))[0] for i in range(1, len(images[b]) + 1)]
        expected = logits[0, end, digits].softmax(-1)
        assert torch.allclose(torch.tensor(scores[b]), expected, atol=1e-5)


def fake_outputs(monkeypatch, texts):
    """generate returns `texts` (one per row) instead of what the random model writes."""
    real_generate = sampler_module.generate

    def fake_generate(*args, **kwargs):
        rollout = real_generate(*args, **{**kwargs, "max_new_tokens": 2})
        rollout.texts = list(texts)
        return rollout

    monkeypatch.setattr("mmr5.reranker.generate", fake_generate)


def test_rank_answers_as_cross_encoder_rank(tiny_model_dirs, monkeypatch):
    """sentence-transformers' shape: [{"corpus_id", "score"}], best first, scores = P(ranked first) when they
    exist; the list follows them (ties in the generated order), top_k cuts it, return_documents adds the image."""
    reranker = Reranker.from_pretrained(tiny_model_dirs["qwen2_5_vl"])
    images = page_images(4)
    fake_outputs(monkeypatch, ["<think>x</think><answer>[3, 1, 4, 2]</answer>"])
    scores = reranker.rerank("q", images).scores
    ranked = reranker.rank("q", images)
    assert [r["corpus_id"] for r in ranked] == sorted(range(4), key=lambda i: -scores[i])
    assert [r["score"] for r in ranked] == sorted(scores, reverse=True) and set(ranked[0]) == {"corpus_id", "score"}
    top = reranker.rank("q", images, top_k=2, return_documents=True)
    assert top == [{**r, "image": images[r["corpus_id"]]} for r in ranked[:2]]
    with pytest.raises(ValueError, match="top_k"):
        reranker.rank("q", images, top_k=0)


def test_rank_without_scores_uses_the_generated_order(tiny_model_dirs, monkeypatch):
    reranker = Reranker.from_pretrained(tiny_model_dirs["qwen2_vl"])
    fake_outputs(monkeypatch, ["<think>x</think><answer>[3, 1, 4, 2]</answer>"])
    ranked = reranker.rank("q", page_images(4), scores=False)  # as with over 9 candidates or no "<answer>["
    assert ranked == [{"corpus_id": 2, "score": 1.0}, {"corpus_id": 0, "score": 0.75},
                      {"corpus_id": 3, "score": 0.5}, {"corpus_id": 1, "score": 0.25}]
