"""train.py, stages 0-3 and the machinery around them: the config CLI, the shapes world, the judge, checkpoints and
resume, DDP. The full `python train.py --tiny` run is measured by hand (README); here every stage runs in --smoke.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
import world
from seed import SeedConfig, SeedTokenizer
from unet import DecoderConfig, UnCLIPDecoder

ROOT = Path(__file__).resolve().parent.parent
BASE = ["--tiny", "--smoke", "--threads", "1"]
SMOKE = BASE + ["--stages", "0,1,2,3"]

# --- the config CLI ------------------------------------------------------------------------------------------------

def test_every_config_field_is_a_flag():
    cfg = train.parse_config(["--tiny", "--clip.steps", "7", "--no-causal", "--decoder.guidance", "1.5",
                              "--codebook.w_vq", "3", "--resume", "false", "--out", "x"])
    assert cfg.tiny and cfg.no_causal and not cfg.resume
    assert (cfg.clip.steps, cfg.decoder.guidance, cfg.codebook.w_vq, cfg.out) == (7, 1.5, 3.0, "x")
    assert isinstance(cfg.decoder.guidance, float) and isinstance(cfg.clip.steps, int)
    text = train.argparse.ArgumentParser()
    train._add_dataclass_args(text, train.TrainConfig())
    flags = {s for a in text._actions for s in a.option_strings}

    def walk(dc, prefix=""):
        for f in train.dataclasses.fields(dc):
            value = getattr(dc, f.name)
            if train.dataclasses.is_dataclass(value):
                yield from walk(value, prefix + f.name + ".")
            else:
                yield prefix + f.name
    names = list(walk(train.TrainConfig()))
    assert names and all("--" + n in flags and "--" + n.replace("_", "-") in flags for n in names)

def test_cli_rejects_bad_values_and_smoke_is_overridable():
    with pytest.raises(SystemExit):
        train.parse_config(["--clip.steps", "many"])
    with pytest.raises(SystemExit):
        train.parse_config(["--resume", "maybe"])
    with pytest.raises(SystemExit):  # an abbreviation is not taken for the flag it starts
        train.parse_config(["--tiny", "--decoder.step", "5"])
    cfg = train.parse_config(["--tiny", "--smoke", "--decoder.steps", "5"])
    assert cfg.clip.steps == train.SMOKE_STEPS and cfg.decoder.steps == 5  # an explicit flag beats --smoke
    with pytest.raises(SystemExit, match="--tiny"):
        train.main([])
    with pytest.raises(ValueError, match="unknown --device 'tpu'"):
        train.main(["--tiny", "--device", "tpu"])

# --- the tiny presets are what train.py trains ------------------------------------------------------------------

def test_train_trains_seeds_tiny_preset():
    preset = SeedConfig.preset("tiny")
    assert train.tiny_seed_config(train.TrainConfig()) == train.dataclasses.replace(preset, causal=True)
    no_causal = train.parse_config(["--tiny", "--no-causal"])
    assert train.tiny_seed_config(no_causal) == train.dataclasses.replace(preset, causal=False)

def test_the_text_towers_read_one_token_per_word():
    ids, eos = train.tokenize(["a small red circle in the center"])
    assert [train.TEXT_VOCAB[i] for i in ids[0]] == ["<bos>", "a", "small", "red", "circle", "in", "the", "center",
                                                     "<eos>", "<pad>"]
    assert eos.tolist() == [8] and len(train.TEXT_VOCAB) == 23  # the world's 20 words, bos, eos, pad

def test_the_tiny_decoder_draws_from_the_tiny_embedding():
    assert DecoderConfig.preset("tiny").embed_dim == SeedConfig.preset("tiny").embed_dim

def test_decoder_loss_under_bf16_autocast_stays_close_to_fp32(monkeypatch):
    """--decoder.bf16 runs the UNet under bf16 autocast only where weights.bf16_matrix_units says so; the loss and
    the gradients stay fp32 and close to the fp32 step's. Forced on here, so that every CPU checks the bf16 path."""
    torch.manual_seed(0)
    decoder = UnCLIPDecoder(DecoderConfig.preset("tiny"))
    images, embeds = world.build_world().images[:8], torch.randn(8, decoder.config.embed_dim)
    alphas = train.unet.scaled_linear_alphas_cumprod()
    monkeypatch.setattr(train.weights, "bf16_matrix_units", lambda device: True)
    losses, grads = {}, {}
    for bf16 in (False, True):
        cfg = train.dataclasses.replace(train.DecoderStageConfig(), bf16=bf16)
        decoder.zero_grad()
        losses[bf16] = train.decoder_loss(decoder, images, embeds, cfg, alphas, torch.Generator().manual_seed(1))
        losses[bf16].backward()
        grads[bf16] = torch.cat([p.grad.flatten() for p in decoder.unet.parameters() if p.grad is not None])
    assert losses[True].dtype == torch.float32 and grads[True].dtype == torch.float32
    assert losses[True].item() != losses[False].item()  # the bf16 path did run
    assert abs(losses[True].item() - losses[False].item()) < 0.02 * losses[False].item()
    assert torch.nn.functional.cosine_similarity(grads[True], grads[False], dim=0) > 0.98

# --- the shapes world ----------------------------------------------------------------------------------------------

def test_world_follows_the_spec_and_is_deterministic():
    a, b = world.build_world(), world.build_world()
    assert a.images.shape == (1350, 3, 32, 32) and torch.equal(a.images, b.images)
    assert len(set(world.CAPTIONS)) == 150 and world.CAPTIONS[0] == "a small red circle in the center"
    # every combination has 7 train and 2 test images, and the test jitters cover all 9 offsets equally
    assert torch.equal(torch.bincount(a.combo[a.test]), torch.full((150,), 2))
    per_jitter = torch.bincount(a.jitter[a.test], minlength=9)
    assert per_jitter.sum() == 300 and per_jitter.max() - per_jitter.min() <= 1
    held = [c for c in world.COMBOS if c.held_out]
    assert len(held) == 30 and {(c.shape, c.colour) for c in held} == set(world.HELD_OUT_PAIRS)
    # a large red square at the centre, no jitter: box [9, 23) x [9, 23), exact colour inside, white outside
    square = world.Combo("square", "red", "large", "center")
    pixels = torch.from_numpy(np.array(world.render(square))).permute(2, 0, 1)
    inside = pixels[:, 9:23, 9:23]
    assert (inside == torch.tensor([220, 40, 40]).view(3, 1, 1)).all()
    outside = pixels.clone()
    outside[:, 9:23, 9:23] = 255
    assert (outside == 255).all()
    # the triangle points up: its top row is narrower than its bottom row
    tri = torch.from_numpy(np.array(world.render(world.Combo("triangle", "blue", "large", "center"))))
    drawn = (tri < 250).any(-1)
    rows = drawn.sum(1)
    assert rows[9] < rows[22]
    instruction, target = square.edit("position", "left")
    assert instruction == "move it on the left" and target == world.Combo("square", "red", "large", "left")
    assert square.answer("position") == "in the center" and square.answer("colour") == "red"

# --- the judge -----------------------------------------------------------------------------------------------------

def test_judge_is_exact_on_clean_renders_and_robust_to_mild_noise():
    data = world.build_world()
    combos = [world.COMBOS[i] for i in data.combo]
    assert world.judge_accuracy(list(data.images), combos)["all"] == 1.0
    gen = torch.Generator().manual_seed(0)
    noisy = data.images + torch.randn(data.images.shape, generator=gen) * (8 / 127.5)  # sigma = 8 grey levels
    assert world.judge_accuracy(list(noisy), combos)["all"] >= 0.99
    blank = torch.ones(3, 32, 32)
    assert world.judge(blank) == {"shape": None, "colour": None, "size": None, "position": None}
    wrong = world.judge_accuracy([data.images[0]], [world.COMBOS[1]])  # an image judged against another combo
    assert wrong["all"] == 0.0

def test_code_probes_read_what_each_position_carries():
    # position 0 copies the attribute-0 label, position 1 is constant, position 2 holds a code unseen in training
    labels = torch.tensor([[0, 1], [1, 0], [2, 1], [0, 0], [1, 1], [2, 0]])
    codes = torch.stack([labels[:, 0] + 10, torch.full((6,), 3), torch.tensor([5, 5, 5, 7, 7, 7])], 1)
    train_idx, test_idx = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    probes = train.code_probes(codes, labels, train_idx, test_idx)
    assert probes.shape == (3, 2)
    assert probes[0, 0] == 1.0                          # a position that copies the attribute predicts it exactly
    assert probes[1, 0] == pytest.approx(1 / 3)         # a constant code predicts the majority label only
    assert probes[2, 1] == pytest.approx(1 / 3)         # unseen codes fall back to the majority label (1)

def test_prefix_codes_keep_the_first_k_and_fill_the_rest():
    codes = torch.arange(12).view(2, 6)
    fill = torch.full((6,), -1)
    assert train.prefix_codes(codes, 2, fill).tolist() == [[0, 1, -1, -1, -1, -1], [6, 7, -1, -1, -1, -1]]
    assert torch.equal(train.prefix_codes(codes, 6, fill), codes) and codes[0, 2] == 2  # the input is not changed
    assert train.most_common_codes(torch.tensor([[1, 2], [1, 3], [4, 3]])).tolist() == [1, 3]

def test_factor_loss_is_zero_only_for_codes_that_depend_on_their_attribute_alone():
    labels = torch.tensor([[i % 3, i % 5, i % 2, (i // 2) % 5] for i in range(30)])
    factored = torch.stack([labels[:, g // 2].float()[:, None].expand(-1, 3) * (g + 1) for g in range(8)], 1)
    assert train.factor_loss(factored, labels) < 1e-6              # 8 positions, 2 per attribute, d = 3
    assert train.factor_loss(torch.randn(30, 8, 3), labels) > 0.5  # noise: the within-class variance stays

# --- stages 0-3 in smoke mode, checkpoints, resume -------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    run = train.main(SMOKE + ["--out", str(out)])
    return out, run

def test_smoke_runs_every_stage_and_writes_loadable_checkpoints(smoke_run):
    out, run = smoke_run
    for name in ("clip", "qformer", "codebook", "decoder"):
        assert len(run.curves[name]) == train.SMOKE_STEPS and all(map(torch.isfinite, torch.tensor(run.curves[name])))
        assert (out / "ckpt" / f"{name}.pt").is_file()
    tok = SeedTokenizer.from_pretrained(out / "seed")
    decoder = UnCLIPDecoder.from_pretrained(out / "decoder")
    pixels = tok.preprocess(world.render(world.COMBOS[7]))[None]
    codes = tok.encode(pixels)
    assert codes.shape == (1, 32) and int(codes.max()) < tok.config.n_codes
    image = decoder(tok.embed(codes), steps=2, guidance_scale=2.0, seed=0)[0]
    assert image.size == (32, 32)
    expected = {"clip": ["caption_acc_test"],
                "tokenizer": ["caption_acc_continuous", "caption_acc_codes", "codebook_usage", "codebook_perplexity",
                              "embedding_cosine"],
                "decoder": ["recon_all", "recon_shape", "recon_colour", "recon_size", "recon_position"]}
    for group, keys in expected.items():
        assert all(0.0 <= run.metrics[group][k] or k == "codebook_perplexity" for k in keys), group

class Killed(Exception):
    """What a test raises in place of a kill."""

def test_a_run_killed_mid_stage_resumes_to_the_same_weights(smoke_run, tmp_path, monkeypatch):
    out, _ = smoke_run
    args = BASE + ["--stages", "0,1,2", "--out", str(tmp_path)]
    save_checkpoint = train.Run.save_checkpoint

    def save_then_die(run, path, step, *rest):  # a kill right after the checkpoint of step 2 of stage 2
        save_checkpoint(run, path, step, *rest)
        if path.stem == "codebook" and step == 2:
            raise Killed
    monkeypatch.setattr(train.Run, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train.main(args)
    state = torch.load(tmp_path / "ckpt" / "codebook.pt", weights_only=True)  # whole, and mid-stage
    assert state["step"] == 2 and len(state["curve"]) == 2
    assert not list((tmp_path / "ckpt").glob("*.tmp")) and not list((tmp_path / "ckpt").glob(".*.tmp"))
    monkeypatch.undo()
    run = train.main(args + ["--resume"])
    assert len(run.curves["codebook"]) == train.SMOKE_STEPS
    # The resumed run equals the uninterrupted smoke run bit for bit (every step's randomness depends only on
    # (seed, stage, step)): this also shows that a run is reproducible from its seed.
    for name in ("clip", "qformer", "codebook"):
        a = torch.load(out / "ckpt" / f"{name}.pt", weights_only=True)
        b = torch.load(tmp_path / "ckpt" / f"{name}.pt", weights_only=True)
        assert a["curve"] == b["curve"], name
        for module in a["modules"]:
            for key in a["modules"][module]:
                assert torch.equal(a["modules"][module][key], b["modules"][module][key]), (name, module, key)

def test_a_stage_outside_stages_needs_its_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="stage 0"):
        train.main(BASE + ["--stages", "1", "--out", str(tmp_path)])

# --- DDP -----------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           str(ROOT / "train.py"), *BASE, "--stages", "0,1,2", "--device", "cpu",
           "--out", str(tmp_path)]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert SeedTokenizer.from_pretrained(tmp_path / "seed") is not None
