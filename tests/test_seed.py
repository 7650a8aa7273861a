"""seed.py: parity with the official SEED code (shared fixtures), official sizes and key coverage, strict loaders with
clear errors, preprocessing, native checkpoints, and a golden test on the released files."""
import io
import json
import logging
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import official_file
from seed import (
    CLIP_MEAN, CLIP_STD, EVAViT, OFFICIAL_IGNORED, SeedConfig, SeedTokenizer, official_to_ours, ours_to_official,
)

FIX = Path(__file__).parent / "fixtures" / "seed_tokenizer"
KEYS = Path(__file__).parent / "fixtures" / "official_keys"
FIX_CONFIG = json.loads((FIX / "config.json").read_text())
# Head counts cannot be read from tensor shapes: the fixture's come from its config.json.
FIX_HEADS = dict(
    vit_heads=FIX_CONFIG["vit"]["num_heads"],
    qformer_heads=FIX_CONFIG["qformer_bert_config"]["num_attention_heads"],
    decoder_heads=FIX_CONFIG["decoder_blocks"]["num_heads"],
)
LAYOUTS = {
    "vit_in_quantizer": (FIX / "seed_quantizer.pt", None),
    "vit_in_own_file": (FIX / "seed_quantizer_no_vit.pt", FIX / "eva_vit_g.pth"),
}

@pytest.fixture(scope="module")
def ref():
    return load_file(str(FIX / "ref.safetensors"))

def load_fixture(layout="vit_in_own_file", **kwargs):
    quantizer, vit = LAYOUTS[layout]
    return SeedTokenizer.from_official(quantizer, vit, device="cpu", **{**FIX_HEADS, **kwargs})

def meta_state(shapes: dict) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}

# --------------------------------------------------------------------------------------------------------------
# Parity with the official code on the shared fixtures (fp32)
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_fixture_parity_codes_embeddings_and_intermediates(layout, ref):
    model = load_fixture(layout)
    c = FIX_CONFIG
    assert (model.config.vit_width, model.config.vit_depth, model.config.vit_mlp) == (32, 2, c["vit"]["mlp_hidden"])
    assert (model.config.qformer.width, model.config.qformer.n_layers, model.config.qformer.intermediate) == (36, 3, 72)
    assert (model.config.n_codes, model.config.code_dim, model.config.decoder_depth) == (128, 16, 2)
    assert (model.config.image_down, model.config.embed_dim) == (tuple(c["image_down"][1:]), 24)

    images = ref["images"].float()  # stored in fp16 (exact values); the references were computed from fp32
    with torch.no_grad():
        vit = model.visual_encoder(images)
        feats = model.image_features(images)
        queries = model.query_embeddings(feats)
        z = model.to_code_space(queries)
        _, codes, _ = model.quantize(z)
        quant = model.quantize.lookup(codes)
        up = model.from_code_space(quant)
    for ours, name in [(vit, "vit_output"), (feats, "vit_features_ln"), (queries, "qformer_last_hidden_state"),
                       (z, "quant_input"), (quant, "quant"), (up, "query_output_up")]:
        torch.testing.assert_close(ours, ref[name], rtol=0, atol=1e-5, msg=name)
    assert torch.equal(codes, ref["indices"])
    assert torch.equal(model.encode(images), ref["indices"])
    torch.testing.assert_close(model.embed(ref["indices"]), ref["image_embeds"], rtol=0, atol=1e-5)
    torch.testing.assert_close(model.embed(ref["fixed_indices"]), ref["fixed_image_embeds"], rtol=0, atol=1e-5)

# --------------------------------------------------------------------------------------------------------------
# Official sizes and key coverage (meta device: no memory, no weights)
# --------------------------------------------------------------------------------------------------------------

def test_official_parameter_counts_on_meta_device():
    with torch.device("meta"):
        model = SeedTokenizer()

    def count(*parts):
        return sum(p.numel() for part in parts for p in part.parameters())

    assert count(model.visual_encoder) == 985_894_528
    # Qformer.bert of the official file: query_tokens is a separate top-level tensor there.
    assert count(model.qformer) - model.qformer.query_tokens.numel() == 105_137_664
    decode_path = count(model.quantize, model.decode_task_layer, model.blocks_image, model.image_down,
                        model.distill_image_proj) + model.pos_embed_image.numel()
    assert decode_path == 29_947_680

def test_every_official_key_is_consumed_with_its_shape_or_ignored_on_purpose(caplog):
    quantizer = json.loads((KEYS / "seed_quantizer.json").read_text())
    vit = json.loads((KEYS / "eva_vit_g.json").read_text())
    vit["blocks.39.norm1.weight"] = [1408]  # the released eva_vit_g.pth has a 40th block, which BLIP-2 skips
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in SeedTokenizer().state_dict().items()}
    consumed = set()
    for key, shape in [*quantizer.items(), *((f"visual_encoder.{k}", s) for k, s in vit.items())]:
        ours = official_to_ours(key)
        if ours in expected:
            assert expected[ours] == tuple(shape), key
            assert ours_to_official(ours) == key  # the inverse table names missing keys as the file would
            consumed.add(ours)
        else:
            ignored = any(re.match(p, key) for p in OFFICIAL_IGNORED) or key.startswith("visual_encoder.blocks.39.")
            assert ignored, f"{key} is neither loaded nor ignored on purpose"
    assert consumed == set(expected), f"never loaded: {sorted(set(expected) - consumed)}"

    # The loader itself, on meta tensors: it infers exactly the official config and finds nothing unknown.
    with caplog.at_level(logging.INFO, logger="seed"):
        model = SeedTokenizer.from_official_state_dict(meta_state(quantizer), meta_state(vit), device="meta")
    assert model.config == SeedConfig()
    assert "skipped 0 unknown tensors" in caplog.text

def test_unknown_extra_tensors_are_counted_in_one_log_line(caplog):
    quantizer = torch.load(FIX / "seed_quantizer.pt", weights_only=True)
    extras = {f"mystery.{i}.weight": torch.zeros(3) for i in range(7)}
    with caplog.at_level(logging.INFO, logger="seed"):
        SeedTokenizer.from_official_state_dict({**quantizer, **extras}, device="cpu", **FIX_HEADS)
    lines = [r.getMessage() for r in caplog.records if "unknown" in r.getMessage()]
    assert len(lines) == 1 and "skipped 7 unknown tensors" in lines[0] and "mystery.0.weight" in lines[0]

# --------------------------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------------------------

def _edited_quantizer(tmp_path, edit):
    state = torch.load(FIX / "seed_quantizer.pt", weights_only=True)
    edit(state)
    path = tmp_path / "seed_quantizer.pt"
    torch.save(state, path)
    return path

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        SeedTokenizer.from_official(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        SeedTokenizer.from_official(FIX / "seed_quantizer_no_vit.pt", tmp_path / "nope.pth")

def test_safetensors_files_load(tmp_path, ref):
    state = torch.load(FIX / "seed_quantizer.pt", weights_only=True)
    save_file(state, str(tmp_path / "seed_quantizer.safetensors"))
    model = SeedTokenizer.from_official(tmp_path / "seed_quantizer.safetensors", device="cpu", **FIX_HEADS)
    assert torch.equal(model.encode(ref["images"].float()), ref["indices"])
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read weight file .*bad.safetensors"):
        SeedTokenizer.from_official(tmp_path / "bad.safetensors")

def test_quantizer_without_vit_needs_vit_path():
    with pytest.raises(ValueError, match="vit_path"):
        SeedTokenizer.from_official(FIX / "seed_quantizer_no_vit.pt")

def test_swapped_files_are_named():
    """eva_vit_g.pth given as the quantizer and the quantizer as the ViT: the error names the key that is missing."""
    with pytest.raises(ValueError, match="eva_vit_g.pth.*missing key 'query_tokens'"):
        SeedTokenizer.from_official(FIX / "eva_vit_g.pth", FIX / "seed_quantizer_no_vit.pt", **FIX_HEADS)

@pytest.mark.parametrize("content", [b"hello, this is text", b"", b"PK\x03\x04broken zip"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "seed_quantizer.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="cannot read weight file .*seed_quantizer.pt"):
        SeedTokenizer.from_official(path)

def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        SeedTokenizer.from_official(tmp_path / "list.pt")

class _RunsCodeOnLoad:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))  # unpickling would call os.mkdir(marker)

def test_pickle_that_would_execute_code_is_refused(tmp_path):
    marker = tmp_path / "created_by_unpickling"
    torch.save({"weight": torch.zeros(2), "payload": _RunsCodeOnLoad(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused to load.*execute code"):
        SeedTokenizer.from_official(tmp_path / "evil.pt")
    assert not marker.exists()

def test_renamed_key_is_named(tmp_path):
    def rename(state):
        state["ln_vision.scale"] = state.pop("ln_vision.weight")
    with pytest.raises(ValueError) as err:
        SeedTokenizer.from_official(_edited_quantizer(tmp_path, rename), **FIX_HEADS)
    assert "missing (1)" in str(err.value) and "ln_vision.weight" in str(err.value)
    assert "unexpected (1)" in str(err.value) and "ln_vision.scale" in str(err.value)

def test_renamed_qformer_key_is_named_in_official_names(tmp_path):
    old = "Qformer.bert.encoder.layer.1.output_query.dense.weight"

    def rename(state):
        state[old.replace("dense", "linear")] = state.pop(old)
    with pytest.raises(ValueError, match=r"missing \(1\):\n\s+" + old.replace(".", r"\.")):
        SeedTokenizer.from_official(_edited_quantizer(tmp_path, rename), **FIX_HEADS)

def test_reshaped_key_is_named(tmp_path):
    def reshape(state):
        state["encode_task_layer.2.weight"] = torch.zeros(15, 36)
    with pytest.raises(ValueError, match=r"mis-shaped \(1\):\n\s+encode_task_layer\.2\.weight: "
                                         r"file \(15, 36\) vs the SEED tokenizer \(16, 36\)"):
        SeedTokenizer.from_official(_edited_quantizer(tmp_path, reshape), **FIX_HEADS)

def test_key_needed_for_size_inference_is_named(tmp_path):
    with pytest.raises(ValueError, match="missing key 'quantize.embedding.weight'"):
        SeedTokenizer.from_official(_edited_quantizer(tmp_path, lambda s: s.pop("quantize.embedding.weight")),
                                    **FIX_HEADS)

def test_heads_that_do_not_divide_the_width_are_refused():
    with pytest.raises(ValueError, match="vit_heads"):
        load_fixture(vit_heads=5)

# --------------------------------------------------------------------------------------------------------------
# Native checkpoints, dtypes, the tiny preset and training through the chain
# --------------------------------------------------------------------------------------------------------------

def test_save_and_from_pretrained_round_trip(tmp_path, ref):
    model = load_fixture()
    model.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    again = SeedTokenizer.from_pretrained(tmp_path / "tok", device="cpu")
    assert again.config == model.config
    images = ref["images"].float()
    assert torch.equal(again.encode(images), ref["indices"])
    torch.testing.assert_close(again.embed(ref["indices"]), model.embed(ref["indices"]), rtol=0, atol=0)

def test_from_pretrained_is_strict(tmp_path):
    model = SeedTokenizer(SeedConfig.preset("tiny"))
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["extra"] = torch.zeros(1)
    del state["ln_vision.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"(?s)missing \(1\):\s+ln_vision\.bias.*unexpected \(1\):\s+extra"):
        SeedTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        SeedTokenizer.from_pretrained(tmp_path / "empty")

def test_dtype_argument(ref):
    model = load_fixture(dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    codes = model.encode(ref["images"].float())
    assert codes.shape == (2, 32) and model.embed(codes).dtype == torch.bfloat16

def test_presets_and_causal_flag():
    assert SeedConfig.preset("seed-tokenizer-2") == SeedConfig()
    with pytest.raises(ValueError, match="tiny"):
        SeedConfig.preset("huge")
    model = SeedTokenizer(replace(SeedConfig.preset("tiny"), causal=False))
    assert model.config.causal is False and model.qformer.causal is False
    assert SeedTokenizer(SeedConfig.preset("tiny")).qformer.causal is True
    tiny = SeedConfig.preset("tiny")
    assert SeedConfig.from_dict(json.loads(json.dumps(tiny.to_dict()))) == tiny
    with pytest.raises(ValueError, match="unknown fields.*'colour'"):
        SeedConfig.from_dict({**tiny.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="vision_width"):
        SeedConfig(vit_width=1024)

def test_tiny_chain_trains_end_to_end():
    torch.manual_seed(0)
    model = SeedTokenizer(SeedConfig.preset("tiny"))
    pixels = torch.randn(2, 3, 32, 32)
    assert model.encode(pixels).shape == (2, 32)
    assert model.embed(model.encode(pixels)).shape == (2, 128)
    with torch.no_grad():
        feats = model.image_features(pixels)  # the frozen ViT of stages 1-2
    queries = model.query_embeddings(feats)
    z_q, codes, vq_loss = model.quantize(model.to_code_space(queries))
    recon = model.from_code_space(z_q)
    loss = vq_loss + (1 - torch.cosine_similarity(recon, queries.detach(), dim=-1)).mean() \
        + model.image_embedding(recon).pow(2).mean()
    loss.backward()
    # The straight-through estimator carries the decoder's gradient back into the Q-Former.
    assert model.qformer.layers[0].attention.query.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.visual_encoder.cls_token.grad is None

def test_eva_vit_alone():
    vit = EVAViT(image_size=32, patch_size=4, width=64, depth=2, n_heads=4, mlp_hidden=128)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 65, 64)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        vit(torch.randn(2, 3, 224, 224))

# --------------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------------

def clip_normalised(rgb):
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, CLIP_MEAN, CLIP_STD)]).view(3, 1, 1)

@pytest.fixture(scope="module")
def tok():
    return SeedTokenizer(SeedConfig.preset("tiny"))

def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()

@pytest.mark.parametrize("make, rgb", [
    (lambda: Image.new("RGB", (50, 20), (200, 30, 90)), (200, 30, 90)),
    (lambda: Image.new("RGBA", (40, 40), (10, 20, 30, 0)), (10, 20, 30)),  # alpha dropped, as convert("RGB")
    (lambda: Image.new("L", (40, 40), 77), (77, 77, 77)),
    (lambda: Image.new("RGB", (40, 40), (0, 128, 255)).quantize(4), (0, 128, 255)),  # palette
    (lambda: Image.new("CMYK", (40, 40), (0, 0, 0, 0)), (255, 255, 255)),
    (lambda: Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16)), (255, 255, 255)),  # 16-bit grey
    (lambda: np.full((10, 30, 3), (5, 6, 7), dtype=np.uint8), (5, 6, 7)),
    (lambda: np.full((10, 30), 250 * 257, dtype=np.uint16), (250, 250, 250)),  # 16-bit array
    (lambda: _png(Image.new("RGB", (9, 9), (1, 2, 3))), (1, 2, 3)),
])
def test_preprocess_converts_modes(tok, make, rgb):
    x = tok.preprocess(make())
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x, clip_normalised(rgb).expand(3, 32, 32), rtol=0, atol=1e-6)

def test_preprocess_resizes_bilinear_without_crop(tok, tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8))
    image.save(tmp_path / "a.png")
    expected = np.asarray(image.resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255
    expected = (torch.from_numpy(expected).permute(2, 0, 1) - torch.tensor(CLIP_MEAN).view(3, 1, 1)) \
        / torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(tok.preprocess(tmp_path / "a.png"), expected)
    torch.testing.assert_close(tok.preprocess(str(tmp_path / "a.png")), expected)

@pytest.mark.parametrize("bad, message", [
    (b"", "empty"),
    (b"not an image at all", "cannot read"),
    (_png(Image.new("RGB", (9, 9)))[:40], "cannot read"),  # truncated PNG
    (np.zeros((0, 5, 3), dtype=np.uint8), "empty"),
    (np.zeros((5, 5, 3), dtype=np.float32), "uint8"),
    (np.zeros((5, 5, 2), dtype=np.uint8), "H, W"),
    (12, "expected a path"),
])
def test_preprocess_rejects_unreadable_input(tok, bad, message):
    with pytest.raises(ValueError, match=message):
        tok.preprocess(bad)

def test_preprocess_unreadable_file(tok, tmp_path):
    (tmp_path / "x.jpg").write_text("text, not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read .*x\.jpg"):
        tok.preprocess(tmp_path / "x.jpg")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        tok.preprocess(tmp_path / "missing.png")

# --------------------------------------------------------------------------------------------------------------
# Golden: the released files
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.golden
def test_official_files_encode_and_embed(caplog):
    quantizer = official_file("AILab-CVC", "seed-tokenizer-2", "seed_quantizer.pt")
    vit = official_file("BLIP2", "eva_vit_g.pth")
    with caplog.at_level(logging.INFO, logger="seed"):
        model = SeedTokenizer.from_official(quantizer, vit)  # cuda + fp16 when available, else cpu + fp32
    assert model.config == SeedConfig()
    assert "unknown tensors" in caplog.text
    image = Image.new("RGB", (320, 240), (250, 250, 250))
    image.paste((220, 40, 40), (100, 60, 220, 180))  # a red square on white
    pixels = torch.stack([model.preprocess(image), model.preprocess(image.transpose(Image.FLIP_TOP_BOTTOM))])
    codes = model.encode(pixels)
    assert codes.shape == (2, 32) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 8192
    assert torch.equal(model.encode(pixels), codes)  # deterministic
    embeds = model.embed(codes)
    assert embeds.shape == (2, 1024) and torch.isfinite(embeds).all()
