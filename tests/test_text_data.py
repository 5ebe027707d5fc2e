"""English text from git-doc (markup stripping, sentences, the deterministic LM split), the text
metrics (embedding cosine, retrieval agreement, perplexity) and the LLaMA zoo checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from reparq.data import text
from reparq.errors import ReparqError
from reparq.eval.text_metrics import (embedding_cosine, nearest_neighbours, perplexity, retrieval_agreement,
                                     window_nll)

HTML = """<html><head><title>t</title><style>p { color: red }</style></head><body>
<h1>Title is not a paragraph</h1>
<p>Git is a <em>fast</em>,
   scalable &amp; distributed   revision control system.</p>
<table><tr><td><p>Inside a table: dropped.</p></td></tr></table>
<pre>$ git commit -m "code listing: dropped"</pre>
<div class="paragraph"><p>Use <code>git&nbsp;log</code> to see the history &mdash; it is fast.</p></div>
<p>   </p>
</body></html>"""

needs_corpus = pytest.mark.skipif(not text.TEXT_DIR.is_dir(), reason="git-doc not installed (make data)")


def test_html_paragraphs_strip_markup_tables_and_listings():
    assert text.html_paragraphs(HTML) == [
        "Git is a fast, scalable & distributed revision control system.",
        "Use git log to see the history \u2014 it is fast.",  # non-breaking space collapsed too
    ]


@pytest.mark.parametrize("paragraph, sentences", [
    ("One sentence here. Another one follows! Is this the third? Yes.",
     ["One sentence here.", "Another one follows!", "Is this the third?", "Yes."]),
    ("Options, e.g. --force, are rare. Dr. Who agrees, i.e. Nobody minds.",
     ["Options, e.g. --force, are rare.", "Dr. Who agrees, i.e. Nobody minds."]),
    ("Version 2.39.5 is out. see git.html for more.", ["Version 2.39.5 is out. see git.html for more."]),
    ('He said "stop." Then left.', ['He said "stop." Then left.']),
])
def test_split_sentences(paragraph, sentences):
    assert text.split_sentences(paragraph) == sentences


def test_split_paragraphs_is_deterministic_disjoint_and_complete():
    paragraphs = [f"paragraph {i}" for i in range(25)]
    train, held = text.split_paragraphs(paragraphs)
    assert held == ["paragraph 9", "paragraph 19"]
    assert len(train) == 23 and not set(train) & set(held) and sorted(train + held) == sorted(paragraphs)
    assert text.split_paragraphs(paragraphs) == (train, held)
    with pytest.raises(ReparqError):
        text.split_paragraphs(paragraphs, held_out_every=1)


def test_token_stream_and_windows():
    stream = text.token_stream(["ab", "c"], lambda s: [ord(ch) for ch in s], sep_id=0)
    assert stream.tolist() == [97, 98, 0, 99, 0]
    windows = text.token_windows(torch.arange(10), 4)
    assert windows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the incomplete tail is dropped
    with pytest.raises(ReparqError, match="too short"):
        text.token_windows(torch.arange(3), 4)


def test_missing_text_names_the_apt_command(tmp_path):
    with pytest.raises(ReparqError, match="apt-get install git-doc"):
        text.load_paragraphs(tmp_path / "absent")
    with pytest.raises(ReparqError, match="no HTML files"):
        text.html_files(tmp_path)


def test_reads_a_directory_in_sorted_order_and_dedupes(tmp_path):
    (tmp_path / "b.html").write_text("<p>Second file, first paragraph.</p><p>Part of the git suite.</p>")
    (tmp_path / "a.html").write_text("<p>First file paragraph.</p><p>Part of the git suite.</p>")
    assert text.load_paragraphs(tmp_path, min_words=1) == [
        "First file paragraph.", "Part of the git suite.", "Second file, first paragraph."]


@needs_corpus
def test_real_corpus_is_prose_and_deterministic():
    paragraphs = text.load_paragraphs()
    assert len(paragraphs) > 5000 and len(set(paragraphs)) == len(paragraphs)
    assert sum(len(p.split()) for p in paragraphs) > 200_000
    assert not any("<p>" in p or "</" in p for p in paragraphs[:2000])
    sentences = text.load_sentences(limit=500)
    assert len(sentences) == 500 and all(s[-1] in ".!?" and 6 <= len(s.split()) <= 40 for s in sentences)
    assert text.load_sentences(limit=500) == sentences
    train, held = text.split_paragraphs(paragraphs)
    assert len(held) == len(paragraphs) // 10 and not set(train) & set(held)
    assert text.corpus_version() != ""


# ---------------------------------------------------------------------------------------------
# Text metrics


def test_embedding_cosine_exact():
    fp = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    q = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    assert embedding_cosine(fp, q) == pytest.approx((1 / math.sqrt(2) + 1.0) / 2, abs=1e-12)
    with pytest.raises(ReparqError):
        embedding_cosine(fp, q[:1])


def test_retrieval_agreement_counts_changed_neighbours():
    fp = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    assert nearest_neighbours(fp).tolist() == [1, 0, 3, 2, 2]
    assert retrieval_agreement(fp, fp * 3) == 1.0
    moved = fp.clone()
    moved[3] = torch.tensor([0.95, 0.05])  # row 3 jumps next to rows 0 and 1
    assert nearest_neighbours(moved).tolist() == [3, 3, 1, 0, 2]
    assert retrieval_agreement(fp, moved) == pytest.approx(1 / 5)


class _FixedLM(nn.Module):
    """Logits that do not depend on the context: a known next-token distribution."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids):
        return self.logits.expand(*input_ids.shape, -1)


def test_perplexity_exact_on_known_distributions():
    ids = torch.randint(0, 8, (5, 7), generator=torch.Generator().manual_seed(0))
    assert perplexity(_FixedLM(torch.zeros(8)), ids, batch_size=2) == pytest.approx(8.0, rel=1e-6)
    # Probability 1/2 on token 0, the rest spread evenly: perplexity = 1 / p(token 0) on all-zero text.
    logits = torch.log(torch.tensor([0.5] + [0.5 / 7] * 7))
    assert perplexity(_FixedLM(logits), torch.zeros(3, 5, dtype=torch.long)) == pytest.approx(2.0, rel=1e-6)
    with pytest.raises(ReparqError):
        perplexity(_FixedLM(torch.zeros(8)), torch.zeros(3, 1, dtype=torch.long))


def test_window_nll_is_each_windows_own_mean_and_perplexity_their_exp_mean():
    # Window 0 is all token 0 (probability 1/2 each), window 1 all token 1 (probability 1/14).
    logits = torch.log(torch.tensor([0.5] + [0.5 / 7] * 7))
    ids = torch.stack([torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long)])
    nll = window_nll(_FixedLM(logits), ids, batch_size=1)
    assert nll.dtype == torch.float64 and nll.tolist() == pytest.approx([math.log(2), math.log(14)], rel=1e-6)
    assert perplexity(_FixedLM(logits), ids) == pytest.approx(math.sqrt(2 * 14), rel=1e-6)  # exp(mean log)


# ---------------------------------------------------------------------------------------------
# The LLaMA zoo checkpoint


@pytest.mark.parametrize("name, cls", [("llama_fm", "LlamaForCausalLM"), ("opt_fm", "OPTForCausalLM")])
def test_decoder_zoo_checkpoint_matches_its_card(name, cls):
    pytest.importorskip("transformers")
    from reparq.zoo.registry import card_path, checkpoint_path
    from reparq.zoo.train_lm import load_tokenizer

    if not checkpoint_path(name).exists():
        pytest.skip(f"{name} not trained yet (python -m reparq.zoo.train_lm --arch {name[:-3]})")
    from reparq.zoo import load_model

    card = json.loads(card_path(name).read_text())
    model = load_model(name)
    assert type(model).__name__ == cls and not model.training
    assert sum(p.numel() for p in model.parameters()) == card["params"]
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, stored once
    assert checkpoint_path(name).stat().st_size <= 10 * 2**20
    tok = load_tokenizer(name)
    sentence = "Git stores snapshots of your project."
    assert tok.decode(tok.encode(sentence).ids) == sentence
    # A trained model: the card's held-out perplexity is far below the uniform one (the vocabulary size).
    assert card["heldout_ppl"] < card["recipe"]["vocab_size"] / 20
