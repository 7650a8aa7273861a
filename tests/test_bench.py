"""bench.py's logic at tiny sizes (`--dry-run`): the JSON of `bench.py llama --json`, `bench.py gpu` on the CPU,
and a --help that shows the defaults. The numbers themselves are for a quiet machine, not for tests."""
import json
import shutil

import pytest

import bench

ROW_KEYS = {"name", "prefill_tok_s", "decode_tok_s", "weight_bytes_per_token", "decode_bound_tok_s",
            "fraction_of_bound"}

def run_json(capsys, *argv) -> dict:
    returned = bench.main([*argv, "--json", "--dry-run", "--repeats", "1"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(returned))
    return printed

def test_llama_json_schema(capsys):
    result = run_json(capsys, "llama")["llama"]
    names = [r["name"] for r in result["rows"]]
    assert names[:3] == ["ours fp32", "ours bf16", "ours int8"]
    assert set(names[3:]) <= {"transformers fp32", "transformers bf16"}
    for row in result["rows"]:
        assert ROW_KEYS | {"dtype", "greedy_same_as_ours_fp32"} <= set(row)
        assert row["prefill_tok_s"] > 0  # (decode at tiny sizes is a difference of two noisy times: any sign)
        # the bound is the measured copy bandwidth over the bytes streamed: the fraction follows from the two
        assert row["fraction_of_bound"] == pytest.approx(row["decode_tok_s"] / row["decode_bound_tok_s"])
    bytes_of = {r["name"]: r["weight_bytes_per_token"] for r in result["rows"]}
    assert bytes_of["ours int8"] < bytes_of["ours bf16"] < bytes_of["ours fp32"]
    assert result["copy_bandwidth_GBps"] > 0 and result["threads"] >= 1
    assert "ours int8 / ours fp32" in result["ratios"] and "ours bf16 / ours fp32" in result["ratios"]
    for kind in ("bf16", "int8"):
        quality = result["fixture"][kind]
        assert 0 <= quality["greedy_same"] <= quality["greedy_of"] == 16 and quality["max_logit_drift"] >= 0

@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_llama_compile_rows(capsys):
    """--compile adds each of ours with its decode step compiled: same bytes per token, fp32's greedy tokens kept."""
    result = run_json(capsys, "llama", "--compile")["llama"]
    rows = {r["name"]: r for r in result["rows"]}
    for name in ("ours fp32", "ours bf16", "ours int8"):
        assert rows[f"{name} compiled"]["weight_bytes_per_token"] == rows[name]["weight_bytes_per_token"]
    assert rows["ours fp32 compiled"]["greedy_same_as_ours_fp32"] == result["new_tokens"] + 1
    assert {"ours int8 compiled / ours fp32 compiled", "ours fp32 compiled / ours fp32"} <= set(result["ratios"])

def test_gpu_dry_run(capsys):
    result = run_json(capsys, "gpu")["gpu"]
    assert result["device"] == "cpu (dry run)"
    names = [r["name"] for r in result["llm"]]
    assert names[:2] == ["ours float32", "ours int8"]
    assert all(ROW_KEYS <= set(r) for r in result["llm"])
    assert {"unet_step ours_s", "vae_decode_s", "seed_encode_s"} <= set(result)
    # the pipeline ran resident and with --low-vram's placement; memory is only counted on a GPU
    assert result["pipeline_peak_GiB"] == {"resident": None, "low_vram": None}

def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "CPU threads (default 2)" in text and "the best kept (default 3)" in text and "--dry-run" in text

def test_json_refuses_a_table_only_benchmark(capsys):
    with pytest.raises(SystemExit):
        bench.main(["unet", "--json"])
    assert "--json applies to" in capsys.readouterr().err

def test_length_grouped_loss_equals_one_padded_batch():
    """train.llm_loss (sorted micro-batches, the head on labelled positions only) gives the old recipe's loss and
    gradients: bench.py train times the two as the same computation."""
    import torch
    import llama
    import train
    torch.manual_seed(0)
    model = llama.Llama(llama.LlamaConfig.preset("tiny"))
    rows = []
    for n in (7, 19, 12, 19, 5, 30):
        ids = torch.randint(1, 700, (n,)).tolist()
        rows.append((ids, [train.IGNORE] * (n // 2) + ids[n // 2:]))
    old = bench.padded_llm_loss(model, rows, pad_id=0)
    grad_old = torch.autograd.grad(old, model.lm_head.weight)[0]
    for micro_batches in (1, 3, 6):
        new = train.llm_loss(model, rows, 0, "cpu", micro_batches)
        torch.testing.assert_close(new, old)
        torch.testing.assert_close(torch.autograd.grad(new, model.lm_head.weight)[0], grad_old)
    with pytest.raises(ValueError, match="micro-batches"):
        train.llm_loss(model, rows, 0, "cpu", 0)
