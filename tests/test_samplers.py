"""Noise schedules, the unCLIP noise augmentation and the samplers of unet.py.

Fixtures: tests/fixtures/pndm/ (diffusers PNDMScheduler with the official unclip config, fake model),
tests/fixtures/scheduler/ (DDIM reference, classifier-free guidance, noise augmentation, timestep embeddings).
"""
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unet import (ImageNoiseAugmentation, add_noise, classifier_free_guidance, ddim_sample, leading_timesteps,
                  pndm_sample, pndm_timesteps, scaled_linear_alphas_cumprod, squaredcos_cap_v2_alphas_cumprod,
                  timestep_embedding, v_target)

FIXTURES = Path(__file__).parent / "fixtures"

@pytest.fixture(scope="module")
def pndm_ref():
    return load_file(FIXTURES / "pndm" / "ref.safetensors")

@pytest.fixture(scope="module")
def ddim_ref():
    return load_file(FIXTURES / "scheduler" / "ddim_ref.safetensors")

@pytest.fixture(scope="module")
def aug_ref():
    return load_file(FIXTURES / "scheduler" / "noise_aug_ref.safetensors")

def run(sampler, model_fn, x, steps, **kw):
    """The initial sample followed by the sample after every model call, (calls + 1, ...)."""
    trajectory = [x]
    sampler(model_fn, x, steps, callback=lambda d: trajectory.append(d["x"]), **kw)
    return torch.stack(trajectory)

# --- schedules and embeddings ------------------------------------------------------------------------------------

def test_schedules_match_diffusers(pndm_ref, ddim_ref, aug_ref):
    ac = scaled_linear_alphas_cumprod()
    assert torch.equal(ac, pndm_ref["alphas_cumprod"]) and torch.equal(ac, ddim_ref["alphas_cumprod"])
    assert torch.equal(ac[:1], pndm_ref["final_alpha_cumprod"])  # set_alpha_to_one=False: the final alpha is ᾱ_0
    assert torch.equal(squaredcos_cap_v2_alphas_cumprod(), aug_ref["noiser_alphas_cumprod"])

def test_timestep_embedding_matches_diffusers(aug_ref):
    # cos/sin of fp32 arguments up to 999 rad: the vectorised kernels of different CPUs round the last bit of such
    # arguments differently (one fp32 ulp at 999 is 6e-5), so the fixture, written on another CPU, is met to 1e-4;
    # the parity test against diffusers on this CPU (below) is exact.
    torch.testing.assert_close(timestep_embedding(torch.tensor([0, 1, 100, 999]), 1024),
                               aug_ref["timestep_embedding_dim1024_levels"], atol=1e-4, rtol=0)
    torch.testing.assert_close(timestep_embedding(torch.tensor([1, 21, 500, 981]), 32),
                               aug_ref["timestep_embedding_dim32_unet_style_t"], atol=1e-6, rtol=0)
    level0 = timestep_embedding(torch.tensor([0]), 8)
    assert level0.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]  # [cos, sin] layout (flip_sin_to_cos)
    assert timestep_embedding(torch.tensor([0]), 8, flip_sin_to_cos=False).tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="1-D"):
        timestep_embedding(torch.tensor(5), 8)

def test_add_noise_and_v_target_invert():
    """From x_t and v one recovers x_0 = √ᾱ x_t - √(1-ᾱ) v and ε = √ᾱ v + √(1-ᾱ) x_t (what the samplers use)."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    ac = scaled_linear_alphas_cumprod()
    xt, v = add_noise(x0, eps, t, ac), v_target(x0, eps, t, ac)
    a = ac[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * xt - (1 - a).sqrt() * v, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.sqrt() * v + (1 - a).sqrt() * xt, eps, atol=1e-5, rtol=0)

# --- unCLIP noise augmentation -----------------------------------------------------------------------------------

def test_noise_augmentation_matches_diffusers(aug_ref):
    aug = ImageNoiseAugmentation(24)
    aug.load_state_dict({"mean": aug_ref["mean"], "std": aug_ref["std"]})  # the image_normalizer key names
    with torch.no_grad():
        for level in (0, 100, 999):
            out = aug.noise_image_embeddings(aug_ref["image_embeds"], level, aug_ref["noise"])
            assert out.shape == (2, 48)
            torch.testing.assert_close(out, aug_ref[f"noised_level{level}"], atol=1e-6, rtol=0)
            torch.testing.assert_close(out[:, 24:], aug_ref[f"timestep_embedding_level{level}"], atol=1e-6, rtol=0)

def test_noise_augmentation_level0_noise_fp32_vs_fp16():
    """fp32: level 0 still adds √(1-ᾱ_0) = 0.0064 · noise; fp16 (SEED's dtype): ᾱ_0 rounds to 1, no change."""
    aug = ImageNoiseAugmentation(16)
    g = torch.Generator().manual_seed(0)
    e, n = torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g)
    with torch.no_grad():
        out32 = aug.noise_image_embeddings(e, 0, n)
        out16 = aug.half().noise_image_embeddings(e.half(), 0, n.half())
    torch.testing.assert_close(out32[:, :16] - e, 0.0064270 * n - (1 - math.sqrt(1 - 0.0064270 ** 2)) * e,
                               atol=1e-6, rtol=0)
    assert torch.equal(out16[:, :16], e.half())
    assert out16[:, 16:].tolist() == [[1.0] * 8 + [0.0] * 8] * 2

def test_noise_augmentation_bad_input():
    aug = ImageNoiseAugmentation(16)
    with pytest.raises(ValueError, match="16"):
        aug.noise_image_embeddings(torch.zeros(1, 24), 0, torch.zeros(1, 24))
    with pytest.raises(ValueError, match="noise_level"):
        aug.noise_image_embeddings(torch.zeros(1, 16), 1000, torch.zeros(1, 16))
    with pytest.raises(ValueError, match="noise shape"):
        aug.noise_image_embeddings(torch.zeros(1, 16), 0, torch.zeros(2, 16))

# --- samplers ----------------------------------------------------------------------------------------------------

def test_timestep_lists():
    assert leading_timesteps(20) == list(range(951, 0, -50))
    assert pndm_timesteps(20) == [951, 901, 901] + list(range(851, 0, -50))  # 21 calls for 20 steps
    assert pndm_timesteps(1) == [1]
    with pytest.raises(ValueError, match="steps"):
        pndm_timesteps(0)

@pytest.mark.parametrize("steps, suffix", [(20, ""), (5, "_5steps"), (7, "_7steps"), (1, "_1steps")])
def test_pndm_matches_diffusers_fixture(pndm_ref, steps, suffix):
    """PLMS v-prediction as diffusers' PNDMScheduler (skip_prk_steps, leading, offset 1, set_alpha_to_one False)."""
    B = pndm_ref["fake_model_B"]

    def fake_model(x, t):  # the fixture's fake v-model: scalars in float64, applied to fp32 tensors
        return (0.3 * math.cos(t / 150.0)) * x + (0.2 * math.sin(t / 90.0)) * B

    assert pndm_timesteps(steps) == pndm_ref["timesteps" + suffix].tolist()
    ref = pndm_ref["trajectory" + suffix]
    torch.testing.assert_close(run(pndm_sample, fake_model, ref[0], steps), ref, atol=1e-5, rtol=0)

def test_pndm_model_inputs_match_fixture(pndm_ref):
    """The samples the model sees (call 1 sees the result of call 0, which the update then discards)."""
    B, seen = pndm_ref["fake_model_B"], []

    def fake_model(x, t):
        seen.append(x)
        return (0.3 * math.cos(t / 150.0)) * x + (0.2 * math.sin(t / 90.0)) * B

    pndm_sample(fake_model, pndm_ref["trajectory"][0], 20)
    torch.testing.assert_close(torch.stack(seen), pndm_ref["model_input"], atol=1e-5, rtol=0)

def test_ddim_and_guidance_match_diffusers_fixture(ddim_ref):
    def fake_model(x, t):
        return 0.1 * x + 0.05 * t / 1000

    denoised = []
    x = ddim_ref["trajectory"][0]
    traj = [x]
    ddim_sample(fake_model, x, 20, callback=lambda d: (traj.append(d["x"]), denoised.append(d["denoised"])))
    torch.testing.assert_close(torch.stack(traj), ddim_ref["trajectory"], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(denoised), ddim_ref["pred_original_sample"], atol=1e-5, rtol=0)

    # guidance: the doubled batch is [uncond; cond], cond = fake + 0.01, guided = u + 10 (c - u); the fixture
    # holds the first 3 steps of the 20-step schedule
    def batched(x2, t):
        offset = torch.zeros_like(x2)
        offset[x2.shape[0] // 2:] = 0.01
        return fake_model(x2, t) + offset

    ref = ddim_ref["cfg_trajectory_3steps"]
    traj = run(ddim_sample, classifier_free_guidance(batched, 10.0), ref[0], 20)
    torch.testing.assert_close(traj[:4], ref, atol=1e-5, rtol=0)

def test_samplers_keep_dtype_and_shape():
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    for sampler in (pndm_sample, ddim_sample):
        out = sampler(lambda x, t: 0.1 * x, x, 4)
        assert out.shape == x.shape and out.dtype == torch.float64

# --- parity against diffusers ------------------------------------------------------------------------------------

@pytest.mark.parity
@pytest.mark.parametrize("steps", [2, 3, 10, 50])
def test_parity_with_diffusers_schedulers(steps):
    diffusers = pytest.importorskip("diffusers")
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="v_prediction", steps_offset=1, set_alpha_to_one=False)
    g = torch.Generator().manual_seed(steps)
    x0, W = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)

    def model(x, t):
        return torch.tanh(x * W) * math.cos(t / 300) + 0.1 * W

    for sampler, cls, extra in [(pndm_sample, diffusers.PNDMScheduler, dict(skip_prk_steps=True)),
                                (ddim_sample, diffusers.DDIMScheduler, dict(clip_sample=False))]:
        sched = cls(**common, **extra)
        sched.set_timesteps(steps)
        x, ref = x0, [x0]
        for t in sched.timesteps:
            x = sched.step(model(x, int(t)), int(t), x).prev_sample
            ref.append(x)
        assert [int(t) for t in sched.timesteps] == (pndm_timesteps if sampler is pndm_sample
                                                      else leading_timesteps)(steps)
        torch.testing.assert_close(run(sampler, model, x0, steps), torch.stack(ref), atol=1e-5, rtol=0)

@pytest.mark.parity
def test_parity_timestep_embedding_with_diffusers():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0, 1, 100, 999, 981])
    for dim in (32, 320, 1024):
        ref = embeddings.get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        assert torch.equal(timestep_embedding(t, dim), ref)
