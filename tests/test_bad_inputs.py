"""The README's bad-input table, one test per row: each broken input gives one line naming the problem (or the
documented fallback), never a traceback from inside torch, never a silently wrong result."""
import json
import re
import shutil

import pytest
import torch
from conftest import page_images
from PIL import Image
from safetensors.torch import load_file, save_file

import evaluate
import train_ppo
import train_sft
from mmr5.model import Qwen2VL
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


@pytest.fixture()
def no_model_work(monkeypatch):
    """Fail the test if a model is built: these inputs must be found before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(Qwen2VL, "from_pretrained", refuse)


def fails(script, argv, match):
    """`script.main(argv)` must stop with exactly one line matching `match`."""
    with pytest.raises(SystemExit) as e:
        script.main([str(a) for a in argv])
    message = str(e.value.code)
    assert "\n" not in message and "Traceback" not in message
    assert re.search(match, message), message


def cut(path, keep=0.5):
    """Keep the first `keep` of the file, as an interrupted download or copy leaves it."""
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


def edit_config(model, change):
    config = json.loads((model / "config.json").read_text())
    change(config)
    (model / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("breakage,match", [
    ("config-cut", r"config.json is not valid JSON \(.*\); copy it again"),
    ("config-not-an-object", r"config.json is not a JSON object"),
    ("config-wrong-type", r"config.json has a field of the wrong type"),
    ("tokenizer-cut", r"tokenizer.json is not a readable tokenizer \(.*\); a download cut short\?"),
    ("tokenizer-config-cut", r"tokenizer_config.json is not valid JSON \(.*\); copy it again"),
    ("preprocessor-config-cut", r"preprocessor_config.json is not valid JSON \(.*\); copy it again"),
    ("preprocessor-wrong-type", r"preprocessor_config.json: max_pixels = '12845056' is not a positive number"),
    ("weights-header-cut", r"model.safetensors is not a complete safetensors file \(header length \d+ in a file"),
    ("weights-data-cut", r"model.safetensors is not a complete safetensors file \(\d+ bytes, the header describes"),
    ("weights-empty", r"model.safetensors is not a complete safetensors file \(header length 0 in a file of 0"),
])
def test_broken_checkpoint_file(tiny_model_dirs, folder, tmp_path, no_model_work, breakage, match):
    model = copy_model(tiny_model_dirs, tmp_path)
    if breakage == "config-cut":
        cut(model / "config.json")
    elif breakage == "config-not-an-object":
        (model / "config.json").write_text("[]")
    elif breakage == "config-wrong-type":
        edit_config(model, lambda c: c.update(text_config="qwen2"))
    elif breakage == "tokenizer-cut":
        cut(model / "tokenizer.json")
    elif breakage == "tokenizer-config-cut":
        cut(model / "tokenizer_config.json")
    elif breakage == "preprocessor-config-cut":
        cut(model / "preprocessor_config.json")
    elif breakage == "preprocessor-wrong-type":
        config = json.loads((model / "preprocessor_config.json").read_text())
        (model / "preprocessor_config.json").write_text(json.dumps({**config, "max_pixels": "12845056"}))
    else:
        cut(model / "model.safetensors", {"weights-header-cut": 0.0005, "weights-data-cut": 0.9}.get(breakage, 0))
    (folder / "data.jsonl").write_text(json.dumps(SAMPLE) + "\n")
    evaluate_fails(model, folder / "data.jsonl", match)


@pytest.mark.parametrize("kind,match", [
    ("a-file", r"data.jsonl is a file, not a checkpoint folder"),
    ("missing", r"nope does not exist; expected a checkpoint folder"),
    ("a-run-folder", r"no config.json at .*run/config.json; did you mean .*run/model\?"),
])
def test_model_is_not_a_checkpoint_folder(tiny_model_dirs, folder, tmp_path, no_model_work, kind, match):
    (folder / "data.jsonl").write_text(json.dumps(SAMPLE) + "\n")
    if kind == "a-run-folder":  # train_sft.py's --out given instead of its model/
        shutil.copytree(tiny_model_dirs["qwen2_vl"], tmp_path / "run" / "model")
    model = {"a-file": folder / "data.jsonl", "missing": tmp_path / "nope", "a-run-folder": tmp_path / "run"}[kind]
    evaluate_fails(model, folder / "data.jsonl", match)


@pytest.mark.parametrize("kind,match", [
    ("empty", r"data.jsonl:1: empty file, no samples"),
    ("a-folder", r"is a folder; give the JSON Lines file in it"),
    ("missing", r"nope.jsonl: cannot read the data file \(No such file or directory\)"),
    ("a-json-document", r"data.jsonl:1: invalid JSON Lines: one whole JSON object per line"),
])
def test_bad_data_path(tiny_model_dirs, folder, no_model_work, kind, match):
    data = folder / "data.jsonl"
    data.write_text({"empty": "", "a-json-document": json.dumps([SAMPLE], indent=2)}.get(kind, ""))
    path = {"a-folder": folder, "missing": folder / "nope.jsonl"}.get(kind, data)
    fails(evaluate, ["--model", tiny_model_dirs["qwen2_vl"], "--data", path, "--out", folder / "out"], match)


@pytest.mark.parametrize("kind,match", [
    ("zero-bytes", r"data.jsonl:1: cannot read image .*a.png \(cannot identify image file .*\): re-export or copy"),
    ("png-cut", r"data.jsonl:1: cannot read image .*a.png \(.*[Tt]runcated.*\): re-export or copy"),
    ("jpeg-cut", r"data.jsonl:1: cannot read image .*a.jpg \(image file is truncated.*\): re-export or copy"),
    ("ribbon", r"data.jsonl:1: image .*a.png is 5880x28, aspect ratio 210; Qwen-VL takes at most 200: crop or split"),
    ("decompression-bomb", r"data.jsonl:1: image .*a.png is too large to decode safely \(Image size \(400000000 "
                           r"pixels\) exceeds limit of \d+ pixels\): re-export it smaller"),
])
def test_bad_image(tiny_model_dirs, folder, no_model_work, kind, match):
    page = folder / "a.png"
    sample = SAMPLE
    if kind == "zero-bytes":
        page.write_bytes(b"")
    elif kind == "png-cut":
        cut(page, 0.8)
    elif kind == "jpeg-cut":
        Image.open(page).convert("RGB").resize((300, 300)).save(folder / "a.jpg")
        cut(folder / "a.jpg", 0.8)
        sample = {**SAMPLE, "images": ["a.jpg", "b.png"]}
    elif kind == "ribbon":  # a long scan: found in the data pre-pass, not by the processor mid-evaluation
        Image.new("RGB", (28 * 210, 28), "white").save(page)
    else:
        Image.new("1", (20000, 20000)).save(page)
    (folder / "data.jsonl").write_text(json.dumps(sample) + "\n")
    evaluate_fails(tiny_model_dirs["qwen2_vl"], folder / "data.jsonl", match)


@pytest.mark.parametrize("kind", ["bom-and-crlf", "one-pixel-page"])
def test_accepted_inputs(tiny_model_dirs, folder, kind):
    """Documented: a UTF-8 byte order mark and Windows line ends are read; a 1x1 page is scaled up to min_pixels."""
    line = json.dumps(SAMPLE)
    if kind == "bom-and-crlf":
        lines = line + "\r\n" + line.replace('"q"', '"r"') + "\r\n"
        (folder / "data.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    else:
        Image.new("RGB", (1, 1), "red").save(folder / "a.png")
        (folder / "data.jsonl").write_text(line + "\n")
    evaluate.main(["--model", str(tiny_model_dirs["qwen2_vl"]), "--data", str(folder / "data.jsonl"),
                   "--out", str(folder / "out"), "--max-new-tokens", "2"])
    results = json.loads((folder / "out" / "results.json").read_text())
    assert results["queries"] == (2 if kind == "bom-and-crlf" else 1)


@pytest.mark.parametrize("script", [evaluate, train_sft, train_ppo])
def test_prompt_longer_than_the_context(tiny_model_dirs, folder, tmp_path, no_model_work, script):
    """Found before the model loads (train_sft.py counts the response too: the row it trains on)."""
    model = copy_model(tiny_model_dirs, tmp_path)
    edit_config(model, lambda c: c["text_config"].update(max_position_embeddings=64))
    (folder / "data.jsonl").write_text(json.dumps({**SAMPLE, "response": "<answer>[1, 2]</answer>"}) + "\n")
    data = "--data" if script is evaluate else "--train"
    fails(script, ["--model", model, data, folder / "data.jsonl", "--out", folder / "out"],
          r"sample data.jsonl:1: its (prompt|row) is \d+ tokens, longer than the model's context of 64 "
          r"\(max_position_embeddings\): give fewer or smaller pages")


@pytest.mark.parametrize("script", [evaluate, train_sft, train_ppo])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_non_positive_pixels_flag(tiny_model_dirs, folder, no_model_work, script, value):
    """0 was silently ignored (the checkpoint's value used instead), a negative value silently accepted."""
    (folder / "data.jsonl").write_text(json.dumps({**SAMPLE, "response": "<answer>[1, 2]</answer>"}) + "\n")
    data = "--data" if script is evaluate else "--train"
    fails(script, ["--model", tiny_model_dirs["qwen2_vl"], data, folder / "data.jsonl", "--out", folder / "o",
                   "--min-pixels", value], rf"min_pixels must be a positive number, got {value}$")


@pytest.mark.parametrize("script", [evaluate, train_sft, train_ppo])
@pytest.mark.parametrize("kind", ["a-file", "under-a-file"])
def test_out_is_a_file(tiny_model_dirs, folder, no_model_work, script, kind):
    (folder / "data.jsonl").write_text(json.dumps({**SAMPLE, "response": "<answer>[1, 2]</answer>"}) + "\n")
    (folder / "taken").write_text("a file")
    out = folder / "taken" if kind == "a-file" else folder / "taken" / "run"
    data = "--data" if script is evaluate else "--train"
    match = r"--out .*taken is a file, not a folder" if kind == "a-file" else r"taken is a file, so no folder"
    fails(script, ["--model", tiny_model_dirs["qwen2_vl"], data, folder / "data.jsonl", "--out", out], match)


@pytest.mark.parametrize("script", [train_sft, train_ppo])
@pytest.mark.parametrize("variables,match", [
    ({"WORLD_SIZE": "two"}, r"environment variable WORLD_SIZE='two' is not a process count or index; unset it"),
    ({"WORLD_SIZE": "2"}, r"WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT not: start the script with "
                          r"torchrun"),
], ids=["typo", "without-torchrun"])
def test_bad_environment(tiny_model_dirs, folder, monkeypatch, no_model_work, script, variables, match):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    (folder / "data.jsonl").write_text(json.dumps({**SAMPLE, "response": "<answer>[1, 2]</answer>"}) + "\n")
    fails(script, ["--model", tiny_model_dirs["qwen2_vl"], "--train", folder / "data.jsonl", "--out", folder / "o"],
          match)


def test_mmdocir_pages_folder_missing(tiny_model_dirs, folder, no_model_work):
    (folder / "annotations.jsonl").write_text("{}\n")
    (folder / "retrieval.jsonl").write_text("{}\n")
    fails(evaluate, ["--model", tiny_model_dirs["qwen2_vl"], "--mmdocir-annotations", folder / "annotations.jsonl",
                     "--mmdocir-pages", folder / "pages", "--mmdocir-retrieval", folder / "retrieval.jsonl",
                     "--out", folder / "out"], r"pages: no such folder of page images; export them first")


@pytest.mark.parametrize("kind,match", [
    ("long-prompt", r"^a prompt of \d+ tokens is longer than the model's context of 64 \(max_position_embeddings\)"),
    ("ribbon", r"^candidate 2: image 28x5880 has aspect ratio 210.0; Qwen-VL takes at most 200: crop or split it$"),
])
def test_reranker_refuses_before_generating(tiny_model_dirs, tmp_path, monkeypatch, kind, match):
    model = copy_model(tiny_model_dirs, tmp_path)
    if kind == "long-prompt":
        edit_config(model, lambda c: c["text_config"].update(max_position_embeddings=64))
    reranker = Reranker.from_pretrained(model)
    monkeypatch.setattr("mmr5.reranker.generate", lambda *a, **k: pytest.fail("generate was called"))
    images = page_images(2) if kind == "long-prompt" else [page_images(1)[0], Image.new("RGB", (28 * 210, 28))]
    with pytest.raises(ValueError) as e:
        reranker.rerank("q", images)
    assert "\n" not in str(e.value) and re.search(match, str(e.value)), str(e.value)
