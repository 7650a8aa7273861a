"""llama.py, model side: shapes, KV cache, batching, generation options, loaders, and parity with the HF
reference (the shared fixtures, and transformers' LlamaForCausalLM when installed)."""
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llama
import weights
from tokenizer import ImageVocab, Tokenizer
from llama import GenerationConfig, Int8Linear, Llama, LlamaConfig, quantize_int8

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# the test tokenizer's layout (tests/fixtures/llama): 640 pieces, codes at 640..767, <img> 768, </img> 769
IMAGE_VOCAB = dict(boi_id=768, eoi_id=769, code_offset=640, n_codes=128)

@pytest.fixture(scope="module")
def ref():
    return load_file(FIXTURES / "llama" / "ref.safetensors")

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    # n_kv_heads < n_heads exercises grouped-query attention; the released models have none
    return Llama(LlamaConfig(vocab_size=770, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                             max_seq_len=96)).eval()

def image_vocab():
    return ImageVocab(**IMAGE_VOCAB)

# ---- config ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, n_params", [("seed-llama-8b", 6_805_540_864), ("seed-llama-14b", 13_099_770_880)])
def test_official_parameter_counts(name, n_params):
    with torch.device("meta"):
        model = Llama(LlamaConfig.preset(name))
    assert sum(p.numel() for p in model.parameters()) == n_params

def test_defaults_are_8b_and_unknown_preset_lists_choices():
    assert LlamaConfig() == LlamaConfig.preset("seed-llama-8b")
    with pytest.raises(ValueError, match="tiny"):
        LlamaConfig.preset("seed-llama-7b")

@pytest.mark.parametrize("name, preset", [("llama_8b", "seed-llama-8b"), ("llama_14b", "seed-llama-14b")])
def test_official_key_names_and_shapes(name, preset):
    # our state dict = the official keys and shapes, minus the RoPE buffers the loader ignores
    official = json.loads((FIXTURES / "official_keys" / f"{name}.json").read_text())
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in Llama(LlamaConfig.preset(preset)).state_dict().items()}
    ignored = [k for k in official if llama.IGNORED_OFFICIAL_KEYS.fullmatch(k)]
    assert len(ignored) == LlamaConfig.preset(preset).n_layers
    assert {k: v for k, v in official.items() if k not in ignored} == ours

# ---- parity with the HF reference fixtures ----------------------------------------------------------------

def test_fixture_parity_safetensors_shards(ref):
    model = Llama.from_official(FIXTURES / "llama", device="cpu")
    assert model.lm_head.weight.dtype == torch.float32
    seen = {}
    model.model.layers[0].register_forward_hook(lambda m, args, out: seen.update(layer1_out=out))
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.update(embeddings_out=out))
    with torch.no_grad():
        torch.testing.assert_close(model(ref["input_ids"]), ref["logits"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.hidden(ref["input_ids"]), ref["last_hidden_state"], atol=1e-4, rtol=1e-4)
    for name, value in seen.items():
        torch.testing.assert_close(value, ref[name], atol=1e-4, rtol=1e-4)
    out = model.generate(ref["input_ids"].tolist(), max_new_tokens=16)
    assert out == ref["greedy_new_tokens"].tolist()

def test_fixture_parity_bin_fp16_shards(ref, tmp_path):
    # the 2023 layout: fp16 pickled shards with rotary_emb.inv_freq keys and a config with `torch_dtype`
    src = FIXTURES / "llama"
    for name in ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                 "pytorch_model.bin.index.json"):
        shutil.copy(src / name, tmp_path / name)
    shutil.copy(src / "config.seed_era_4.30.2.json", tmp_path / "config.json")
    model = Llama.from_official(tmp_path, device="cpu")  # fp16 on disk, fp32 on CPU by default
    assert model.lm_head.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(ref["input_ids"]), ref["logits_bin_fp16_weights"], atol=1e-4, rtol=1e-4)
    out = model.generate(ref["input_ids"].tolist(), max_new_tokens=16)
    assert out == ref["greedy_new_tokens_bin_fp16_weights"].tolist()
    half = Llama.from_official(tmp_path, device="cpu", dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}

def test_fixture_left_padded_batch(ref):
    # The reference ran positions 0..15 in both rows; we start each row at its first real token. RoPE only
    # sees position differences, so the logits of the real tokens agree.
    model = Llama.from_official(FIXTURES / "llama", device="cpu")
    mask = ref["batch_attention_mask"].bool()
    with torch.no_grad():
        logits = model(ref["batch_input_ids"], pad=(~mask).sum(1))
    torch.testing.assert_close(logits[mask], ref["batch_logits"][mask], atol=1e-4, rtol=1e-4)

# ---- invariants --------------------------------------------------------------------------------------------

def test_kv_cache_matches_uncached(tiny):
    torch.manual_seed(1)
    idx = torch.randint(0, 770, (2, 20))
    pad = torch.tensor([3, 0])  # row 0 is left-padded by 3
    with torch.no_grad():
        for p in (None, pad):
            full = tiny(idx, pad=p)
            tiny.setup_cache(2, 32)
            steps = [tiny(idx[:, :8], 0, p), tiny(idx[:, 8:12], 8, p)]  # a prompt, then a chunk at slot 8
            steps += [tiny(idx[:, t:t + 1], t, p) for t in range(12, 16)]  # one by one, dynamic shapes
            steps += [tiny.decode_step(idx[:, t], torch.tensor(t), p)[:, None] for t in range(16, 20)]  # static
            torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)

def test_static_decode_step_equals_dynamic(tiny):
    """The static step (slot as a tensor, the whole cache read through a mask) gives the dynamic step's logits,
    padded or not, and leaves the same keys and values in the cache."""
    torch.manual_seed(5)
    idx = torch.randint(0, 770, (2, 14))
    with torch.no_grad():
        for p in (None, torch.tensor([0, 4])):
            tiny.setup_cache(2, 40)
            tiny(idx[:, :10], 0, p)
            dynamic = torch.cat([tiny(idx[:, t:t + 1], t, p)[:, 0] for t in range(10, 14)])
            keys = tiny.model.layers[1].self_attn.cache.k[:, :, :14].clone()
            tiny.setup_cache(2, 40)
            tiny(idx[:, :10], 0, p)
            static = torch.cat([tiny.decode_step(idx[:, t], torch.tensor(t), p) for t in range(10, 14)])
            torch.testing.assert_close(static, dynamic, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(tiny.model.layers[1].self_attn.cache.k[:, :, :14], keys)

def test_head_only_where_asked(tiny):
    idx = torch.randint(0, 770, (2, 9))
    where = torch.rand(2, 9) < 0.5
    with torch.no_grad():
        torch.testing.assert_close(tiny(idx, where=where), tiny(idx)[where])

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_close_to_float(tiny, dtype):
    """quantize_int8: int8 attention and MLP weights (CPU: the packed kernel in bf16), embeddings, norms and the
    head untouched; logits close to the float model's and generate runs unchanged on it."""
    float_model = copy.deepcopy(tiny).to(dtype)
    model = quantize_int8(copy.deepcopy(float_model))
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.int8
    assert model.lm_head.weight.dtype == dtype and model.model.embed_tokens.weight.dtype == dtype
    torch.manual_seed(6)
    idx = torch.randint(0, 770, (2, 16))
    with torch.no_grad():
        a, b = model(idx).float(), float_model(idx).float()
    # int8 rounding moves each weight by at most half a step of 1/127 of its row's largest
    assert (a - b).abs().max() <= 0.05 * b.abs().max(), (a - b).abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert len(model.generate([idx[0].tolist()], max_new_tokens=5)[0]) == 5
    layer, x = model.model.layers[0].mlp.up_proj, torch.randn(3, 32, dtype=dtype)  # 3 rows: packed in bf16
    expected = torch.nn.functional.linear(x.float(), layer.weight.float()) * layer.scales.float()
    torch.testing.assert_close(layer(x).float(), expected, atol=0.05 * expected.abs().max().item(), rtol=0.02)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matvec_is_the_linear(dtype):
    """llama.matvec, the one-row product the CPU decode step compiles to, equals F.linear (and int8 weights times
    their scales); here it runs eagerly, as the same arithmetic."""
    torch.manual_seed(8)
    w, x = torch.randn(48, 32, dtype=dtype), torch.randn(1, 1, 32, dtype=dtype)
    want = torch.nn.functional.linear(x.float(), w.float())
    torch.testing.assert_close(llama.matvec(w, x).float(), want, atol=0.02 * want.abs().max().item(), rtol=0.01)
    q, scales = torch.randint(-127, 128, (48, 32), dtype=torch.int8), torch.rand(48, dtype=dtype)
    want = torch.nn.functional.linear(x.float(), q.float()) * scales.float()
    torch.testing.assert_close(llama.matvec(q, x, scales).float(), want, atol=0.02 * want.abs().max().item(),
                               rtol=0.01)
    assert llama.matvec(w, x).shape == (1, 1, 48)

@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_compiled_cpu_decode_matches_eager(tiny):
    """compile_decode on the CPU (inductor: the float linears become matvec reductions, the int8 ones too on AVX512
    and the packed kernel elsewhere; the cache a power of two long) gives eager's greedy tokens for the float and
    the int8 model."""
    torch._dynamo.reset()
    prompt = [[3, 4, 5, 6, 7, 8]]
    for model in (copy.deepcopy(tiny), quantize_int8(copy.deepcopy(tiny).bfloat16())):
        eager = model.generate(prompt, max_new_tokens=8)
        model.compile_decode()
        assert model.cache_slots(14) == min(256, model.config.max_seq_len)
        assert model.generate(prompt, max_new_tokens=8) == eager
    torch._dynamo.reset()

def test_int8_any_width():
    """Widths that are not a multiple of 16 (train.py's tiny FFN is 344) take the dequantising path on the CPU."""
    torch.manual_seed(7)
    model = Llama(LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, ffn_dim=40, max_seq_len=32)).bfloat16()
    float_logits = model(torch.arange(1, 9)[None]).float()
    quantize_int8(model)
    with torch.no_grad():
        assert (model(torch.arange(1, 9)[None]).float() - float_logits).abs().max() <= 0.05 * float_logits.abs().max()

def test_bf16_on_cpu_generates_like_fp32(tiny):
    bf16 = copy.deepcopy(tiny).to(torch.bfloat16)
    idx = torch.randint(0, 770, (1, 10))
    with torch.no_grad():
        a, b = bf16(idx).float(), tiny(idx)
    assert (a - b).abs().max() <= 0.05 * b.abs().max()
    # one bf16 row on the CPU takes the mv path of llama.Linear; it must be the same product
    x = torch.randn(1, 1, 32, dtype=torch.bfloat16)
    layer = bf16.model.layers[0].mlp.up_proj
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight), atol=2e-2, rtol=2e-2)

def test_causal(tiny):
    idx = torch.randint(0, 770, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 770
    with torch.no_grad():
        torch.testing.assert_close(tiny(idx)[:, :8], tiny(changed)[:, :8])

def test_batched_generation_equals_one_at_a_time(tiny):
    torch.manual_seed(2)
    prompts = [torch.randint(0, 770, (n,)).tolist() for n in (5, 11, 8)]
    alone = [tiny.generate([p], max_new_tokens=12)[0] for p in prompts]
    assert tiny.generate(prompts, max_new_tokens=12) == alone
    assert all(len(a) == 12 for a in alone)

def test_stop_ids_and_streaming(tiny):
    prompt = list(range(1, 9))
    full = tiny.generate([prompt], max_new_tokens=10)[0]
    stop = full[3]
    streamed = []
    out = tiny.generate([prompt], GenerationConfig(max_new_tokens=10, stop_ids=(stop,)),
                        on_token=lambda row, tok: streamed.append((row, tok)))[0]
    assert out == full[:full.index(stop) + 1]
    assert streamed == [(0, t) for t in out]

def test_sampling_is_seeded_and_follows_the_filters(tiny):
    prompt = [[1, 2, 3, 4]]
    cfg = GenerationConfig(max_new_tokens=8, do_sample=True, top_k=3, top_p=1.0, temperature=0.7)
    a = tiny.generate(prompt, cfg, generator=torch.Generator().manual_seed(0))
    b = tiny.generate(prompt, cfg, generator=torch.Generator().manual_seed(0))
    assert a == b
    one = tiny.generate(prompt, cfg, top_k=1, generator=torch.Generator().manual_seed(5))
    assert one == tiny.generate(prompt, max_new_tokens=8)  # top-k 1 is greedy

def test_prompt_longer_than_context(tiny):
    with pytest.raises(ValueError, match="longer than the context"):
        tiny.generate([[1] * 97], max_new_tokens=1)
    assert len(tiny.generate([[1] * 90], max_new_tokens=20)[0]) == 6  # stops at the context end

# ---- image spans ---------------------------------------------------------------------------------------------

def test_forced_and_constrained_image_span(tiny):
    iv = image_vocab()
    out = tiny.generate([[1, 5, 9]], max_new_tokens=40, force_image=True, constrain_images=True,
                        image_vocab=iv)[0]
    assert out[0] == iv.boi_id and out[33] == iv.eoi_id
    assert all(iv.code_offset <= t < iv.code_offset + iv.n_codes for t in out[1:33])
    assert all(not iv.code_offset <= t < iv.code_offset + iv.n_codes and t != iv.eoi_id for t in out[34:])
    # a prompt that already ends inside a span continues it: 30 codes written, so 2 more then </img>
    prompt = [1, iv.boi_id] + [iv.code_offset] * 30
    out = tiny.generate([prompt], max_new_tokens=3, constrain_images=True, image_vocab=iv)[0]
    assert out[2] == iv.eoi_id and all(iv.code_offset <= t < iv.code_offset + iv.n_codes for t in out[:2])

def test_classifier_free_guidance_on_codes(tiny):
    iv = image_vocab()
    cond, uncond, scale = [1, 5, 9, 13], [1, 2], 3.0
    out = tiny.generate([cond], max_new_tokens=2, force_image=True, constrain_images=True, guidance_scale=scale,
                        image_vocab=iv, uncond_prompt=uncond)[0]
    with torch.no_grad():
        c = tiny(torch.tensor([cond + [iv.boi_id]]))[0, -1, iv.code_offset:iv.code_offset + iv.n_codes]
        u = tiny(torch.tensor([uncond + [iv.boi_id]]))[0, -1, iv.code_offset:iv.code_offset + iv.n_codes]
    assert out[1] == iv.code_offset + (u + scale * (c - u)).argmax().item()
    unguided = tiny.generate([cond], max_new_tokens=2, force_image=True, constrain_images=True, image_vocab=iv)[0]
    assert unguided[1] == iv.code_offset + c.argmax().item()
    with pytest.raises(ValueError, match="uncond_prompt"):
        tiny.generate([cond], guidance_scale=2.0, image_vocab=iv)

# ---- loaders ---------------------------------------------------------------------------------------------

def copy_fixture(dst, names):
    for name in names:
        shutil.copy(FIXTURES / "llama" / name, dst / name)

SAFETENSORS = ("config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors")

def test_folder_without_weights(tmp_path):
    copy_fixture(tmp_path, ["config.json"])
    with pytest.raises(FileNotFoundError, match="no weights"):
        Llama.from_official(tmp_path)

def test_index_naming_a_missing_shard(tmp_path):
    copy_fixture(tmp_path, SAFETENSORS[:3])
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        Llama.from_official(tmp_path)

@pytest.mark.parametrize("shard", ["model-00002-of-00002.safetensors", "pytorch_model-00002-of-00002.bin"])
def test_truncated_shard(tmp_path, shard):
    names = SAFETENSORS if shard.endswith("safetensors") else (
        "config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin", shard)
    copy_fixture(tmp_path, names)
    data = (tmp_path / shard).read_bytes()
    (tmp_path / shard).write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=shard):
        Llama.from_official(tmp_path)

def test_config_that_disagrees_with_the_weights(tmp_path):
    copy_fixture(tmp_path, SAFETENSORS)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf.update(vocab_size=771, num_hidden_layers=1)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError) as err:
        Llama.from_official(tmp_path)
    msg = str(err.value)
    assert "model.embed_tokens.weight: file (770, 48) vs config.json (771, 48)" in msg
    assert "lm_head.weight: file (770, 48) vs config.json (771, 48)" in msg
    unexpected = msg.split("unexpected (")[1]
    assert "model.layers.1.input_layernorm.weight" in unexpected and "rotary_emb" not in msg
    hf.update(vocab_size=770, num_hidden_layers=3)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"missing \(9\):\n    model\.layers\.2\.input_layernorm\.weight"):
        Llama.from_official(tmp_path)

def test_save_and_load_pretrained(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = Llama.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert loaded.config == tiny.config
    idx = torch.randint(0, 770, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), tiny(idx), atol=0, rtol=0)
    copy_fixture(tmp_path, ["config.json"])  # an official HF config is not ours
    with pytest.raises(ValueError, match="from_official"):
        Llama.from_pretrained(tmp_path)

def test_with_the_tokenizer_end_to_end(tmp_path):
    # the contract between the two halves of llama.py: ids from the tokenizer, spans parsed back by it
    tok = Tokenizer(FIXTURES / "llama")
    assert tok.image_vocab == image_vocab()
    model = Llama.from_official(FIXTURES / "llama", device="cpu")
    prompt = tok.encode_chat(["Draw a red circle."], template="8B")
    out = model.generate([prompt], max_new_tokens=40, force_image=True, constrain_images=True,
                         image_vocab=tok.image_vocab, stop_ids=(tok.eos_id,))[0]
    text, images = tok.decode_with_images(out)
    assert len(images) == 1 and len(images[0]) == 32 and text.startswith("<image>")
    model.save_pretrained(tmp_path, tokenizer=tok)
    assert Tokenizer(tmp_path).encode_chat(["Draw a red circle."]) == prompt
    assert Llama.from_pretrained(tmp_path).generate([prompt], max_new_tokens=4) == \
        model.generate([prompt], max_new_tokens=4)

# ---- the released checkpoints ($SEED_WEIGHTS) --------------------------------------------------------------

@pytest.mark.golden
@pytest.mark.parametrize("repo, preset", [("seed-llama-8b-sft", "seed-llama-8b"),
                                          ("seed-llama-14b-sft", "seed-llama-14b")])
def test_official_checkpoint_matches_preset(repo, preset):
    # reads config.json and the shard headers only (the .bin pickles are memory-mapped, no weights are read)
    from conftest import official_file
    folder = official_file("AILab-CVC", repo, "config.json").parent
    config = LlamaConfig.from_hf(json.loads((folder / "config.json").read_text()))
    assert config == LlamaConfig.preset(preset)
    files = weights.find_weights(folder, ("pytorch_model.bin.index.json", "model.safetensors.index.json"))
    stored = {k: list(shape) for f in files for k, (shape, _) in weights.read_header(f).items()}
    official = json.loads((FIXTURES / "official_keys" / f"llama_{preset.split('-')[-1]}.json").read_text())
    assert stored == official

# ---- parity with transformers (dev dependency) ------------------------------------------------------------

@pytest.mark.parity
def test_parity_with_transformers_llama(tiny):
    transformers = pytest.importorskip("transformers")
    c = tiny.config
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, intermediate_size=c.ffn_dim, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, max_position_embeddings=c.max_seq_len, attn_implementation="eager",
        bos_token_id=None, eos_token_id=None, pad_token_id=None)).eval()
    ref.load_state_dict(tiny.state_dict())
    idx = torch.randint(0, c.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(tiny(idx), ref(idx).logits, atol=1e-5, rtol=1e-5)
    expected = ref.generate(idx[:1], max_new_tokens=10, do_sample=False, top_k=None, top_p=None)[0, 24:]
    assert tiny.generate(idx[:1].tolist(), max_new_tokens=10)[0] == expected.tolist()

@pytest.mark.parity
def test_sampling_filters_match_transformers():
    generation = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(3)
    logits = torch.randn(4, 300) * 3
    for k in (1, 50):
        want = generation.TopKLogitsWarper(k)(None, logits.clone())
        assert torch.equal(llama.top_k_filter(logits, k), want)
    for p in (0.5, 0.9):
        want = generation.TopPLogitsWarper(p)(None, logits.clone())
        assert torch.equal(llama.top_p_filter(logits, p), want)

def test_decode_step_is_one_graph(tiny):
    """What compile_decode needs: the static step traces whole (fullgraph; dynamo's eager backend, so no compiler
    runs here) for the float and the int8 model, and generate gives the same tokens through it."""
    torch._dynamo.reset()
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16]]
    for model in (copy.deepcopy(tiny), quantize_int8(copy.deepcopy(tiny))):
        eager = model.generate(prompts, max_new_tokens=6)
        model.decode_step = torch.compile(model.decode_step, backend="eager", fullgraph=True, dynamic=False)
        model.compiled = True
        assert model.generate(prompts, max_new_tokens=6) == eager
