"""mmr5: MM-R5, a multimodal reasoning reranker (Qwen2-VL / Qwen2.5-VL), in plain PyTorch.

The pipeline, each file importing only from the ones before it:
  data -> processor -> weights -> model -> lora -> sampler -> rewards -> reranker / ppo -> chains
`from mmr5 import Reranker` is the inference entry point; train_sft.py, train_ppo.py and evaluate.py the scripts;
`python -m mmr5.chains` makes SFT reasoning chains with a teacher model.
"""
from mmr5.reranker import Reranker, RerankResult

__all__ = ["Reranker", "RerankResult"]
