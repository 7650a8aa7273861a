"""bench.py: speed of our models against the reference implementations, random weights, side by side in one run.

    python bench.py [llama] [llama_load] [unet] [train] [gpu] [--threads 2] [--repeats 3] [--json] [--compile]
                    [--dry-run]

Each `bench_<name>(args)` builds both implementations with the same weights, checks that they agree, times them
(best of --repeats rounds after a warm-up, the contenders taking turns within a round) and prints a table or, with
--json, returns one object for `{name: result}`. `llama`: transformers fp32 / bf16 against ours fp32 / bf16 / int8
(with `--compile` also each of ours with its decode step compiled), with the weight bytes each decoded token
streams and a memory copy timed in the same rounds, so that each decode rate is also a fraction of the bandwidth
bound. `llama_load`: the loader's peak host RAM. `unet`: one CFG step against diffusers. `train`: one step of
train.py's stages, the old recipe against the current one. `gpu`: the full-size models on CUDA (skipped without
one); `--dry-run` runs `llama` and `gpu` at tiny sizes on the CPU. A benchmark whose reference library is absent
says so and runs ours alone or is skipped. Run on a quiet machine.
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

import llama
import seed
import unet
import weights
from safetensors.torch import load_file

from weights import write_json

def sync() -> None:
    """Wait for queued CUDA work, so that a timing covers the work and not only its launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()

def best_times(runs: dict, repeats: int) -> dict:
    """Best wall time (s) of each function in `runs` over `repeats` rounds after a warm-up round. The functions
    take turns within a round, so a burst of load from other processes hits them alike."""
    times = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if round_ > 0:
                times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}

def streamed_bytes(model: llama.Llama) -> int:
    """Bytes of weights one decoded token reads: every weight of the blocks and the head (int8 ones with their
    scales), and one row of the embedding table; not the rotary tables or the KV cache."""
    emb = model.model.embed_tokens.weight
    tensors = [t for name, t in [*model.named_parameters(), *model.named_buffers()]
               if t is not emb and not name.startswith("rope_") and ".cache." not in name]
    return sum(t.numel() * t.element_size() for t in tensors) + emb[0].numel() * emb.element_size()

def copy_bandwidth_runs(n_bytes: int, device="cpu") -> tuple[dict, int]:
    """A memory-copy run for best_times and the bytes it moves (read + write): the bandwidth a decode step that
    streams its weights once can at best reach."""
    src = torch.ones(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    return {"memcpy": lambda: dst.copy_(src)}, 2 * src.numel() * 4

# The benchmark LLaMA: SEED-LLaMA's vocabulary and layout at an eighth of its depth and a quarter of its width.
LLAMA_BENCH = dict(vocab_size=40194, dim=1024, n_layers=8, n_heads=16, ffn_dim=2816)
LLAMA_DRY_RUN = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_dim=128)  # --dry-run: the logic only

def hf_llama_config(transformers, cfg: llama.LlamaConfig):
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, intermediate_size=cfg.ffn_dim,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        attn_implementation="sdpa", bos_token_id=None, eos_token_id=None, pad_token_id=None)

def llama_variants(cfg: llama.LlamaConfig, transformers, compiled: bool) -> dict:
    """{name: (model, dtype, is_ours)}: ours in fp32, bf16 and int8 (bf16 activations), each also with its decode
    step compiled if `compiled`, and, when installed, transformers' LlamaForCausalLM in fp32 and bf16, all with the
    same random weights."""
    torch.manual_seed(0)
    ours = llama.Llama(cfg).eval()
    out = {"ours fp32": (ours, "float32", True), "ours bf16": (copy.deepcopy(ours).bfloat16(), "bfloat16", True),
           "ours int8": (llama.quantize_int8(copy.deepcopy(ours).bfloat16()), "int8", True)}
    if compiled:
        out |= {f"{name} compiled": (copy.deepcopy(model).compile_decode(), dtype, True)
                for name, (model, dtype, _) in out.items()}
    if transformers is not None:
        ref = transformers.LlamaForCausalLM(hf_llama_config(transformers, cfg)).eval()
        ref.load_state_dict(ours.state_dict())  # same key names: the same weights in both
        out["transformers fp32"] = (ref, "float32", False)
        out["transformers bf16"] = (copy.deepcopy(ref).bfloat16(), "bfloat16", False)
    return out

def bench_llama(args) -> dict:
    """Ours (fp32, bf16, int8) against transformers' LlamaForCausalLM (fp32, bf16), all through their public
    generate(): prefill of a 256-token prompt and greedy decode of 64 tokens (decode rate = 64 / (t(1 + 64 new
    tokens) - t(1 new token))), and a memory copy in the same rounds: the bound of a decode that streams its
    weights once per token is bandwidth / bytes per token."""
    try:
        import transformers
    except ImportError:
        transformers = None
        print("llama: transformers is not installed (pip install -r requirements-dev.txt): ours only")
    cfg = llama.LlamaConfig(**(LLAMA_DRY_RUN if args.dry_run else LLAMA_BENCH))
    prompt_len, new_tokens = (16, 8) if args.dry_run else (256, 64)
    variants = llama_variants(cfg, transformers, args.compile)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    runs, moved = copy_bandwidth_runs(2**20 if args.dry_run else 256 * 2**20)
    runs |= llm_runs({name: (m, o) for name, (m, _, o) in variants.items()}, prompt, new_tokens)
    with torch.inference_mode():
        tokens = {name: runs[name, 1 + new_tokens]() for name in variants}
        t = best_times(runs, args.repeats)
    bandwidth = moved / t["memcpy"]
    bytes_of = {dtype: streamed_bytes(m) for m, dtype, o in variants.values() if o}
    rows = llm_rows(t, variants, prompt_len, new_tokens, {n: bytes_of[d] for n, (_, d, _) in variants.items()},
                    bandwidth)
    for r in rows:
        r.update(dtype=variants[r["name"]][1],
                 greedy_same_as_ours_fp32=sum(a == b for a, b in zip(tokens[r["name"]], tokens["ours fp32"])))
    return dict(benchmark="llama", config=dataclasses.asdict(cfg), prompt_tokens=prompt_len, new_tokens=new_tokens,
                threads=torch.get_num_threads(), repeats=args.repeats, torch=torch.__version__,
                transformers=getattr(transformers, "__version__", None), copy_bandwidth_GBps=bandwidth / 1e9,
                rows=rows, ratios=llama_ratios(rows), fixture=llama_fixture_quality())

def llama_ratios(rows: list[dict]) -> dict:
    """The comparisons the speed section reports, decode tok/s over decode tok/s (those whose rows exist)."""
    decode = {r["name"]: r["decode_tok_s"] for r in rows}
    pairs = [("ours bf16", "ours fp32"), ("ours int8", "ours fp32"), ("ours int8", "transformers bf16"),
             ("ours fp32", "transformers fp32"), ("ours bf16", "transformers bf16")]
    pairs += [("ours bf16 compiled", "ours fp32 compiled"), ("ours int8 compiled", "ours fp32 compiled"),
              ("ours int8 compiled", "transformers bf16"), ("ours fp32 compiled", "transformers fp32"),
              ("ours fp32 compiled", "ours fp32"), ("ours bf16 compiled", "ours bf16"),
              ("ours int8 compiled", "ours int8")]
    return {f"{a} / {b}": decode[a] / decode[b] for a, b in pairs if a in decode and b in decode}

def llama_fixture_quality() -> dict:
    """What bf16 and int8 cost on the reduced official-format checkpoint of the tests: the largest logit change
    over its 64-token prompt and how many of its 16 greedy tokens stay those of fp32."""
    folder = Path(__file__).resolve().parent / "tests" / "fixtures" / "llama"
    fp32 = llama.Llama.from_official(folder, device="cpu", dtype=torch.float32)
    prompt = load_file(folder / "ref.safetensors")["input_ids"]  # (1, 64)
    out = {}
    with torch.inference_mode():
        base_logits, base = fp32(prompt), fp32.generate(prompt.tolist(), max_new_tokens=16)[0]
        for name, model in (("bf16", copy.deepcopy(fp32).bfloat16()),
                            ("int8", llama.quantize_int8(copy.deepcopy(fp32).bfloat16()))):
            drift = (model(prompt).float() - base_logits).abs().max().item()
            same = sum(a == b for a, b in zip(model.generate(prompt.tolist(), max_new_tokens=16)[0], base))
            out[name] = dict(max_logit_drift=drift, max_logit=base_logits.abs().max().item(), greedy_same=same,
                             greedy_of=len(base))
    return out

def print_llama(result: dict) -> None:
    c = result["config"]
    print(f"\nLLaMA dim {c['dim']}, {c['n_layers']} layers, {c['n_heads']} heads, FFN {c['ffn_dim']}, vocab "
          f"{c['vocab_size']}, {result['threads']} threads, best of {result['repeats']}; transformers "
          f"{result['transformers']}; memory copy {result['copy_bandwidth_GBps']:.1f} GB/s")
    print(f"{'':18s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'MB/token':>9s} {'bound tok/s':>12s} "
          f"{'of bound':>9s} {'greedy = fp32':>14s}")
    for r in result["rows"]:
        print(f"{r['name']:18s} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.1f} "
              f"{r['weight_bytes_per_token'] / 1e6:9.1f} {r['decode_bound_tok_s']:12.1f} {r['fraction_of_bound']:9.2f} "
              f"{r['greedy_same_as_ours_fp32']:>8d}/{result['new_tokens'] + 1}")
    for name, ratio in result["ratios"].items():
        print(f"decode {name}: {ratio:.2f}x")
    for name, q in result["fixture"].items():
        print(f"fixture {name}: max logit drift {q['max_logit_drift']:.2e} (max |logit| {q['max_logit']:.2f}), "
              f"greedy {q['greedy_same']}/{q['greedy_of']} as fp32")

# Run in a fresh process per load: peak RSS growth while Llama.from_official reads a folder and the weights are used.
_LOAD_AND_REPORT_PEAK_RSS = """
import sys, torch
import llama
def status(key):  # bytes; /proc (Linux): ru_maxrss would carry over the parent's peak across fork + exec
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
before = status("VmRSS:")
model = llama.Llama.from_official(sys.argv[1], device="cpu", dtype=getattr(torch, sys.argv[2]))
for p in model.parameters():  # read every weight: memory-mapped pages only count once they are read
    p.sum()
print(sum(p.numel() * p.element_size() for p in model.parameters()), status("VmHWM:") - before)
"""

def bench_llama_load(args) -> None:
    """Peak host RAM of Llama.from_official: a reduced SEED-LLaMA (463M parameters) written in the two official
    layouts (two .bin shards with an index and the rotary_emb.inv_freq keys, fp32 as the 8B release, fp16 as the
    14B one), loaded in a fresh process for each target dtype. Linux only (reads /proc/self/status)."""
    if not os.path.exists("/proc/self/status"):
        print("llama_load: skipped, it reads /proc/self/status (Linux)")
        return
    cfg = llama.LlamaConfig(dim=1536, n_layers=12, n_heads=12, ffn_dim=4096)
    hf_config = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
                     num_attention_heads=cfg.n_heads, intermediate_size=cfg.ffn_dim, rms_norm_eps=cfg.norm_eps,
                     max_position_embeddings=cfg.max_seq_len)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in llama.Llama(cfg).state_dict().items()}
    shapes.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": (cfg.head_dim // 2,)
                   for i in range(cfg.n_layers)})
    names = sorted(shapes)
    print(f"\nLlama.from_official peak host RAM, {sum(torch.Size(s).numel() for s in shapes.values()) / 1e6:.0f}M "
          f"parameters in 2 shards (peak RSS growth of a fresh process; GiB)")
    print(f"{'files':12s} {'loaded as':10s} {'weights':>8s} {'peak RAM':>9s}")
    for stored in (torch.float32, torch.float16):
        with tempfile.TemporaryDirectory() as folder:
            weight_map = {}
            for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
                shard = f"pytorch_model-0000{i + 1}-of-00002.bin"
                torch.save({k: torch.randn(shapes[k]).mul_(0.02).to(stored) for k in part}, f"{folder}/{shard}")
                weight_map.update(dict.fromkeys(part, shard))
            write_json(Path(folder) / "pytorch_model.bin.index.json", {"metadata": {}, "weight_map": weight_map})
            write_json(Path(folder) / "config.json", {**hf_config, "torch_dtype": str(stored).removeprefix("torch.")})
            for target in ("float32", "float16"):
                out = subprocess.run([sys.executable, "-c", _LOAD_AND_REPORT_PEAK_RSS, folder, target],
                                     cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                                     text=True, check=True).stdout.split()
                weights, peak = (int(v) / 2**30 for v in out)
                print(f"{str(stored).removeprefix('torch.') + ' .bin':12s} {target:10s} {weights:8.2f} {peak:9.2f}")

def diffusers_unet(diffusers, cfg: unet.UNetConfig):
    """diffusers' UNet2DConditionModel in the SD-2.1-unclip layout (three cross-attention levels, then a plain one)."""
    return diffusers.UNet2DConditionModel(
        sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=cfg.attention_head_dim,
        cross_attention_dim=cfg.cross_attention_dim, class_embed_type="projection",
        projection_class_embeddings_input_dim=cfg.class_embed_dim, use_linear_projection=True,
        norm_num_groups=cfg.norm_num_groups).eval()

def bench_unet(args):
    """One classifier-free-guidance step of the unCLIP UNet (batch 2 = [uncond; cond]) against diffusers'
    UNet2DConditionModel: the official block layout and head size 64 with widths / 5 (64-128-256-256), 1024-d text
    states of 77 tokens, 2048-d class labels, 32 x 32 latents (256 px), so that it runs in seconds."""
    try:
        import diffusers
    except ImportError:
        print("unet: skipped, diffusers is not installed (pip install -r requirements-dev.txt)")
        return
    cfg = unet.UNetConfig(block_out_channels=(64, 128, 256, 256), attention_head_dim=(1, 2, 4, 4), sample_size=32)
    ref = diffusers_unet(diffusers, cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # diffusers zero-initialises some output layers; randomise every weight
        for p in ref.parameters():
            p.normal_(0, 0.02)
    ours = unet.UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict())  # the same key names: the same weights in both
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    text, labels = torch.randn(2, 77, cfg.cross_attention_dim), torch.randn(2, cfg.class_embed_dim)
    with torch.inference_mode():
        a, b = ours(x, 951, text, labels), ref(x, 951, encoder_hidden_states=text, class_labels=labels).sample
        err = ((a - b).abs().max() / b.abs().max()).item()
        t = best_times({"ours": lambda: ours(x, 951, text, labels),
                        "diffusers": lambda: ref(x, 951, encoder_hidden_states=text, class_labels=labels)},
                       args.repeats)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"\nunCLIP UNet, widths {cfg.block_out_channels}, {n_params / 1e6:.1f}M params, batch 2 (CFG) x 4 x "
          f"{cfg.sample_size} x {cfg.sample_size}, fp32, {torch.get_num_threads()} threads, diffusers "
          f"{diffusers.__version__}; max |ours - diffusers| / max |diffusers| = {err:.1e}")
    print(f"{'':14s} {'s / CFG step':>14s}")
    print(f"{'ours':14s} {t['ours']:14.3f}\n{'diffusers':14s} {t['diffusers']:14.3f}")
    print(f"{'ratio':14s} {t['diffusers'] / t['ours']:13.2f}x")

# ---- gpu: the full-size models with random weights ------------------------------------------------------------
def random_model(build, device, dtype) -> nn.Module:
    """build() on the meta device, then random weights on `device` in `dtype` (no full-size fp32 copy on the way);
    float buffers are set to 1 (the rotary tables and E("") are recomputed by the caller)."""
    with torch.device("meta"):
        model = build()
    model = model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for b in model.buffers():
            if b.is_floating_point():
                b.fill_(1.0)
    return model.eval()

def gpu_models(dry_run: bool, device, dtype):
    """SEED tokenizer (EVA ViT-g), SEED-LLaMA 8B and the SD-2.1-unclip decoder, or (dry run) small ones of the same
    layouts, with random weights."""
    if dry_run:
        llm_cfg, seed_cfg = llama.LlamaConfig(**LLAMA_DRY_RUN), seed.SeedConfig.preset("tiny")
        dec_cfg = unet.DecoderConfig(
            unet=unet.UNetConfig(block_out_channels=(32, 32, 64, 64), attention_head_dim=(1, 1, 2, 2),
                                 cross_attention_dim=64, class_embed_dim=2 * seed_cfg.embed_dim, norm_num_groups=8,
                                 sample_size=8),
            vae=unet.VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
            text=unet.CLIPTextConfig(width=64, layers=1, heads=2, mlp_width=128))
    else:
        llm_cfg, seed_cfg, dec_cfg = llama.LlamaConfig(), seed.SeedConfig(), unet.DecoderConfig()
    llm = random_model(lambda: llama.Llama(llm_cfg), device, dtype)
    llm.rope_cos, llm.rope_sin = llama.rope_tables(llm_cfg, device)
    decoder = random_model(lambda: unet.UnCLIPDecoder(dec_cfg), device, dtype)
    decoder.encode_empty_prompt()
    return random_model(lambda: seed.SeedTokenizer(seed_cfg), device, dtype), llm, decoder

def run_pipeline(tok, llm, decoder, device, low_vram: bool) -> float | None:
    """sample.py's t2i-after-caption path once (encode an image, 64 new tokens, embed 32 codes, a 2-step CFG
    decode to pixels), resident or with --low-vram's placement; the peak GPU memory in GiB (None on the CPU)."""
    import sample
    parts = sample.phase_parts(tok, llm, decoder)
    place = (lambda *p: weights.on_device(device, *p)) if low_vram else (lambda *p: contextlib.nullcontext())
    if low_vram:
        sample.place_low_vram(tok, llm, decoder)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    S = tok.config.image_size
    with torch.inference_mode():
        with place(*parts["encode"]):
            codes = tok.encode(torch.randn(1, 3, S, S, device=device))
        with place(*parts["generate"]):
            llm.generate([list(range(1, 50))], max_new_tokens=64)
            llm.free_cache()
        with place(*parts["embed"]):
            embeds = tok.embed(codes)
        with place(*parts["draw"]):
            decoder(embeds, embeds, steps=2, guidance_scale=10.0, seed=0)
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None

def llm_runs(variants: dict, prompt: torch.Tensor, new_tokens: int) -> dict:
    """best_times runs of generate(1 new token) and generate(1 + new_tokens) for every {name: (model, is_ours)}:
    ours through Llama.generate, transformers' greedy; each returns the new tokens."""
    def generate(model, ours, n):
        if ours:
            return model.generate(prompt.tolist(), max_new_tokens=n)[0]
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, top_k=None, top_p=None)
        return out[0, prompt.shape[1]:].tolist()
    return {(name, n): (lambda m=m, o=o, n=n: generate(m, o, n))
            for name, (m, o) in variants.items() for n in (1, 1 + new_tokens)}

def llm_rows(t: dict, names, prompt_len: int, new_tokens: int, bytes_of: dict, bandwidth: float) -> list[dict]:
    rows = []
    for name in names:
        decode = new_tokens / (t[name, 1 + new_tokens] - t[name, 1])
        rows.append(dict(name=name, prefill_tok_s=prompt_len / t[name, 1], decode_tok_s=decode,
                         weight_bytes_per_token=bytes_of[name], decode_bound_tok_s=bandwidth / bytes_of[name],
                         fraction_of_bound=decode * bytes_of[name] / bandwidth))
    return rows

def bench_gpu(args) -> dict | None:
    """The full-size models with random weights on CUDA in fp16: SEED-LLaMA 8B (fp16 and int8, eager, then with
    its decode step compiled: CUDA graphs) decode and prefill against the HBM bound (a device copy measured in the
    same run) and against transformers; one CFG step of the SD-2.1-unclip UNet at 768 x 768 (96 x 96 latents)
    against diffusers; the VAE decode; EVA ViT-g + Q-Former encoding one image; and the peak GPU memory of the
    sample.py pipeline resident and with --low-vram. --dry-run: the same code at tiny sizes on the CPU."""
    if not torch.cuda.is_available() and not args.dry_run:
        print("gpu: skipped, no CUDA device (--dry-run runs its logic on the CPU at tiny sizes)")
        return None
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.float16
    tok, llm, decoder = gpu_models(args.dry_run, device, dtype)
    rows, bandwidth = gpu_llm(llm, device, args)
    result = dict(benchmark="gpu", device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
                  dtype=str(dtype).removeprefix("torch."), copy_bandwidth_GBps=bandwidth / 1e9, llm=rows,
                  **decoder_times(tok, decoder, device, dtype, args.repeats))
    result["pipeline_peak_GiB"] = {"resident": run_pipeline(tok, llm, decoder, device, low_vram=False),
                                   "low_vram": run_pipeline(tok, llm, decoder, device, low_vram=True)}
    return result

def gpu_llm(llm: llama.Llama, device, args) -> tuple[list[dict], float]:
    """bench_gpu's LLM rows (ours eager and int8, transformers with the same tensors, then ours compiled on CUDA)
    and the device's copy bandwidth; the int8 copy is freed on return."""
    kind = str(llm.lm_head.weight.dtype).removeprefix("torch.")
    prompt_len, new_tokens = (16, 8) if args.dry_run else (256, 64)
    prompt = torch.randint(0, llm.config.vocab_size, (1, prompt_len), device=device)
    variants = {f"ours {kind}": (llm, True), "ours int8": (llama.quantize_int8(copy.deepcopy(llm)), True)}
    bytes_of = {name: streamed_bytes(m) for name, (m, _) in variants.items()}
    try:
        import transformers
        with torch.device(device):
            ref = transformers.LlamaForCausalLM._from_config(hf_llama_config(transformers, llm.config),
                                                             dtype=llm.lm_head.weight.dtype)
        ref.load_state_dict(llm.state_dict(), assign=True)  # the same tensors: no second copy of the weights
        variants[f"transformers {kind}"] = (ref.eval(), False)
        bytes_of[f"transformers {kind}"] = bytes_of[f"ours {kind}"]
    except ImportError:
        pass
    runs, moved = copy_bandwidth_runs(2**20 if args.dry_run else 2**30, device)
    with torch.inference_mode():
        t = best_times(runs | llm_runs(variants, prompt, new_tokens), args.repeats)
        bandwidth = moved / t["memcpy"]
        rows = llm_rows(t, variants, prompt_len, new_tokens, bytes_of, bandwidth)
        if device.type == "cuda":  # compiled decode steps (the compilation is the warm-up round)
            compiled = {f"{name} compiled": (m.compile_decode(), True) for name, (m, o) in variants.items() if o}
            bytes_of |= {name: streamed_bytes(m) for name, (m, _) in compiled.items()}
            t = best_times(llm_runs(compiled, prompt, new_tokens), args.repeats)
            rows += llm_rows(t, compiled, prompt_len, new_tokens, bytes_of, bandwidth)
    llm.__dict__.pop("decode_step", None)  # back to the eager step: the pipeline runs as sample.py does by default
    llm.compiled = False
    torch._dynamo.reset()  # and the compiled graphs' memory is not counted in the pipeline's peak
    return rows, bandwidth

def decoder_times(tok, decoder, device, dtype, repeats: int) -> dict:
    """Seconds of one CFG UNet step (ours, and diffusers' with the same weights where installed), of the VAE
    decode of one latent and of encoding one image with the SEED tokenizer."""
    u = decoder.unet.config
    x = torch.randn(2, u.in_channels, u.sample_size, u.sample_size, device=device, dtype=dtype)
    text, labels = decoder.prompt_states(2), torch.randn(2, u.class_embed_dim, device=device, dtype=dtype)
    S = tok.config.image_size
    pixels = torch.randn(1, 3, S, S, device=device, dtype=dtype)
    runs = {"unet_step ours": lambda: decoder.unet(x, 951, text, labels),
            "vae_decode": lambda: decoder.vae(x[:1]), "seed_encode": lambda: tok.encode(pixels)}
    try:
        import diffusers
        ref = diffusers_unet(diffusers, u).to(device, dtype)
        ref.load_state_dict(decoder.unet.state_dict())
        runs["unet_step diffusers"] = lambda: ref(x, 951, encoder_hidden_states=text, class_labels=labels)
    except ImportError:
        pass
    with torch.inference_mode():
        t = best_times(runs, repeats)
    return {f"{name}_s": seconds for name, seconds in t.items()}

def print_gpu(result: dict) -> None:
    print(f"\n{result['device']}, {result['dtype']}, device copy {result['copy_bandwidth_GBps']:.0f} GB/s")
    print(f"{'':26s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'GB/token':>9s} {'bound tok/s':>12s} "
          f"{'of bound':>9s}")
    for r in result["llm"]:
        print(f"{r['name']:26s} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.1f} "
              f"{r['weight_bytes_per_token'] / 1e9:9.2f} {r['decode_bound_tok_s']:12.1f} {r['fraction_of_bound']:9.2f}")
    for key, value in result.items():
        if key.endswith("_s"):
            print(f"{key.removesuffix('_s')}: {value:.4f} s")
    print(f"pipeline peak GPU memory (GiB): {result['pipeline_peak_GiB']}")

def train_step(params: list, loss_fn, fused: bool):
    """One optimiser step as train.Run.train takes it (backward, clip to norm 1, AdamW), with torch's default
    AdamW (the old recipe; on the CPU a loop over the tensors) or the fused one (train.Run.optimizer)."""
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    return step

def padded_llm_loss(model: llama.Llama, rows: list, pad_id: int) -> torch.Tensor:
    """The old recipe of the LLM stages: one batch padded to its longest row, the head on every position."""
    import train
    ids, labels = train.collate(rows, pad_id, "cpu")
    logits = model(ids[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=train.IGNORE)

def train_stage_losses(cfg, folder: Path) -> dict:
    """{stage: (model, old loss fn, new loss fn)} at train.py's default sizes, on the shapes world with random codes
    (the lengths of the LLM's sequences do not depend on which codes)."""
    import random
    import train
    world = train.build_world()
    clip = train.TinyCLIP(train.tiny_seed_config(cfg), cfg.clip, len(train.TEXT_VOCAB)).train()
    ids, eos = train.tokenize(train.CAPTIONS)
    idx = torch.randint(len(world.images), (cfg.clip.batch_size,), generator=torch.Generator().manual_seed(0))

    def clip_loss():
        return train.multi_positive_infonce(clip.encode_image(world.images[idx]), clip.encode_text(ids, eos),
                                            world.combo[idx], clip.logit_scale.exp())
    decoder = unet.UnCLIPDecoder(unet.DecoderConfig.preset("tiny"))
    decoder.noise_augmentation.requires_grad_(False)
    alphas, images = unet.scaled_linear_alphas_cumprod(), world.images[:cfg.decoder.batch_size]
    embeds = torch.randn(len(images), decoder.config.embed_dim)

    def decoder_loss(bf16: bool):
        gen = torch.Generator().manual_seed(0)
        return train.decoder_loss(decoder, images, embeds, replace(cfg.decoder, bf16=bf16), alphas, gen)
    tok = train.build_llm_tokenizer(folder, 256, cfg.llm.text_vocab_size)
    data = train.LLMData(world, torch.randint(256, (len(world.images), 32)), train.SequenceBuilder(tok))
    rng = random.Random(0)
    out = {"clip": (clip, clip_loss, clip_loss),
           "decoder": (decoder.unet.train(), lambda: decoder_loss(False), lambda: decoder_loss(True))}
    for stage, sample in (("llm_pretrain", lambda r: data.pretrain(r, cfg.llm.reverse_ratio)),
                          ("llm_sft", data.instruct)):
        torch.manual_seed(4)
        model = llama.Llama(replace(llama.LlamaConfig.preset("tiny"), vocab_size=len(tok))).train()
        rows = [sample(rng) for _ in range(cfg.llm.batch_size)]
        out[stage] = (model, lambda m=model, r=rows: padded_llm_loss(m, r, tok.pad_id),
                      lambda m=model, r=rows: train.llm_loss(m, r, tok.pad_id, "cpu", cfg.llm.micro_batches))
    return out

def bench_train(args) -> dict:
    """One training step of stages of `train.py --tiny` at its default sizes, the old recipe and the current one
    taking turns: default against fused AdamW everywhere; the decoder in fp32 against --decoder.bf16; the LLM stages
    one padded batch with the head on every position against length-grouped micro-batches with the head on labelled
    positions only (train.llm_loss). Stages 1 and 2 change as stage 0 does (the optimiser); LoRA as the SFT step."""
    import train
    cfg = train.parse_config(["--tiny"])
    with tempfile.TemporaryDirectory() as folder:
        stages = train_stage_losses(cfg, Path(folder))
    runs, same = {}, {}
    for stage, (model, old, new) in stages.items():
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            same[stage] = abs(old().item() - new().item())
        runs[stage, "before"] = train_step(params, old, fused=False)
        runs[stage, "after"] = train_step(params, new, fused=True)
    t = best_times(runs, args.repeats)
    rows = [dict(stage=s, before_s=t[s, "before"], after_s=t[s, "after"], speedup=t[s, "before"] / t[s, "after"],
                 loss_difference=same[s]) for s in stages]
    return dict(benchmark="train", threads=torch.get_num_threads(), repeats=args.repeats, rows=rows)

def print_train(result: dict) -> None:
    print(f"\ntrain.py --tiny, one step per stage, {result['threads']} threads, best of {result['repeats']}")
    print(f"{'stage':14s} {'before s':>9s} {'after s':>9s} {'speed-up':>9s} {'|loss before - after|':>22s}")
    for r in result["rows"]:
        print(f"{r['stage']:14s} {r['before_s']:9.4f} {r['after_s']:9.4f} {r['speedup']:8.2f}x "
              f"{r['loss_difference']:22.1e}")

# name -> (benchmark, printer of its result; None: it prints its own table and returns nothing)
BENCHMARKS = {"llama": (bench_llama, print_llama), "llama_load": (bench_llama_load, None),
              "unet": (bench_unet, None), "train": (bench_train, print_train), "gpu": (bench_gpu, print_gpu)}

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("names", nargs="*", default=list(BENCHMARKS),
                        help=f"benchmarks to run, of {list(BENCHMARKS)} (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds per measurement, the best kept (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object {benchmark: result} instead of "
                        "tables (llama, train, gpu)")
    parser.add_argument("--compile", action="store_true", help="llama: also ours with the decode step compiled "
                        "(Llama.compile_decode; about a minute of compiling first)")
    parser.add_argument("--dry-run", action="store_true", help="llama and gpu at tiny sizes on the CPU: the "
                        "logic, not the numbers (tests)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choices: {list(BENCHMARKS)}")
    if args.json and any(BENCHMARKS[n][1] is None for n in args.names):
        parser.error(f"--json applies to {[n for n, (_, p) in BENCHMARKS.items() if p]} only")
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    results = {}
    for name in args.names:
        bench, printer = BENCHMARKS[name]
        result = bench(args)
        if result is not None:
            results[name] = result
            if not args.json:
                printer(result)
    if args.json:
        print(json.dumps(results, indent=1))
    return results

if __name__ == "__main__":
    main()
