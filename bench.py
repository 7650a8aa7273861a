"""bench.py: speed of our models against the reference implementations, on CPU, random weights.

    python bench.py [llama] [llama_load] [unet] [--threads 2] [--repeats 3]     # default: every benchmark

Each `bench_<name>(args)` builds both implementations with the same weights, checks that they agree, times them and
prints a table (`llama_load` measures the loader's peak host RAM instead); one whose reference library is absent
says so and is skipped. Run it on a quiet machine: other load matters.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import llama
import unet
from weights import write_json

def best_times(runs: dict, repeats: int) -> dict:
    """Best wall time (s) of each function in `runs` over `repeats` rounds after a warm-up round. The functions
    take turns within a round, so a burst of load from other processes hits them alike."""
    times = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            if round_ > 0:
                times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}

def bench_llama(args):
    """Our Llama vs transformers' LlamaForCausalLM: prefill of a 256-token prompt and greedy decode of 64 tokens,
    both through the public generate() (decode rate = 64 / (t(1 + 64 new tokens) - t(1 new token)))."""
    try:
        import transformers
    except ImportError:
        print("llama: skipped, transformers is not installed (pip install -r requirements-dev.txt)")
        return
    prompt_len, new_tokens = 256, 64
    cfg = llama.LlamaConfig(vocab_size=40194, dim=1024, n_layers=8, n_heads=16, ffn_dim=2816)
    torch.manual_seed(0)
    ours = llama.Llama(cfg).eval()
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, intermediate_size=cfg.ffn_dim,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        attn_implementation="sdpa", bos_token_id=None, eos_token_id=None, pad_token_id=None)).eval()
    ref.load_state_dict(ours.state_dict())  # same key names: the same weights in both
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len))

    def run_ours(n):
        return ours.generate(prompt.tolist(), max_new_tokens=n)[0]

    def run_ref(n):
        out = ref.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, top_k=None, top_p=None)
        return out[0, prompt_len:].tolist()

    same = run_ours(new_tokens + 1) == run_ref(new_tokens + 1)
    runs = {(name, n): (lambda run=run, n=n: run(n))
            for name, run in (("ours", run_ours), ("transformers", run_ref)) for n in (1, 1 + new_tokens)}
    with torch.inference_mode():
        t = best_times(runs, args.repeats)
    rows = [(name, prompt_len / t[name, 1], new_tokens / (t[name, 1 + new_tokens] - t[name, 1]))
            for name in ("ours", "transformers")]
    print(f"\nLLaMA dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, FFN {cfg.ffn_dim}, vocab "
          f"{cfg.vocab_size}, fp32, {torch.get_num_threads()} threads, transformers {transformers.__version__}; "
          f"greedy tokens identical: {same}")
    print(f"{'':14s} {'prefill ' + str(prompt_len) + ' tok/s':>18s} {'decode ' + str(new_tokens) + ' tok/s':>18s}")
    for name, prefill, decode in rows:
        print(f"{name:14s} {prefill:18.1f} {decode:18.1f}")
    print(f"{'ratio':14s} {rows[0][1] / rows[1][1]:17.2f}x {rows[0][2] / rows[1][2]:17.2f}x")

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

def bench_llama_load(args):
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
    ref = diffusers.UNet2DConditionModel(
        sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=cfg.attention_head_dim,
        cross_attention_dim=cfg.cross_attention_dim, class_embed_type="projection",
        projection_class_embeddings_input_dim=cfg.class_embed_dim, use_linear_projection=True,
        norm_num_groups=cfg.norm_num_groups).eval()
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

BENCHMARKS = {"llama": bench_llama, "llama_load": bench_llama_load, "unet": bench_unet}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run, of {list(BENCHMARKS)} (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the best is kept)")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choices: {list(BENCHMARKS)}")
    torch.set_num_threads(args.threads)
    for name in args.names or BENCHMARKS:
        BENCHMARKS[name](args)
