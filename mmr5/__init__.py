"""mmr5: MM-R5, a multimodal reasoning reranker (Qwen2-VL / Qwen2.5-VL), in plain PyTorch.

The pipeline, each stage importing only from the ones before it (the model is layers + vision + weights, adapted
by lora; sft is the stage before ppo; metrics / reranker / report evaluate; run, runlog, checkpoint, plots and
distributed are the scripts' scaffold; synthetic, tokenizer_build and chains make data):
  data -> processor -> model -> sampler -> rewards -> ppo
`from mmr5 import Reranker` is the inference entry point; train_sft.py, train_ppo.py and evaluate.py the scripts;
`python -m mmr5.chains` makes SFT reasoning chains with a teacher model.
"""
from mmr5.reranker import Reranker, RerankResult

__all__ = ["Reranker", "RerankResult"]
