"""The embedding model converted to GGUF gives the vectors of the original checkpoint (transformers + mean pooling,
as sentence-transformers computes all-MiniLM-L6-v2), one by one and batched."""

import numpy as np
import pytest

from node.memory.embed_model import MAX_TOKENS, package_folder
from node.memory.embedder import Embedder

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Unbelievably, tokenization splits naïve café-goers' words: 3.14159!",
    "federated learning " * 200,  # longer than 256 word pieces: cut as the original tokenizer cuts
    "a",
]


def reference(texts: list[str]) -> np.ndarray:
    import torch
    import transformers

    folder = package_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


def test_gguf_embeddings_equal_the_original_checkpoint(embedder: Embedder) -> None:
    # Arrange
    expected = reference(TEXTS)
    # Act
    batched = embedder.embed(TEXTS)
    single = np.stack([embedder.embed([t])[0] for t in TEXTS])
    # Assert
    assert batched.shape == (len(TEXTS), 384)
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    assert (batched * expected).sum(1).min() > 0.9999
    assert np.abs(batched - single).max() < 1e-3


def test_related_texts_are_closer_than_unrelated_ones(embedder: Embedder) -> None:
    # Act
    a, b, c = embedder.embed(["How do bees make honey?", "Honey is made by bees from nectar.", "Tax forms are due."])
    # Assert
    assert float(a @ b) > float(a @ c) + 0.3


def test_a_closed_model_refuses_instead_of_crashing(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Arrange
    e = Embedder(tmp_path_factory.mktemp("embed-closed"))
    e.close()
    # Act / Assert
    with pytest.raises(RuntimeError, match="closed"):
        e.embed(["anything"])
