"""The README's bad-input table, one test per row: each broken input gives one line naming the problem (or the
documented fallback), never a traceback from inside torch, never a silently wrong result."""
import json
import shutil

import pytest
import torch
from conftest import page_images
from safetensors.torch import load_file, save_file

import evaluate
import train_ppo
import train_sft
from mmr5.reranker import Reranker
from mmr5.rewards import parse_order

SAMPLE = {"query": "q", "images": ["a.png", "b.png"], "positives": [1]}


@pytest.fixture()
def folder(tmp_path):
    for name, image in zip(("a.png", "b.png"), page_images(2)):
        image.save(tmp_path / name)
    return tmp_path


def evaluate_fails(model, data, match, capsys=None):
    """evaluate.py on `data` must stop with exactly one line matching `match`."""
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", str(model), "--data", str(data), "--out", str(data.parent / "out")])
    message = str(e.value) if e.value.code != 2 else capsys.readouterr().err.strip().splitlines()[-1]
    assert "\n" not in message and "Traceback" not in message
    assert __import__("re").search(match, message), message


@pytest.mark.parametrize("line,match", [
    ("{not json", r"data.jsonl:1: .*JSON"),
    (json.dumps({**SAMPLE, "positives": ["1"]}), r"data.jsonl:1: .*positives"),
    (json.dumps({**SAMPLE, "images": ["a.png", "missing.png"]}), r"data.jsonl:1: .*missing.png"),
    (json.dumps({**SAMPLE, "images": ["a.png", "corrupt.png"]}), r"data.jsonl:1: .*corrupt.png"),
    (json.dumps({**SAMPLE, "images": []}), r"data.jsonl:1: .*images"),
    (json.dumps({**SAMPLE, "positives": [1, 1]}), r"data.jsonl:1: .*positives"),
    (json.dumps({**SAMPLE, "positives": [3]}), r"data.jsonl:1: .*3"),
], ids=["invalid-json", "wrong-type", "missing-image", "corrupt-image", "no-candidates", "duplicated-id",
        "id-out-of-range"])
def test_bad_data_file(tiny_model_dirs, folder, line, match):
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "data.jsonl").write_text(line + "\n")
    evaluate_fails(tiny_model_dirs["qwen2_vl"], folder / "data.jsonl", match)


def test_hundred_candidates_are_accepted(tiny_model_dirs):
    """Documented: no limit on candidates; the prompt grows with them, first-id scores stop at 9."""
    reranker = Reranker.from_pretrained(tiny_model_dirs["qwen2_vl"], batch_size=1)
    images = [image.resize((28, 28)) for image in page_images(100)]
    result = reranker.rerank("q", images, max_new_tokens=4)
    assert sorted(result.order) == list(range(100)) and result.scores is None


def copy_model(tiny_model_dirs, tmp_path):
    return shutil.copytree(tiny_model_dirs["qwen2_vl"], tmp_path / "model")


def rewrite_weights(model, change):
    state = load_file(model / "model.safetensors")
    change(state)
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("breakage,match", [
    ("missing-shard", r"no model.safetensors"),
    ("int-weights", r"not in a float dtype.*I32"),
    ("vocab-mismatch", r"tokenizer has \d+ tokens but the model's vocabulary has 100"),
    ("not-qwen", r"model_type 'llama' is not supported"),
])
def test_bad_checkpoint(tiny_model_dirs, folder, tmp_path, breakage, match):
    model = copy_model(tiny_model_dirs, tmp_path)
    if breakage == "missing-shard":
        (model / "model.safetensors").unlink()
    elif breakage == "int-weights":
        rewrite_weights(model, lambda s: s.update({k: v.to(torch.int32) for k, v in s.items() if "norm" in k}))
    elif breakage == "vocab-mismatch":
        config = json.loads((model / "config.json").read_text())
        config["text_config"]["vocab_size"] = 100
        (model / "config.json").write_text(json.dumps(config))
        rewrite_weights(model, lambda s: s.update({k: v[:100] for k, v in s.items() if "embed" in k or "lm_head" in k}))
    elif breakage == "not-qwen":
        config = json.loads((model / "config.json").read_text())
        config["model_type"] = "llama"
        (model / "config.json").write_text(json.dumps(config))
    (folder / "data.jsonl").write_text(json.dumps(SAMPLE) + "\n")
    evaluate_fails(model, folder / "data.jsonl", match)


@pytest.mark.parametrize("script", [train_sft, train_ppo])
@pytest.mark.parametrize("flags,match", [
    (["--lr", "-1e-4"], r"--lr"),
    (["--batch-size", "0"], r"--batch-size must be positive"),
    (["--min-pixels", "50000", "--max-pixels", "3136"], r"--max-pixels \(3136\) is smaller than --min-pixels"),
])
def test_bad_flags(tiny_model_dirs, folder, capsys, script, flags, match):
    if script is train_ppo and flags[0] == "--batch-size":
        flags = ["--prompts-per-step", "0"]
        match = r"--prompts-per-step must be positive"
    (folder / "data.jsonl").write_text(json.dumps(SAMPLE) + "\n")
    with pytest.raises(SystemExit) as e:
        script.main(["--model", str(tiny_model_dirs["qwen2_vl"]), "--train", str(folder / "data.jsonl"),
                     "--out", str(folder / "o"), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("usage:") is False and __import__("re").search(match, err), err


@pytest.mark.parametrize("script", [train_sft, train_ppo, evaluate])
@pytest.mark.parametrize("device,match", [("gpu", r"unknown device 'gpu'"),
                                          ("cuda:99", r"device 'cuda:99': (no CUDA GPU is available|this machine has)")])
def test_unusable_device(tiny_model_dirs, folder, script, device, match):
    (folder / "data.jsonl").write_text(json.dumps({**SAMPLE, "response": "<answer>[1, 2]</answer>"}) + "\n")
    data = "--data" if script is evaluate else "--train"
    with pytest.raises(SystemExit) as e:
        script.main(["--model", str(tiny_model_dirs["qwen2_vl"]), data, str(folder / "data.jsonl"),
                     "--out", str(folder / "o"), "--device", device])
    message = str(e.value.code)
    assert "\n" not in message and __import__("re").search(match, message), message


@pytest.mark.parametrize("text", ["", "<think>" + "and so on " * 500, "I think image two.", "<answer>[two, one]</answer>"],
                         ids=["empty", "endless", "no-answer", "not-integers"])
def test_bad_model_output_falls_back_to_the_retriever_order(text):
    """Documented fallback: an output without a readable answer keeps the retriever's order, flagged parsed=False
    (evaluate.py counts these as parse failures)."""
    assert parse_order(text, 5) == ([0, 1, 2, 3, 4], False)
