"""unet.py: the SD-2.1-unclip UNet, the VAE decoder and the UnCLIPDecoder pipeline + loaders.

(The text encoder and the empty prompt's ids are tested in tests/test_clip.py, the samplers in test_samplers.py.)
Fixtures: tests/fixtures/{unet,vae,unclip}/ (see tests/fixtures/README.md), random weights in the official formats.
"""
import json
import shutil
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import unet as U

# the official keys, shapes from a meta-device build of the reference classes (tests/fixtures/official_keys/)
OFFICIAL = {"unet": "sd21unclip_unet.json", "vae": "sd21unclip_vae.json",
            "text_encoder": "sd21unclip_text_encoder.json", "image_normalizer": "sd21unclip_image_normalizer.json"}

def _fixture_unet(fixtures):
    unet = U.UNet(U.UNetConfig.from_diffusers(json.loads((fixtures / "unet/config.json").read_text())))
    unet.load_state_dict(load_file(fixtures / "unet/diffusion_pytorch_model.safetensors"), strict=True)
    return unet.eval()

# ---- full-scale structure --------------------------------------------------------------------------

def test_official_parameter_counts():
    with torch.device("meta"):
        unet, vae = U.UNet(U.UNetConfig()), U.VAEDecoder(U.VAEConfig())
    assert sum(p.numel() for p in unet.parameters()) == 870_173_124
    assert sum(p.numel() for p in vae.parameters()) == 49_490_199  # decoder + post_quant_conv

@pytest.mark.parametrize("vae_keys", ["sd21unclip_vae.json", "sd21unclip_vae_diffusers_current_names.json"])
def test_every_official_key_is_consumed_or_ignored(fixtures, vae_keys):
    """The loader's own mapping (official_key) takes every official tensor to a parameter of the same shape,
    or to the explicit ignore list; and every parameter of the model is fed."""
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in U.UnCLIPDecoder(U.DecoderConfig()).state_dict().items()}
    fed, ignored = {}, []
    for component, name in {**OFFICIAL, "vae": vae_keys}.items():
        official = json.loads((fixtures / "official_keys" / name).read_text())
        legacy = any(".attentions.0.query." in key for key in official)
        for key, shape in official.items():
            ours_key = U.official_key(component, key)
            if ours_key is None:
                ignored.append(f"{component}.{key}")
                continue
            assert ours.get(ours_key) == tuple(shape), f"{component}/{key} -> {ours_key}: {shape}"
            assert U.file_key(component, ours_key, legacy) == key  # the inverse the loader reports errors with
            fed[ours_key] = shape
    assert set(fed) == set(ours)
    # the ignore list is exactly what SEED never runs: the VAE encoder side and the text position_ids buffer
    assert all(k.startswith(("vae.encoder.", "vae.quant_conv.", "text_encoder.text_model.embeddings.position_ids"))
               for k in ignored)
    assert len([k for k in ignored if k.startswith("vae.")]) == 248 - 140

# ---- parity on the shared fixtures ----------------------------------------------------------------

def test_unet_matches_diffusers_fixture(fixtures):
    unet, ref = _fixture_unet(fixtures), load_file(fixtures / "unet/ref.safetensors")
    args = ref["sample"], ref["encoder_hidden_states"], ref["class_labels"]
    with torch.no_grad():
        for t, key in [(ref["timestep"], "out_t981"), (1, "out_t1"), (ref["timesteps_per_sample"], "out_per_sample_t")]:
            torch.testing.assert_close(unet(args[0], t, *args[1:]), ref[key], atol=1e-5, rtol=0)
        t_proj = U.timestep_embedding(ref["timestep"].expand(2), unet.config.block_out_channels[0])
        torch.testing.assert_close(t_proj, ref["time_proj_t981"], atol=1e-6, rtol=0)
        torch.testing.assert_close(unet.time_embedding(t_proj), ref["time_embedding_t981"], atol=1e-5, rtol=0)
        torch.testing.assert_close(unet.class_embedding(ref["class_labels"]), ref["class_embedding"], atol=1e-5, rtol=0)

@pytest.mark.parametrize("naming", ["legacy_names", "new_names"])
def test_vae_decode_matches_diffusers_fixture(fixtures, naming):
    folder = fixtures / "vae" / naming
    vae = U.VAEDecoder(U.VAEConfig.from_diffusers(json.loads((folder / "config.json").read_text())))
    state = {}
    for key, t in load_file(folder / "diffusion_pytorch_model.safetensors").items():
        if (name := U.official_key("vae", key)) is not None:
            state[name.removeprefix("vae.")] = t
    vae.load_state_dict(state, strict=True)
    ref = load_file(fixtures / "vae/ref.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(vae(ref["latents"]), ref["decoded"], atol=1e-5, rtol=0)
        torch.testing.assert_close(vae(ref["latents"] / 0.18215), ref["decoded_latents_div_scaling_factor"],
                                   atol=1e-5, rtol=0)

@pytest.fixture(scope="module")
def pipeline():
    from conftest import FIXTURES
    return U.UnCLIPDecoder.from_official(FIXTURES / "unclip/pipeline", device="cpu")

def test_from_official_components(pipeline, fixtures):
    ref = load_file(fixtures / "unclip/ref.safetensors")
    assert pipeline.vae is not None and pipeline.config.vae.scaling_factor == 0.18215
    assert U.empty_prompt_ids(pipeline.config.text.vocab_size) == ref["empty_prompt_input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(pipeline.prompt_states(2), ref["prompt_embeds"], atol=1e-5, rtol=0)
        case = "steps20_neg"
        labels = pipeline.class_labels(ref["image_embeds"], ref["negative_image_embeds"], 0, ref[f"{case}/noise"], True)
        torch.testing.assert_close(labels, ref[f"{case}/class_labels"], atol=1e-5, rtol=0)
        x = ref["latents"]
        v = pipeline.unet(torch.cat([x, x]), int(ref[f"{case}/timesteps"][0]), ref["prompt_embeds"], labels)
        torch.testing.assert_close(v, ref[f"{case}/unet_output"][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(pipeline.decode(ref[f"{case}/final_latents"]), ref[f"{case}/decoded"],
                                   atol=1e-5, rtol=0)

@pytest.mark.parametrize("case", ["steps20_noneg", "steps20_neg", "steps5_noneg", "steps5_neg"])
def test_whole_pipeline_matches_official(pipeline, fixtures, case):
    """Embedding + latents + augmentation noise -> uint8 image, against SEED's pipeline copy (fp32)."""
    ref = load_file(fixtures / "unclip/ref.safetensors")
    neg = ref["negative_image_embeds"] if case.endswith("_neg") else None
    steps = int(case.split("_")[0].removeprefix("steps"))
    images = pipeline(ref["image_embeds"], neg, steps=steps, guidance_scale=10.0, noise_level=0,
                      latents=ref["latents"], noise=ref[f"{case}/noise"])
    ours = np.asarray(images[0]).astype(int)
    theirs = ref[f"{case}/image_uint8"][0].numpy().astype(int)
    diff = np.abs(ours - theirs)
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.999, (diff.max(), (diff == 0).mean())

def test_half_precision_pipeline_stays_close(fixtures):
    """The fp16 path (fp16 networks, fp32 sampler state) runs and stays near the fp32 reference: 1.1 grey levels
    on average here, the fp16 rounding of random weights amplified by guidance 10."""
    ref = load_file(fixtures / "unclip/ref.safetensors")
    model = U.UnCLIPDecoder.from_official(fixtures / "unclip/pipeline", device="cpu", dtype=torch.float16)
    assert model.unet.conv_in.weight.dtype == model.vae.decoder.conv_out.weight.dtype == torch.float16
    image = model(ref["image_embeds"], steps=5, latents=ref["latents"], noise=ref["steps5_noneg/noise"])[0]
    diff = np.abs(np.asarray(image).astype(int) - ref["steps5_noneg/image_uint8"][0].numpy().astype(int))
    assert diff.mean() < 3

# ---- checkpoints and errors ----------------------------------------------------------------------

def test_save_pretrained_round_trip(pipeline, tmp_path):
    pipeline.save_pretrained(tmp_path)
    again = U.UnCLIPDecoder.from_pretrained(tmp_path, device="cpu")
    assert again.config == pipeline.config
    for (k, a), (k2, b) in zip(pipeline.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert torch.equal(again.prompt_states(2), pipeline.prompt_states(2))  # E("") recomputed on load

def test_empty_prompt_states_follow_the_weights(pipeline):
    """E("") is computed once per set of weights: at construction, and again after any load_state_dict."""
    model = U.UnCLIPDecoder(pipeline.config)
    assert not torch.equal(model.prompt_states(1), pipeline.prompt_states(1))  # its own random weights
    model.load_state_dict(pipeline.state_dict())
    assert torch.equal(model.prompt_states(1), pipeline.prompt_states(1))
    assert "empty_prompt_states" not in model.state_dict()  # never saved: the text encoder's weights define it

def test_tiny_pixel_space_decoder(tmp_path):
    """The tiny preset (no VAE, no text encoder, 3 x 32 x 32) runs end to end and round-trips."""
    model = U.UnCLIPDecoder(U.DecoderConfig.preset("tiny")).eval()
    assert model.vae is None and model.text_encoder is None and model.prompt_states(2) is None
    E = model.config.embed_dim
    v = model.unet(torch.randn(2, 3, 32, 32), torch.tensor([5, 900]), None, torch.randn(2, 2 * E))
    assert v.shape == (2, 3, 32, 32)
    images = model(torch.randn(2, E), steps=2, seed=0)
    assert len(images) == 2 and images[0].size == (32, 32) and images[0].mode == "RGB"
    e = torch.randn(2, E)
    first, again = model(e, steps=2, seed=0), model(e, steps=2, seed=0)  # the seed fixes noise and latents
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    model.save_pretrained(tmp_path)
    again = U.UnCLIPDecoder.from_pretrained(tmp_path, device="cpu")
    assert again.config == model.config and again.vae is None

def test_sampler_by_name():
    """sampler="ddim" runs DDIM over the same model and noise (another image than PNDM); unknown names list the
    choices."""
    model = U.UnCLIPDecoder(U.DecoderConfig.preset("tiny")).eval()
    e = torch.randn(1, model.config.embed_dim)
    pndm, ddim = model(e, steps=3, seed=0)[0], model(e, steps=3, seed=0, sampler="ddim")[0]
    assert ddim.size == pndm.size and not np.array_equal(np.asarray(ddim), np.asarray(pndm))
    with pytest.raises(ValueError, match="choices: pndm, ddim"):
        model(e, steps=3, sampler="euler")

def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="choices"):
        U.DecoderConfig.preset("sd15")

def test_bad_inputs_give_clear_errors(pipeline):
    E = pipeline.config.embed_dim
    with pytest.raises(ValueError, match=rf"\(B, {E}\)"):
        pipeline(torch.zeros(1, E + 1), steps=1)
    with pytest.raises(ValueError, match="NaN"):
        pipeline(torch.full((1, E), float("nan")), steps=1)
    with pytest.raises(ValueError, match="latents contains NaN"):
        pipeline(torch.zeros(1, E), latents=torch.full((1, 4, 8, 8), float("nan")), steps=1)
    with pytest.raises(ValueError, match=r"noise must be \(draws=2"):
        pipeline(torch.zeros(1, E), torch.zeros(1, E), noise=torch.zeros(1, 1, E), steps=1)
    with pytest.raises(ValueError, match="negative_image_embeds"):
        pipeline(torch.zeros(1, E), torch.zeros(1, 3), steps=1)
    with pytest.raises(ValueError, match="class_labels"):
        pipeline.unet(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 77, 32), torch.zeros(1, 7))

def test_folder_missing_a_component(tmp_path, fixtures):
    shutil.copytree(fixtures / "unclip/pipeline", tmp_path / "p")
    shutil.rmtree(tmp_path / "p/vae")
    with pytest.raises(FileNotFoundError, match="vae"):
        U.UnCLIPDecoder.from_official(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        U.UnCLIPDecoder.from_pretrained(tmp_path / "nothing")

def test_strict_loader_names_bad_keys(tmp_path, fixtures):
    shutil.copytree(fixtures / "unclip/pipeline", tmp_path / "p")
    path = tmp_path / "p/unet/diffusion_pytorch_model.safetensors"
    state = load_file(path)
    del state["conv_in.bias"]
    state["conv_out.weight"] = state["conv_out.weight"][:2]
    state["extra.weight"] = torch.zeros(1)
    from safetensors.torch import save_file
    save_file(state, path)
    with pytest.raises(ValueError) as err:
        U.UnCLIPDecoder.from_official(tmp_path / "p", device="cpu")
    message = str(err.value)  # in the folder's own names: component/key
    assert "missing (1):\n    unet/conv_in.bias" in message and "unexpected (1):\n    unet/extra.weight" in message
    assert "unet/conv_out.weight: file (2," in message

def test_fp16_variant_and_bin_files(tmp_path, fixtures, pipeline):
    """`<stem>.fp16.bin` files (the .bin twins of the hub's fp16 variant) load with variant="fp16"."""
    folder = tmp_path / "p"
    shutil.copytree(fixtures / "unclip/pipeline", folder)
    for path in folder.glob("*/*.safetensors"):
        stem = "pytorch_model" if path.stem == "model" else path.stem
        torch.save({k: v.half() for k, v in load_file(path).items()}, path.with_name(f"{stem}.fp16.bin"))
        path.unlink()
    model = U.UnCLIPDecoder.from_official(folder, device="cpu", dtype=torch.float32, variant="fp16")
    for (key, ours), theirs in zip(model.state_dict().items(), pipeline.state_dict().values()):
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs.half().float()), key
    with pytest.raises(FileNotFoundError, match="expected one of"):
        U.UnCLIPDecoder.from_official(folder, device="cpu", variant="bf16")

# ---- parity against diffusers on random configs (dev dependency) -----------------------------------

@pytest.mark.parity
@pytest.mark.parametrize("mid,shift", [("UNetMidBlock2DCrossAttn", "default"), ("UNetMidBlock2D", "default"),
                                       ("UNetMidBlock2D", "scale_shift"), ("UNetMidBlock2DCrossAttn", "scale_shift")])
def test_unet_matches_diffusers_random_config(mid, shift):
    """Another layout than the fixture: 3 levels, a plain level first, odd latent sides (upsample_size path);
    both ways a resnet takes the embedding (SD's additive one and the tiny decoder's FiLM)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    kwargs = dict(sample_size=9, in_channels=3, out_channels=5, block_out_channels=(16, 32, 32), layers_per_block=1,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), mid_block_type=mid,
                  attention_head_dim=(1, 2, 4), cross_attention_dim=24, norm_num_groups=8,
                  class_embed_type="projection", projection_class_embeddings_input_dim=20,
                  use_linear_projection=True, flip_sin_to_cos=True, freq_shift=0, resnet_time_scale_shift=shift)
    ref = diffusers.UNet2DConditionModel(**kwargs).eval()
    with torch.no_grad():  # diffusers zero-initialises some layers; randomise everything so they all count
        for p in ref.parameters():
            p.normal_(0, 0.2)
    unet = U.UNet(U.UNetConfig.from_diffusers(dict(ref.config))).eval()
    unet.load_state_dict(ref.state_dict(), strict=True)
    x, text, label = torch.randn(2, 3, 9, 11), torch.randn(2, 7, 24), torch.randn(2, 20)
    with torch.no_grad():
        want = ref(x, torch.tensor([3, 700]), encoder_hidden_states=text, class_labels=label).sample
        torch.testing.assert_close(unet(x, torch.tensor([3, 700]), text, label), want, atol=1e-4 * want.abs().max(),
                                   rtol=0)

@pytest.mark.parity
def test_vae_decoder_matches_diffusers_random_config():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=3,
                                  norm_num_groups=4).eval()
    vae = U.VAEDecoder(U.VAEConfig.from_diffusers(dict(ref.config))).eval()
    state = {k: v for k, v in ref.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    vae.load_state_dict(state, strict=True)
    z = torch.randn(2, 3, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(vae(z), ref.decode(z).sample, atol=1e-5, rtol=0)

def test_unsupported_diffusers_config_is_refused(fixtures):
    cfg = json.loads((fixtures / "unet/config.json").read_text())
    with pytest.raises(ValueError, match="use_linear_projection"):
        U.UNetConfig.from_diffusers({**cfg, "use_linear_projection": False})
    with pytest.raises(ValueError, match="up_block_types"):
        U.UNetConfig.from_diffusers({**cfg, "up_block_types": ["UpBlock2D"] * 4})
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        U.UNetConfig.from_diffusers({**cfg, "resnet_time_scale_shift": "spatial"})

# ---- memory at full scale, traced on the meta device (no weights, no GPU) -------------------------------

class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated by the ops run inside the mode (a storage is freed when its
    last tensor dies). Works on the meta device, where every storage still has its nbytes."""

    def __init__(self, existing=()):
        super().__init__()
        self.live = self.peak = 0
        self.refs = {}  # storage id -> (bytes, live tensors on it)
        self.existing = {t.untyped_storage()._cdata for t in existing}  # weights and inputs: not activations

    def _drop(self, key):
        n, count = self.refs[key]
        if count == 1:
            del self.refs[key]
            self.live -= n
        else:
            self.refs[key] = (n, count - 1)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and (key := t.untyped_storage()._cdata) not in self.existing:
                n, count = self.refs.get(key, (t.untyped_storage().nbytes(), 0))
                if count == 0:
                    self.live += n
                    self.peak = max(self.peak, self.live)
                self.refs[key] = (n, count + 1)
                weakref.finalize(t, self._drop, key)
        return out

def test_fp16_memory_at_768(monkeypatch, capsys):
    """Full-scale fp16 activation peaks at 768 x 768, from a trace of the real forward passes on the meta device.
    The UNet runs its CFG batch of 2; the VAE decodes one image at a time. SDPA is replaced by what CUDA's flash /
    memory-efficient kernels allocate (the output only), since the meta device has no such kernel."""
    monkeypatch.setattr(U.F, "scaled_dot_product_attention", lambda q, k, v, **kw: torch.empty_like(q))
    with torch.device("meta"), torch.no_grad():
        model = U.UnCLIPDecoder(U.DecoderConfig()).half()
        x, text = torch.empty(2, 4, 96, 96, dtype=torch.half), torch.empty(2, 77, 1024, dtype=torch.half)
        labels, ids = torch.empty(2, 2048, dtype=torch.half), torch.zeros(1, 77, dtype=torch.long)
        peaks = {}
        for name, run in (("text encoder", lambda: model.text_encoder(ids)),
                          ("UNet CFG step", lambda: model.unet(x, 951, text, labels)),
                          ("VAE decode", lambda: model.vae(x[:1]))):
            with PeakMemory([*model.parameters(), x, text, labels, ids]) as mode:
                run()
            peaks[name] = mode.peak
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with capsys.disabled():
        print(f"\nfp16 weights {weights / 1e6:.0f} MB; activation peaks: "
              + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in peaks.items()))
    assert weights == 2 * (870_173_124 + 49_490_199 + 340_387_840 + 2 * 1024)
    # the largest single activation of the VAE is (1, 256, 768, 768) fp16 = 0.30 GB; its resnet holds three
    assert peaks["VAE decode"] < 1.0e9 and peaks["UNet CFG step"] < 0.4e9

# ---- golden: the real stable-diffusion-2-1-unclip folder ($SEED_WEIGHTS) ---------------------------------

@pytest.mark.golden
def test_official_folder_loads_and_runs():
    """Loads the released folder strictly (fp32 files, else the fp16 variant) and checks E("") of the empty
    prompt's ids (pad id 0) and the normaliser (mean 0 / std 1); then one small UNet call and decode."""
    from conftest import official_file
    folder = official_file("stabilityai", "stable-diffusion-2-1-unclip", "model_index.json").parent
    variant = None if (folder / "unet/diffusion_pytorch_model.safetensors").exists() else "fp16"
    model = U.UnCLIPDecoder.from_official(folder, device="cpu", dtype=torch.float32, variant=variant)
    assert sum(p.numel() for p in model.unet.parameters()) == 870_173_124
    with torch.no_grad():
        ids = torch.tensor([[49406, 49407] + [0] * 75])
        assert torch.equal(model.prompt_states(1), model.text_encoder(ids))
    assert torch.all(model.noise_augmentation.mean == 0) and torch.all(model.noise_augmentation.std == 1)
    with torch.no_grad():
        text = model.prompt_states(2)
        v = model.unet(torch.randn(2, 4, 16, 16), 951, text, torch.zeros(2, 2048))
        image = model.decode(torch.randn(1, 4, 8, 8))
    assert v.shape == (2, 4, 16, 16) and torch.isfinite(v).all()
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
