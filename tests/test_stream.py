"""Layer-streamed calibration (reparq.stream): equal to the in-memory recipe bit for bit, resumable
after an interruption, data-parallel over gloo, and bounded in memory."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import reparq
from reparq.deploy.serialize import export_state
from reparq.errors import ReparqError
from reparq.stream import LazyCheckpoint, quantize_streamed, write_sharded



def _llama(layers: int = 3, hidden: int = 32, inter: int = 64, tied: bool = False, seed: int = 0,
           family: str = "llama"):
    """A decoder the streamed path takes (``family``: llama, or mistral / qwen2 with LLaMA's layout,
    or opt)."""
    import transformers

    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "opt": "OPT"}[family]
    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=64, tie_word_embeddings=tied, attn_implementation="eager", use_cache=False)
    if family == "opt":  # pre-LN LayerNorms with biases, learned positions, ReLU MLP
        cfg = transformers.OPTConfig(ffn_dim=inter, word_embed_proj_dim=hidden, **common)
    else:
        cfg = getattr(transformers, f"{prefix}Config")(intermediate_size=inter, num_key_value_heads=2, **common)
    model = getattr(transformers, f"{prefix}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # Qwen2 initializes its q/k/v biases to zero (LLaMA has none)
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return model


def _ids(n: int = 20, t: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(seed))


def _saved(model, directory: Path, shard: str = "20KB") -> Path:
    model.save_pretrained(directory, max_shard_size=shard)
    return directory


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    meta = json.loads((out / "reparq.json").read_text())
    tensors = {}
    for shard in meta["shards"]:
        tensors.update(load_file(str(out / shard)))
    return tensors


RECIPES = {"repqvit": {}, "repquant": {"iters": 6, "clip_iters": 5}}


# W4A8: repquant's "auto" rounding is GPTQ there (repquant.gptq_for), which the streamed path must follow.
# Mistral and Qwen2 (biased q/k/v) have LLaMA's layer layout and names, so the streamed path takes them too;
# OPT adds learned positions to the embedding (run by the model's own forward) and LayerNorms with biases.
@pytest.mark.parametrize("recipe,tied,bits,family", [("repqvit", False, (4, 4), "llama"),
                                                     ("repquant", True, (4, 4), "llama"),
                                                     ("repquant", False, (4, 8), "llama"),
                                                     ("repquant", False, (4, 8), "qwen2"),
                                                     ("repquant", False, (4, 8), "mistral"),
                                                     ("repqvit", True, (4, 8), "opt"),
                                                     ("repquant", True, (4, 4), "opt")])
def test_streamed_equals_in_memory_bit_for_bit(tmp_path, recipe, tied, bits, family):
    w_bits, a_bits = bits
    model = _llama(tied=tied, family=family)
    src = _saved(model, tmp_path / "src")
    assert len(LazyCheckpoint(src).weight_map) > 0 and (src / "model.safetensors.index.json").exists()  # sharded
    ids = _ids()
    q = reparq.quantize(model, {"input_ids": ids}, recipe=recipe, w_bits=w_bits, a_bits=a_bits, batch_size=8,
                        **RECIPES[recipe])
    _, expected = export_state(q)
    res = quantize_streamed(src, ids, tmp_path / "out", recipe=recipe, w_bits=w_bits, a_bits=a_bits, batch_size=8,
                            **RECIPES[recipe])
    got = _tensors(res.out_dir)
    assert set(got) == set(expected)
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    assert any(k.endswith(".weight_int") for k in got)
    if family == "qwen2":
        assert got["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0
    if family == "opt":  # the learned positions are carried over as they are
        assert torch.equal(got["model.decoder.embed_positions.weight"], model.model.decoder.embed_positions.weight)
    loaded = reparq.load(res.out_dir)  # builds the architecture from the source's config.json
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, q(input_ids=ids).logits)


def test_interrupted_run_resumes_and_matches(tmp_path):
    src = _saved(_llama(layers=4), tmp_path / "src")
    ids = _ids()
    opts = dict(recipe="repquant", w_bits=4, a_bits=4, batch_size=8, **RECIPES["repquant"])
    full = quantize_streamed(src, ids, tmp_path / "full", **opts)

    def interrupt(step: int) -> None:
        if step == 1:
            raise KeyboardInterrupt  # as Ctrl-C after the second layer was saved

    with pytest.raises(KeyboardInterrupt):
        quantize_streamed(src, ids, tmp_path / "cut", on_step_done=interrupt, **opts)
    assert not (tmp_path / "cut" / "reparq.json").exists()
    resumed = quantize_streamed(src, ids, tmp_path / "cut", **opts)
    assert resumed.resumed_at == 2 and full.resumed_at == 0
    a, b = _tensors(full.out_dir), _tensors(resumed.out_dir)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # Another run's state is not silently mixed in; restart starts over.
    with pytest.raises(ReparqError, match="another run"):
        quantize_streamed(src, ids, tmp_path / "cut", **{**opts, "w_bits": 8})
    again = quantize_streamed(src, ids, tmp_path / "cut", restart=True, **{**opts, "w_bits": 8})
    assert again.resumed_at == 0


def test_killed_process_resumes(tmp_path):
    """SIGKILL (no cleanup at all) in the middle of a run: the rerun picks up the last saved step."""
    import subprocess
    import sys
    import time

    src = _saved(_llama(layers=6, hidden=64, inter=128), tmp_path / "src")
    ids = _ids(n=32)
    torch.save(ids, tmp_path / "ids.pt")
    script = (f"import torch; from reparq.stream import quantize_streamed; import time\n"
              f"quantize_streamed({str(src)!r}, torch.load({str(tmp_path / 'ids.pt')!r}), {str(tmp_path / 'out')!r}, "
              f"recipe='repquant', w_bits=4, a_bits=4, batch_size=8, iters=40, clip_iters=20, "
              f"on_step_done=lambda s: time.sleep(0.3))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    progress = tmp_path / "out" / ".stream-state" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and json.loads(progress.read_text())["next_step"] >= 2:
            proc.kill()
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode != 0, "the run finished before it could be killed"
    resumed = quantize_streamed(src, ids, tmp_path / "out", recipe="repquant", w_bits=4, a_bits=4, batch_size=8,
                                iters=40, clip_iters=20)
    assert resumed.resumed_at >= 2
    full = quantize_streamed(src, ids, tmp_path / "full", recipe="repquant", w_bits=4, a_bits=4, batch_size=8,
                             iters=40, clip_iters=20)
    a, b = _tensors(full.out_dir), _tensors(resumed.out_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dp_worker(rank: int, world: int, port: int, src: str, out: str, recipe: str, ids: torch.Tensor) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    from reparq.parallel import data_parallel

    with data_parallel("gloo"):
        quantize_streamed(src, ids, out, recipe=recipe, w_bits=4, a_bits=4, batch_size=8, **RECIPES[recipe])


@pytest.mark.parametrize("recipe", ["repqvit", "repquant"])
def test_two_process_gloo_matches_one_process(tmp_path, recipe):
    """Statistics are gathered in rank order (= single-process order), and gradients summed over
    ranks: repqvit is bit for bit equal; repquant has the same integer weights, and its float
    tensors differ at most by float rounding of the gradient sums (relative 1e-5)."""
    src = _saved(_llama(), tmp_path / "src")
    ids = _ids(n=48)
    single = quantize_streamed(src, ids, tmp_path / "one", recipe=recipe, w_bits=4, a_bits=4, batch_size=8,
                               **RECIPES[recipe])
    mp.spawn(_dp_worker, args=(2, _free_port(), str(src), str(tmp_path / "two"), recipe, ids), nprocs=2)
    a, b = _tensors(single.out_dir), _tensors(tmp_path / "two")
    assert set(a) == set(b)
    ints = [k for k in a if k.endswith(".weight_int")]
    assert ints and all(torch.equal(a[k], b[k]) for k in ints)
    if recipe == "repqvit":
        assert all(torch.equal(a[k], b[k]) for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "two" / "reparq.json").read_text())["info"]["extra"]["world_size"] == 2


_PEAK_SCRIPT = """
import sys, torch
from pathlib import Path
from reparq.stream import quantize_streamed
def status(key):
    return next(int(l.split()[1]) / 1024 for l in Path('/proc/self/status').read_text().splitlines() if l.startswith(key))
ids = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(1))
# A run on a one-layer model first: imports and one-time set-up are not the measured run's.
quantize_streamed(sys.argv[3], ids, sys.argv[2] + '-warm', recipe='repqvit', w_bits=8, a_bits=8, batch_size=8)
before = status('VmRSS:')
open('/proc/self/clear_refs', 'w').write('5')  # restart the high-water mark here
quantize_streamed(sys.argv[1], ids, sys.argv[2], recipe='repqvit', w_bits=8, a_bits=8, batch_size=8)
print(status('VmHWM:') - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_streamed_memory_stays_near_one_layer(tmp_path):
    """24 layers of ~8.8 MB each (212 MB of weights), each run in a fresh process after a warm-up
    run: the streamed run's peak memory stays under half the model, and going from 4 to 24 layers
    adds less than half of the weights added."""
    import subprocess
    import sys

    def run(layers: int) -> tuple[float, float]:
        model = _llama(layers=layers, hidden=384, inter=1536)
        model_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20
        src = _saved(model, tmp_path / f"src{layers}", shard="8MB")
        proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(src), str(tmp_path / f"out{layers}"), str(warm)],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return float(proc.stdout.strip().splitlines()[-1]), model_mb

    warm = _saved(_llama(layers=1, hidden=384, inter=1536), tmp_path / "warm", shard="8MB")
    shallow, shallow_mb = run(4)
    deep, deep_mb = run(24)
    assert deep_mb > 200
    # Measured: +24 MB (4 layers, 35 MB of weights) and +87 MB (24 layers, 212 MB). What does grow is
    # bookkeeping of ~3 MB per layer (quantizer modules, allocator), which a real layer (hundreds of
    # MB) dwarfs: benchmarks/results/scale.md. An in-memory path would grow by the weights themselves.
    assert deep < deep_mb / 2, (deep, deep_mb)
    assert deep - shallow < (deep_mb - shallow_mb) / 2, (deep, shallow)


def test_sharded_writer_and_reader_round_trip(tmp_path):
    tensors = {f"t{i}": torch.full((256, 256), float(i)) for i in range(5)}  # 256 KiB each
    shards = write_sharded(iter(tensors.items()), tmp_path, max_shard_mb=0.6)
    assert len(shards) == 3
    ckpt = LazyCheckpoint(tmp_path)
    got = ckpt.load(["t4", "t0"])
    assert torch.equal(got["t4"], tensors["t4"]) and torch.equal(got["t0"], tensors["t0"])
    (tmp_path / shards[1]).unlink()
    with pytest.raises(ReparqError, match="missing"):
        LazyCheckpoint(tmp_path)


def test_clear_errors(tmp_path):
    with pytest.raises(ReparqError, match="config.json"):
        quantize_streamed(tmp_path, _ids(), tmp_path / "out")
    src = _saved(_llama(), tmp_path / "src")
    with pytest.raises(ReparqError, match="supports the recipes"):
        quantize_streamed(src, _ids(), tmp_path / "out", recipe="qdrop")
    with pytest.raises(ReparqError, match="token ids"):
        quantize_streamed(src, torch.randn(4, 8), tmp_path / "out")
    import transformers

    base = dict(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=64)
    post_ln = transformers.OPTForCausalLM(transformers.OPTConfig(do_layer_norm_before=False, **base))
    with pytest.raises(ReparqError, match="pre-LN OPT only"):
        quantize_streamed(_saved(post_ln, tmp_path / "post"), _ids(), tmp_path / "out")
    projected = transformers.OPTForCausalLM(transformers.OPTConfig(word_embed_proj_dim=16, **base))
    with pytest.raises(ReparqError, match="project_out, .*project_in outside the layers would be left unquantized"):
        quantize_streamed(_saved(projected, tmp_path / "proj"), _ids(), tmp_path / "out")
    bert = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                                num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ReparqError, match="pre-LN OPT, not"):
        quantize_streamed(_saved(bert, tmp_path / "bert"), _ids(), tmp_path / "out")


def test_cli_stream_matches_api_and_refuses_missing_gpu(tmp_path, capsys):
    from safetensors.torch import save_file

    from reparq.cli import main

    src = _saved(_llama(), tmp_path / "src")
    ids = _ids()
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    argv = ["stream", str(src), "--calib", f"tensor:{tmp_path / 'ids.safetensors'}", "--calib-size", "20",
            "--batch-size", "8", "--w-bits", "4", "--a-bits", "4", "-q"]
    assert main(argv + ["--out", str(tmp_path / "cli")]) == 0
    assert "4 steps (3 layers + head)" in capsys.readouterr().out
    api = quantize_streamed(src, ids, tmp_path / "api", w_bits=4, a_bits=4, batch_size=8)
    a, b = _tensors(api.out_dir), _tensors(tmp_path / "cli")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    if not torch.cuda.is_available():
        assert main(argv + ["--out", str(tmp_path / "gpu"), "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
