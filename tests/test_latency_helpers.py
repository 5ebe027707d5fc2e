"""The shared timing harness: CPU features read from the machine, interleaved repeats."""

from __future__ import annotations

from reparq.eval.latency import cpu_flags, cpu_isa, has_vnni, int8_instructions, time_interleaved


def test_cpu_features_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\nbugs\t: none\n")
    flags = cpu_flags(str(info))
    assert flags == {"fpu", "sse", "avx2", "avx512f", "avx512_vnni"}
    assert cpu_isa(flags) == "avx2=yes, avx512f=yes, avx512_vnni=yes, avx_vnni=no, amx_int8=no"
    assert int8_instructions(flags) == "AVX512-VNNI" and has_vnni(flags)
    assert int8_instructions({"avx2", "amx_int8"}) == "AMX"
    assert int8_instructions({"avx2"}) == "AVX2" and not has_vnni({"avx2"})
    assert cpu_flags(str(tmp_path / "missing")) == set() and cpu_isa(set()) == "unknown"


def test_variants_are_interleaved_with_a_rotating_start():
    order: list[str] = []
    runs = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    ms = time_interleaved(runs, repeats=3, inner=2, warmup=1)
    assert set(ms) == {"a", "b", "c"} and all(v >= 0 for v in ms.values())
    timed = order[3:]  # after one warm-up call each
    assert timed == ["a", "a", "b", "b", "c", "c", "b", "b", "c", "c", "a", "a", "c", "c", "a", "a", "b", "b"]
