"""The text side of unet.py: the SD-2 text encoder and the empty prompt's token ids.

Fixtures (tests/fixtures/text_encoder/, see its README section): a reduced but valid CLIP BPE (the first 1000 merges
of the real list, 1514 tokens) and a random 2-layer CLIPTextModel with its hidden states.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unet import CLIPTextConfig, CLIPTextEncoder, empty_prompt_ids

FIXTURES = Path(__file__).parent / "fixtures"

@pytest.fixture(scope="module")
def te_dir():
    return FIXTURES / "text_encoder"

@pytest.fixture(scope="module")
def encoder(te_dir):
    config = CLIPTextConfig.from_hf(json.loads((te_dir / "text_encoder" / "config.json").read_text()))
    model = CLIPTextEncoder(config).eval()
    state = load_file(te_dir / "text_encoder" / "model.safetensors")
    model.load_state_dict({k: v for k, v in state.items() if k not in CLIPTextEncoder.IGNORED_KEYS})
    return model

# --- the empty prompt ----------------------------------------------------------------------------------------------

def test_empty_prompt_ids():
    assert empty_prompt_ids() == [49406, 49407] + [0] * 75  # stabilityai/stable-diffusion-2-1-unclip
    assert empty_prompt_ids(1514) == [1512, 1513] + [0] * 75  # the reduced BPE of the fixtures
    assert len(empty_prompt_ids(1514, context_length=10)) == 10

@pytest.mark.parity
@pytest.mark.parametrize("folder", ["text_encoder", "unclip/pipeline"])
def test_empty_prompt_ids_match_transformers_tokenizer(folder):
    """transformers' CLIPTokenizer on the fixture tokenizer files, called as the SD-2 pipelines call it, gives
    exactly `empty_prompt_ids` for "" (vocabulary size from the text encoder's config.json, as the decoder reads it)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTokenizer.from_pretrained(FIXTURES / folder / "tokenizer")
    vocab_size = json.loads((FIXTURES / folder / "text_encoder" / "config.json").read_text())["vocab_size"]
    ids = hf("", padding="max_length", max_length=77, truncation=True).input_ids
    assert ids == empty_prompt_ids(vocab_size)

# --- text encoder --------------------------------------------------------------------------------------------------

def test_text_encoder_matches_fixture(encoder, te_dir):
    ref = load_file(te_dir / "ref.safetensors")
    with torch.no_grad():
        for pad in ("pad0", "pad_eos"):
            out = encoder(ref[f"input_ids_{pad}"])
            torch.testing.assert_close(out, ref[f"last_hidden_state_{pad}"], atol=1e-5, rtol=0)
        emb = encoder.text_model["embeddings"]
        ids = ref["input_ids_pad0"]
        torch.testing.assert_close(emb["token_embedding"](ids) + emb["position_embedding"].weight,
                                   ref["embeddings_pad0"], atol=1e-6, rtol=0)

def test_text_encoder_is_causal(encoder):
    ids = torch.randint(0, encoder.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, 40:] = (changed[:, 40:] + 1) % encoder.config.vocab_size
    with torch.no_grad():
        a, b = encoder(ids), encoder(changed)
    torch.testing.assert_close(a[:, :40], b[:, :40], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 40:], b[:, 40:])
    assert encoder(ids[:, :10]).shape == (2, 10, encoder.config.width)  # shorter contexts work too

def test_official_size_and_keys_on_meta_device(fixtures):
    """The default config is the official tower: 340,387,840 parameters; every official key is consumed with its
    shape, except the ones we ignore on purpose."""
    with torch.device("meta"):
        model = CLIPTextEncoder(CLIPTextConfig())
    assert sum(p.numel() for p in model.parameters()) == 340_387_840
    official = json.loads((fixtures / "official_keys" / "sd21unclip_text_encoder.json").read_text())
    assert set(CLIPTextEncoder.IGNORED_KEYS) <= set(official)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: v for k, v in official.items() if k not in CLIPTextEncoder.IGNORED_KEYS}

def test_config_presets_and_errors():
    assert CLIPTextConfig.preset("sd21") == CLIPTextConfig()
    assert CLIPTextConfig.preset("tiny").width == 32
    with pytest.raises(ValueError, match="tiny"):
        CLIPTextConfig.preset("huge")
    with pytest.raises(ValueError, match="quick_gelu"):
        CLIPTextConfig.from_hf(dict(hidden_act="quick_gelu"))
    model = CLIPTextEncoder(CLIPTextConfig.preset("tiny"))
    with pytest.raises(ValueError, match="77"):
        model(torch.zeros(1, 78, dtype=torch.long))

# --- parity against transformers ---------------------------------------------------------------------------------

@pytest.mark.parity
def test_parity_with_transformers_clip_text_model():
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.CLIPTextConfig(vocab_size=300, hidden_size=64, intermediate_size=160,
                                            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                                            hidden_act="gelu", layer_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = transformers.CLIPTextModel(hf_config).eval()
    ours = CLIPTextEncoder(CLIPTextConfig.from_hf(hf_config.to_dict())).eval()
    state = {k: v for k, v in hf.state_dict().items() if k not in CLIPTextEncoder.IGNORED_KEYS}
    ours.load_state_dict(state)
    ids = torch.randint(0, 300, (3, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).last_hidden_state, atol=1e-5, rtol=0)

# --- golden: the official files ($SEED_WEIGHTS) ------------------------------------------------------------------

SD21 = ("stabilityai", "stable-diffusion-2-1-unclip")

@pytest.mark.golden
def test_official_empty_prompt_ids():
    """The official tokenizer files: <|startoftext|> 49406, <|endoftext|> 49407 (the last two of 49408), pad "!" = 0,
    and transformers' CLIPTokenizer on them encodes "" as `empty_prompt_ids()`."""
    from conftest import official_file
    folder = official_file(*SD21, "tokenizer", "vocab.json").parent
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    specials = json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8"))
    specials = {k: v["content"] if isinstance(v, dict) else v for k, v in specials.items()}  # str or AddedToken
    assert len(vocab) == 49408 and specials["pad_token"] == "!"
    assert [vocab[specials[k]] for k in ("bos_token", "eos_token", "pad_token")] == [49406, 49407, 0]
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTokenizer.from_pretrained(folder)
    assert hf("", padding="max_length", max_length=77, truncation=True).input_ids == empty_prompt_ids()

@pytest.mark.golden
def test_official_text_encoder_matches_transformers():
    from conftest import official_file
    weights = official_file(*SD21, "text_encoder", "model.safetensors")
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTextModel.from_pretrained(weights.parent).eval()
    ours = CLIPTextEncoder(CLIPTextConfig.from_hf(json.loads((weights.parent / "config.json").read_text())))
    assert ours.config == CLIPTextConfig()
    state = load_file(weights)
    ours.load_state_dict({k: v.float() for k, v in state.items() if k not in CLIPTextEncoder.IGNORED_KEYS})
    ids = torch.tensor([[49406, 49407] + [0] * 75, [49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70])
    with torch.no_grad():
        ref = hf(ids).last_hidden_state
        torch.testing.assert_close(ours.eval()(ids), ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
