"""The quality probes and the report renderer of `quire bench runtime`."""

from __future__ import annotations

from bench import probes
from bench.report import runtime_markdown


def test_scoring_matches_whole_words_only():
    assert probes.answer_is_correct("She kept it for 19 years.", ("nineteen", "19"))
    assert not probes.answer_is_correct("It was built in 1961.", ("nineteen", "19"))
    assert probes.answer_is_correct("On Thursdays.", ("thursday",))
    assert not probes.answer_is_correct("Andersen did.", ("anders",))


def test_passkey_prompt_hits_its_length_and_depth():
    def count(text: str) -> int:  # a whitespace "tokenizer" is enough to check the arithmetic
        return len(text.split())

    text, key = probes.passkey_prompt(count, 2000, depth=0.25, seed=5)
    assert 1900 <= count(text) <= 2000
    assert text.count(key) == 2 and len(key) == 5
    assert 0.2 < text.index(key) / len(text) < 0.3
    assert probes.passkey_prompt(count, 2000, 0.25, 5)[1] == key


def test_report_renders_ratios_from_the_json():
    def run(tps, decode):
        return {"load_seconds": 1.0, "prefill": {"512": {"tokens_per_second": tps, "seconds": 512 / tps}},
                "decode": {"tokens_per_second": decode, "token_ids": [1, 2]}, "peak_rss_mb": 100}

    report = {
        "machine": {"platform": "test", "cpu_count": 2, "torch_threads": 2, "matmul_fp32_gflops": 100.0,
                    "matmul_bf16_gflops": 300.0, "memory_read_gbs": 20.0},
        "models": {"m": {
            "quire": {"bfloat16": run(300.0, 30.0)},
            "transformers": {"bfloat16": run(200.0, 10.0), "float32": run(100.0, 15.0)},
            "derived": {"bfloat16": {"prefill_vs_same_dtype": {"512": 1.5}, "decode_vs_same_dtype": 3.0,
                                     "prefill_fraction_of_matmul_peak": {"512": 0.5},
                                     "decode_fraction_of_bandwidth_bound": 0.25,
                                     "decode_same_tokens_as_transformers": True}},
        }},
    }
    text = runtime_markdown(report)
    assert "| m | quire | bfloat16 | 1.00 | 300 | 30.0 | 100 |" in text
    assert "512: 1.50x" in text and "512: 3.00x" in text  # same dtype, and against fp32
    assert "2.00x" in text  # decode 30 vs fp32 15


def test_llama_cpp_peer_ratios_and_rows():
    """bench runtime's llama.cpp peer: ratios derived from the measurements (Quire
    quantised has no transformers counterpart) and rendered as their own table."""
    from bench.runtime import _derive

    def run(tps, decode, rss):
        return {"load_seconds": 2.0, "prefill": {"512": {"tokens_per_second": tps, "seconds": 512 / tps}},
                "decode": {"tokens_per_second": decode, "token_ids": [1], "bytes_per_token": 4e8},
                "peak_rss_mb": rss, "flops_per_token_linear": 10**9, "attention_flops_coefficient": 1000}

    entry = {"quire": {"quantised": run(400.0, 25.0, 900)}, "transformers": {},
             "llama.cpp": run(160.0, 20.0, 600) | {"load_seconds": 0.5}}
    _derive(entry, {"memory_read_gbs": 20.0, "matmul_bf16_gflops": 300.0})
    d = entry["derived"]["quantised"]
    assert d["prefill_vs_llama_cpp"] == {"512": 2.5}
    assert d["decode_vs_llama_cpp"] == 1.25 and d["load_vs_llama_cpp"] == 4.0 and d["peak_rss_vs_llama_cpp"] == 1.5
    report = {"machine": {"platform": "test", "cpu_count": 2}, "models": {"m": entry}}
    text = runtime_markdown(report)
    assert "| m | llama.cpp | GGUF | 0.50 | 160 | 20.0 | 600 |" in text
    assert d["decode_same_tokens_as_llama_cpp"] is True
    assert "| m | quantised | 512: 2.50x | 1.25x | 4.00x | 1.50x | True |" in text
