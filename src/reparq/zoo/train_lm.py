"""Train the zoo's decoders on Git's manual (Debian ``git-doc``): the LLaMA-architecture
``llama_fm`` and the OPT-architecture ``opt_fm``.

Usage: ``OMP_NUM_THREADS=1 python -m reparq.zoo.train_lm [--arch llama|opt] [--steps N] [--seed S]``.

Choices, and why:
- **Tokenizer**: a byte-level BPE of 4096 tokens trained on the *training* paragraphs with
  HF ``tokenizers`` (already a dependency of transformers). MiniLM's WordPiece has 30522
  entries: its embedding table alone (30522 x 256) would be 8M parameters, over the 10 MB
  budget, and it lower-cases. Bytes (no tokenizer) would make sequences 4x longer for the
  same text, and perplexity per byte is hard to compare with published LM numbers. A small
  BPE has no unknown tokens and keeps the embedding at 1M parameters, tied with the output
  layer. The tokenizer is committed next to the checkpoint, so loading never retrains it.
- **Model**: ``LlamaConfig`` hidden 256, 4 layers, 4 heads (no GQA), SwiGLU 768, RoPE,
  RMSNorm, tied embeddings: 4.46M parameters, stored as float16 (8.9 MB); the card's
  perplexity is measured after that rounding, on exactly the weights that load.
- **Training**: AdamW (lr 2e-3, betas 0.9/0.95, weight decay 0.1 on matrices), linear
  warm-up then cosine decay, gradient clipping 1.0, random 128-token windows of the
  training stream, a fixed number of steps (not a time limit, so the run is reproducible);
  one thread. 600 steps (1.2M tokens, ~2.5 passes over the text) take about 9 minutes of one
  core's CPU time; the card records CPU and wall seconds (on a shared machine the wall time is
  longer: other jobs take the core part of the time).
- **OPT** (``--arch opt``): the same data, tokenizer and schedule on ``OPTConfig`` hidden 256,
  4 layers, 4 heads, pre-LN LayerNorms with biases, ReLU MLP 1024 (two matrices of 256 x 1024 hold
  as many weights as LLaMA's three of 256 x 768), learned positions, biases on every Linear, tied
  embeddings, no dropout: the decoder whose norms (LayerNorm, with a bias to absorb the shift)
  and MLP (ReLU, non-negative fc2 inputs) differ from LLaMA's.
- **Held-out**: every 10th paragraph (``reparq.data.text.split_paragraphs``), cut into
  non-overlapping 128-token windows; the card records its perplexity.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from reparq.data.text import corpus_version, load_paragraphs, split_paragraphs, token_stream, token_windows
from reparq.errors import ReparqError
from reparq.model.hf_adapters import register_hf_attention
from reparq.zoo.registry import CHECKPOINT_DIR, card_path

NAME = "llama_fm"
EOS = "<|endoftext|>"


def tokenizer_path(name: str = NAME, directory: Path = CHECKPOINT_DIR) -> Path:
    return Path(directory) / f"{name}.tokenizer.json"


@dataclass(frozen=True)
class LMRecipe:
    architecture: str = "llama"  # or "opt"
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 600
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0


RECIPES = {"llama": LMRecipe(), "opt": LMRecipe(architecture="opt", intermediate_size=1024)}
MODEL_CLASSES = {"llama": "LlamaForCausalLM", "opt": "OPTForCausalLM"}


def lm_config(recipe: LMRecipe):
    """The transformers config of the recipe's architecture (eager attention, tied embeddings)."""
    if recipe.architecture == "llama":
        return llama_config(recipe)
    if recipe.architecture != "opt":
        raise ReparqError(f"unknown decoder architecture {recipe.architecture!r}; choose one of {', '.join(RECIPES)}")
    from transformers import OPTConfig

    return OPTConfig(vocab_size=recipe.vocab_size, hidden_size=recipe.hidden_size, ffn_dim=recipe.intermediate_size,
                     num_hidden_layers=recipe.num_hidden_layers, num_attention_heads=recipe.num_attention_heads,
                     max_position_embeddings=max(256, recipe.seq_len), word_embed_proj_dim=recipe.hidden_size,
                     do_layer_norm_before=True, activation_function="relu", dropout=0.0, attention_dropout=0.0,
                     layerdrop=0.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                     attn_implementation="eager")


def _model_class(recipe: LMRecipe):
    import transformers

    return getattr(transformers, MODEL_CLASSES[recipe.architecture])


def llama_config(recipe: LMRecipe):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=recipe.vocab_size, hidden_size=recipe.hidden_size,
                       intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.num_hidden_layers,
                       num_attention_heads=recipe.num_attention_heads, num_key_value_heads=recipe.num_attention_heads,
                       max_position_embeddings=max(256, recipe.seq_len), rms_norm_eps=1e-5, tie_word_embeddings=True,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation="eager")


def train_tokenizer(paragraphs: list[str], vocab_size: int):
    """Byte-level BPE on the training paragraphs; ``EOS`` (id 0) separates paragraphs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(paragraphs, trainer=trainer)
    return tok


def load_tokenizer(name: str = NAME, directory: Path = CHECKPOINT_DIR):
    from tokenizers import Tokenizer

    path = tokenizer_path(name, directory)
    if not path.exists():
        raise ReparqError(f"tokenizer {path} is missing; train the model with: python -m reparq.zoo.train_lm")
    return Tokenizer.from_file(str(path))


def lm_data(tokenizer, seq_len: int, root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(training token stream [L], held-out windows [N, seq_len]) of the git-doc text."""
    train_p, held_p = split_paragraphs(load_paragraphs(root))
    eos = tokenizer.token_to_id(EOS)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text).ids

    return token_stream(train_p, encode, eos), token_windows(token_stream(held_p, encode, eos), seq_len)


def heldout_windows(name: str = NAME, seq_len: int | None = None) -> torch.Tensor:
    """The held-out windows the card's perplexity was measured on (for benchmarks)."""
    card = json.loads(card_path(name).read_text())
    return lm_data(load_tokenizer(name), seq_len or card["recipe"]["seq_len"])[1]


def load_lm(name: str = NAME, directory: Path = CHECKPOINT_DIR) -> nn.Module:
    """A committed decoder checkpoint as a float32 causal LM of its card's architecture
    (``LlamaForCausalLM`` for ``llama_fm``) in eval mode, eager attention."""
    from safetensors.torch import load_file

    path, card = Path(directory) / f"{name}.safetensors", Path(directory) / f"{name}.json"
    if not path.exists() or not card.exists():
        raise ReparqError(f"zoo model {name!r} has no checkpoint at {path}; train it with: python -m reparq.zoo.train_lm")
    recipe = LMRecipe(**json.loads(card.read_text())["recipe"])
    model = _model_class(recipe)(lm_config(recipe))
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the output layer is tied to the embedding
        raise ReparqError(f"{path} does not match the card's architecture (missing {missing}, unexpected {unexpected}); "
                          f"retrain with: python -m reparq.zoo.train_lm --arch {recipe.architecture}")
    model.tie_weights()
    # No KV cache: the model is scored and calibrated on whole windows, and a cache object passed
    # down to the layers would be replayed by block reconstruction as if it were an input.
    model.config.use_cache = False
    register_hf_attention()  # so that reparq.quantize also quantizes its attention matmuls
    return model.eval()


def _lr(step: int, recipe: LMRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _log(msg: str) -> None:
    print(msg, flush=True)


def load_llama_fm() -> nn.Module:
    return load_lm("llama_fm")


def load_opt_fm() -> nn.Module:
    return load_lm("opt_fm")


def train(recipe: LMRecipe, seed: int = 0, log=_log, root: str | Path | None = None,
          out_dir: Path = CHECKPOINT_DIR, name: str = NAME) -> dict:
    from safetensors.torch import save_file

    from reparq.eval.text_metrics import perplexity

    torch.manual_seed(seed)
    train_p, _ = split_paragraphs(load_paragraphs(root))
    tokenizer = train_tokenizer(train_p, recipe.vocab_size)
    stream, held = lm_data(tokenizer, recipe.seq_len, root)
    log(f"{name}: {stream.numel()} training tokens, {held.shape[0]} held-out windows of {recipe.seq_len}")
    model = _model_class(recipe)(lm_config(recipe))
    model.config._attn_implementation = "sdpa"  # faster to train; eval and quantization use eager
    opt = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    start, cpu_start = time.time(), time.process_time()
    model.train()
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, recipe)
        offsets = torch.randint(0, stream.numel() - recipe.seq_len, (recipe.batch_size,), generator=gen)
        ids = torch.stack([stream[o:o + recipe.seq_len] for o in offsets.tolist()])
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        if step % 50 == 0 or step == recipe.steps - 1:
            log(f"step {step}/{recipe.steps} loss {loss.item():.3f} lr {_lr(step, recipe):.2e} "
                f"{time.time() - start:.0f}s wall, {time.process_time() - cpu_start:.0f}s cpu")
    train_seconds, cpu_seconds = round(time.time() - start), round(time.process_time() - cpu_start)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # float16 on disk (the tied output layer is the embedding, saved once).
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    ckpt = out_dir / f"{name}.safetensors"
    save_file(state, str(ckpt))
    tokenizer.save(str(out_dir / f"{name}.tokenizer.json"))
    arch = f" --arch {recipe.architecture}" if recipe.architecture != "llama" else ""
    card = {"name": name, "architecture": f"transformers.{MODEL_CLASSES[recipe.architecture]} "
                                          f"(reparq.zoo.train_lm.lm_config)",
            "command": f"OMP_NUM_THREADS=1 python -m reparq.zoo.train_lm{arch} --steps {recipe.steps} --seed {seed}",
            "seed": seed, "recipe": dataclasses.asdict(recipe)}
    (out_dir / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    # Perplexity of exactly what loads: the float16 weights back in float32, eager attention.
    loaded = load_lm(name, out_dir)
    ppl = perplexity(loaded, held)
    import transformers

    card.update({"heldout_ppl": round(ppl, 3), "heldout_tokens": int(held.numel()), "train_tokens": int(stream.numel()),
                 "tokens_seen": recipe.steps * recipe.batch_size * recipe.seq_len,
                 "final_train_loss": round(loss.item(), 4),
                 "params": sum(p.numel() for p in loaded.parameters()), "size_mb": round(ckpt.stat().st_size / 2**20, 2),
                 "train_seconds": train_seconds, "train_cpu_seconds": cpu_seconds,
                 "threads": torch.get_num_threads(),
                 "storage": "float16 safetensors, output layer tied to the embedding",
                 "tokenizer": f"{name}.tokenizer.json (byte-level BPE, {recipe.vocab_size} tokens, trained on the "
                              f"training paragraphs)",
                 "dataset": f"Git manual HTML, Debian git-doc {corpus_version(root)}; every 10th paragraph held out",
                 "torch": torch.__version__, "transformers": transformers.__version__})
    (out_dir / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    log(f"{name}: held-out perplexity {ppl:.2f}, {train_seconds}s")
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a zoo decoder (llama_fm, opt_fm) on Git's manual (git-doc).")
    parser.add_argument("--arch", choices=sorted(RECIPES), default="llama", help="llama -> llama_fm, opt -> opt_fm")
    parser.add_argument("--steps", type=int, default=LMRecipe.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the card's timing is for one core
    try:
        train(dataclasses.replace(RECIPES[args.arch], steps=args.steps), seed=args.seed, out_dir=args.out,
              name=f"{args.arch}_fm")
    except ReparqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
