"""The benchmark's FLOP count (bench/common.py), against hand-worked values and a per-token loop.

The FLOP/s fraction the README quotes is only as honest as this count: it must charge each prompt
once per group and each completion up to its EOS, nothing for padding.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import forward_flops, step_flops  # noqa: E402

DIMS = dict(d=2, L=1, V=3, matmul_params=10)


def test_forward_flops_by_hand():
    # 2 new tokens after 2 cached ones: linear 2*10*2 = 40; contexts 3 and 4 -> attention 4*2*1*7 = 56.
    assert forward_flops(DIMS, rows=1, new=2, past=2) == 96
    # A 2-token prompt from scratch: linear 40; contexts 1 and 2 -> 4*2*3 = 24.
    assert forward_flops(DIMS, rows=1, new=2) == 64


def test_step_flops_by_hand():
    # One prompt of 2 tokens, one completion of 3 tokens (2 fed): one forward = 64 + 96 = 160;
    # generation + reference + forward and backward of the update = 5 forwards.
    f = step_flops(DIMS, [2], 1, [3])
    assert f["generation"] == f["logprobs"] == 160 and f["update"] == 480 and f["total"] == 800


def test_step_flops_equals_a_per_token_loop():
    dims = dict(d=8, L=3, V=5, matmul_params=1000)
    prompt_lengths, G, lengths = [4, 6], 3, [1, 5, 2, 7, 0, 3]

    def token(ctx):  # one token that attends to ctx positions (itself included)
        return 2 * dims["matmul_params"] + 4 * dims["d"] * dims["L"] * ctx

    fwd = 0
    for p, Lp in enumerate(prompt_lengths):
        fwd += sum(token(j + 1) for j in range(Lp))  # the prompt, once for its group
        for n in lengths[p * G:(p + 1) * G]:
            fwd += sum(token(Lp + j + 1) for j in range(max(n - 1, 0)))  # all completion tokens but the last
    assert step_flops(dims, prompt_lengths, G, lengths)["total"] == 5 * fwd


def test_gpu_benchmark_path_runs_on_cpu_with_a_tied_qwen2_in_bf16(tmp_path, capsys, one_thread):
    """The qwen0.5b benchmark's code (a Qwen2 with tied embeddings built from a config, bf16
    compute over float32 weights, the update phase's FLOP/s) on a tiny model, so it cannot rot
    while no GPU is at hand to run it for real."""
    import json

    from bench.bench_vs_trl import summarise
    from bench.common import model_dims, save_qwen2
    from bench.workers import main

    d = save_qwen2(tmp_path / "q", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=64, vocab_size=300, max_positions=256)
    dims = model_dims(d)
    assert dims["V"] == 300 and dims["matmul_params"] == 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64) + 32 * 300
    main(["ours", "--model", str(d), "--steps", "2", "--warmup", "0", "--dtype", "bfloat16", "--threads", "1",
          "--prompts", "2", "--group", "4", "--tokens", "6"])
    result = json.loads(capsys.readouterr().out.split("RESULT ", 1)[1])
    assert len(result["steps"]) == 2 and all(s["tokens"] > 0 for s in result["steps"])
    s = summarise([result], dims, group=4)
    assert s["update_flops_per_s"] > 0 and s["gen_tokens_per_s"] > 0
