"""SFT: the loss, the schedule and data order, resume bit-for-bit, refusing broken checkpoints, HF round trip."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import interrupt_at_step, page_images, save_pages

import train_sft
from mmr5.data import read_samples
from mmr5.model import Qwen2VL
from mmr5.processor import Processor
from mmr5.sft import learning_rate, sft_batch, sft_loss

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """A few samples with responses, pages on disk, in the mmr5 JSONL format."""
    d = tmp_path_factory.mktemp("sft_data")
    rows = []
    for i in range(10):
        images = save_pages(d, i, page_images(3, seed=i))
        pos = i % 3 + 1
        response = f"<think>The question asks for item {i}. Image {pos} shows it.</think><answer>[{pos}]</answer>"
        rows.append({"query": f"item {i}", "images": images, "positives": [pos], "response": response})
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "eval.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "response"}) + "\n"
                                          for r in rows[:3]))
    return d


def test_schedule():
    lrs = [learning_rate(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine decay never rises


def test_sft_loss_is_cross_entropy_on_response_tokens(tiny_model_dirs, sft_data):
    path = tiny_model_dirs["qwen2_5_vl"]
    model, proc = Qwen2VL.from_pretrained(path), Processor.from_pretrained(path)
    samples = read_samples(sft_data / "train.jsonl", require_response=True)[:3]
    batch = sft_batch(proc, samples)
    loss_sum, n = sft_loss(model, batch)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"]).logits
    expected, count = 0.0, 0
    for b, s in enumerate(samples):
        target = proc.encode(s.response) + [proc.im_end_id]  # the response and its closing <|im_end|>, nothing else
        ids = batch["input_ids"][b].tolist()
        start = max(i for i in range(len(ids)) if ids[i:i + len(target)] == target)
        for t in range(start, start + len(target)):
            expected += F.cross_entropy(logits[b, t - 1][None], torch.tensor([ids[t]])).item()
            count += 1
    assert n == count
    assert loss_sum.item() == pytest.approx(expected, rel=1e-5)


def run(argv):
    train_sft.main([str(a) for a in argv])


def common_args(model, data, out, steps=6):
    return ["--model", model, "--train", data / "train.jsonl", "--out", out, "--steps", steps, "--batch-size", 4,
            "--micro-batch-size", 2, "--lr", 1e-3, "--warmup-steps", 2, "--log-every", 1, "--save-every", 2]


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_resume_reproduces_the_uninterrupted_run(tiny_model_dirs, sft_data, tmp_path, monkeypatch):
    model = tiny_model_dirs["qwen2_5_vl"]
    run(common_args(model, sft_data, tmp_path / "full"))
    # The same run, stopped (as by Ctrl-C) after step 3, then started again: it resumes and must match exactly.
    real_order = interrupt_at_step(monkeypatch, train_sft, 3)
    run(common_args(model, sft_data, tmp_path / "resumed"))
    assert (tmp_path / "resumed" / "checkpoints" / "step-000003").exists()
    assert not (tmp_path / "resumed" / "model").exists()
    monkeypatch.setattr(train_sft, "sample_order", real_order)
    run(common_args(model, sft_data, tmp_path / "resumed"))
    assert losses(tmp_path / "full") == losses(tmp_path / "resumed")  # bit for bit
    a = Qwen2VL.from_pretrained(tmp_path / "full" / "model").state_dict()
    b = Qwen2VL.from_pretrained(tmp_path / "resumed" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "curve.png").exists()


@pytest.mark.parametrize("gpu_style", [[], ["--bf16", "on", "--grad-checkpointing"]], ids=["float32", "bf16"])
def test_lora_run_saves_a_merged_model_hf_loads(tiny_model_dirs, sft_data, tmp_path, gpu_style):
    """Also with a GPU recipe's bf16 autocast (the CUDA default) and gradient checkpointing, here on the CPU."""
    from transformers import AutoModelForImageTextToText

    model = tiny_model_dirs["qwen2_vl"]
    run(common_args(model, sft_data, tmp_path / "lora", steps=3) + ["--lora-rank", 4, "--freeze-vision",
                                                                    "--eval", sft_data / "eval.jsonl",
                                                                    "--eval-max-new-tokens", 8, *gpu_style])
    out = tmp_path / "lora" / "model"
    assert (out / "tokenizer.json").exists() and (out / "preprocessor_config.json").exists()
    ours = Qwen2VL.from_pretrained(out)
    base = Qwen2VL.from_pretrained(model)
    assert not torch.equal(ours.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(ours.visual.blocks[0].attn.qkv.weight, base.visual.blocks[0].attn.qkv.weight)  # frozen
    proc = Processor.from_pretrained(out)
    batch = proc.rerank_inputs(["q"], [page_images(2)])
    ref = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    inputs = {k: v for k, v in batch.items() if k not in ("prompt_lengths", "images_per_row")}
    with torch.no_grad():
        expected = ref(**inputs, mm_token_type_ids=(batch["input_ids"] == proc.image_pad_id).int()).logits
        got = ours(**inputs).logits
    assert (expected - got).abs().max() <= 1e-4
    summary = json.loads((tmp_path / "lora" / "summary.json").read_text())
    assert summary["eval_recall@1_before"] is not None and summary["eval_recall@1_after"] is not None


def test_final_model_keeps_the_base_dtype(tiny_model_dirs, sft_data, tmp_path):
    """A bfloat16 base (as the released Qwen models) gives a bfloat16 final model, not twice its size in float32;
    --save-dtype float32 keeps the trained weights whole. Both load in HF transformers."""
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    base = tmp_path / "bf16_base"
    source = tiny_model_dirs["qwen2_vl"]
    Qwen2VL.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(base, side_files_from=source)
    for flag, expected, stored in (("auto", torch.bfloat16, "BF16"), ("float32", torch.float32, "F32")):
        run(common_args(base, sft_data, tmp_path / flag, steps=1) + ["--lora-rank", 4, "--save-dtype", flag])
        out = tmp_path / flag / "model"
        with safe_open(out / "model.safetensors", "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {stored}
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(expected).removeprefix("torch.")
        assert AutoModelForImageTextToText.from_pretrained(out).dtype == expected


def test_broken_checkpoint_is_refused(tiny_model_dirs, sft_data, tmp_path, capsys):
    model = tiny_model_dirs["qwen2_5_vl"]
    run(common_args(model, sft_data, tmp_path / "r", steps=2))
    ckpt = tmp_path / "r" / "checkpoints" / "step-000002"
    (ckpt / "optimizer.safetensors").unlink()
    shutil.rmtree(tmp_path / "r" / "model")
    (tmp_path / "r" / "summary.json").unlink()
    with pytest.raises(SystemExit, match="incomplete: missing optimizer.safetensors"):
        run(common_args(model, sft_data, tmp_path / "r", steps=4))
    (ckpt / "optimizer.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(SystemExit, match="corrupt"):
        run(common_args(model, sft_data, tmp_path / "r", steps=4))


def test_bad_flags_and_data_are_one_line_errors(tiny_model_dirs, sft_data, tmp_path):
    model = tiny_model_dirs["qwen2_5_vl"]
    for extra in (["--lr", "-1"], ["--batch-size", "0"], ["--min-pixels", "5000", "--max-pixels", "100"]):
        r = subprocess.run([sys.executable, "train_sft.py", "--model", str(model), "--train",
                            str(sft_data / "train.jsonl"), "--out", str(tmp_path / "x"), *extra],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "error:" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "images": ["nope.png"], "positives": [1], "response": "x"}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:1"):
        run(["--model", model, "--train", bad, "--out", tmp_path / "y"])
