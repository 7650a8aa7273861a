"""train.py, stages 4-5 (SEED-LLaMA pretraining and instruction tuning) and the reports: the sequences the LLM is
trained on (prompt mask, held-out compositions), LoRA, and the files a run writes. The full run's numbers are
measured by hand (README); here the stages run in --smoke.
"""
import json
import random
from itertools import combinations

import pytest
import torch
import torch.nn as nn
from PIL import Image

import llama
from tokenizer import chat_conversation, chat_prompt, Tokenizer
import train
from world import ATTRIBUTES, HELD_OUT_PAIRS, Combo, build_world, parse_caption

N_CODES = 256

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train.build_llm_tokenizer(tmp_path_factory.mktemp("tok"), N_CODES, 640)

@pytest.fixture(scope="module")
def world():
    return build_world()

@pytest.fixture(scope="module")
def data(world, tokenizer):
    """LLMData with codes that name their image (image i = codes [i // 256, i % 256, 0, ...]), so every image span
    of a training sequence can be traced back to the image it came from."""
    n = len(world.combo)
    codes = torch.zeros(n, 32, dtype=torch.long)
    codes[:, 0], codes[:, 1] = torch.arange(n) // N_CODES, torch.arange(n) % N_CODES
    return train.LLMData(world, codes, train.SequenceBuilder(tokenizer))

def spans(ids, iv):
    """(start, end) positions of every `<img>` ... `</img>` span in ids (end inclusive)."""
    out, start = [], None
    for p, i in enumerate(ids):
        if i == iv.boi_id:
            start = p
        elif i == iv.eoi_id:
            out.append((start, p))
    return out

def test_train_trains_llamas_tiny_preset(tokenizer):
    assert len(tokenizer) == llama.LlamaConfig.preset("tiny").vocab_size

# --- sequences -------------------------------------------------------------------------------------------------------

def test_fast_encoding_equals_the_tokenizer_on_full_prompts(tokenizer):
    builder = train.SequenceBuilder(tokenizer)
    rng = random.Random(0)
    for user in ["<image>what colour is the shape?", "draw a large red circle on the left.", "<image>make it blue"]:
        for reply in ["a small green square at the top", "<image>"]:
            images = [[rng.randrange(N_CODES) for _ in range(32)] for _ in range((user + reply).count("<image>"))]
            messages = [user, reply + "</s>", "where is the shape?"]
            expected = tokenizer.encode(chat_prompt(messages, images=images, n_codes=N_CODES))
            assert builder.encode("<s>" + chat_conversation(messages), images) == expected
    with pytest.raises(ValueError, match="images"):
        builder.encode("<s><image>", [])

def test_the_prompt_mask_masks_exactly_the_prompt(tokenizer):
    builder, iv = train.SequenceBuilder(tokenizer), tokenizer.image_vocab
    codes = [list(range(32)), list(range(32, 64))]
    turns = [("draw a small red circle in the center.", "<image>"), ("make it blue", "<image>")]
    ids, labels = builder.chat(turns, codes)
    assert len(ids) == len(labels) and ids[0] == tokenizer.bos_id
    # The trained tokens are exactly the two replies, each `<img>` + 32 codes + `</img>` + `</s>`, in order ...
    trained = [i for i, label in zip(ids, labels) if label != train.IGNORE]
    assert trained == iv.span_ids(codes[0]) + [tokenizer.eos_id] + iv.span_ids(codes[1]) + [tokenizer.eos_id]
    assert all(label in (train.IGNORE, i) for i, label in zip(ids, labels))
    # ... and the masked tokens are exactly the prompts: the first turn's, then the second user turn.
    first = tokenizer.encode(chat_prompt([turns[0][0]]))
    assert ids[:len(first)] == first and all(label == train.IGNORE for label in labels[:len(first)])
    start = len(first) + 35
    second = tokenizer.encode("\nUSER: make it blue\nASSISTANT:")
    assert ids[start:start + len(second)] == second and labels[len(first) + 34] == tokenizer.eos_id
    assert all(label == train.IGNORE for label in labels[start:start + len(second)])
    # text replies: the caption and </s> are trained, the question is not
    ids, labels = builder.chat([("<image>describe the image.", "a small red circle in the center")], codes[:1])
    trained = [i for i, label in zip(ids, labels) if label != train.IGNORE]
    assert trained == tokenizer.encode("a small red circle in the center") + [tokenizer.eos_id]

def test_held_out_pairs_are_never_drawn_in_training(data, tokenizer):
    iv, rng = tokenizer.image_vocab, random.Random(1)
    drawn, inputs = set(), set()
    rows = [data.pretrain(rng, 0.5) for _ in range(600)] + [data.instruct(rng) for _ in range(1500)]
    for ids, labels in rows:
        for start, end in spans(ids, iv):
            image = (ids[start + 1] - iv.code_offset) * N_CODES + ids[start + 2] - iv.code_offset
            combo = data.combos[image]
            assert image in data.is_train  # the LLM never trains on a test image
            # A span right after <s> is the input of image -> caption; a span the loss does not see is an input
            # in a prompt. Every other span is an image the model learns to draw from text (or from an edit).
            if start == 1 or labels[start + 1] == train.IGNORE:
                inputs.add(combo.held_out)
            else:
                drawn.add(combo)
    assert not any(c.held_out for c in drawn), [c for c in drawn if c.held_out]
    assert len(drawn) == 120 and True in inputs  # not vacuous: all held-in combos drawn, held-out ones read

def test_attribute_level_requests_name_some_attributes_of_their_image(data):
    partial = train.LLMData(data.world, torch.tensor(data.codes), data.builder, attribute_requests=1.0)
    rng = random.Random(0)
    for i in partial.train_drawable[:40]:
        user, reply, images = partial.t2i_turn(rng, i)
        combo = partial.combos[i]
        assert combo.caption not in user and images == [partial.codes[i]]
        assert any(combo.describe(subset) in user for k in (1, 2, 3) for subset in combinations(ATTRIBUTES, k))
    assert Combo("circle", "blue", "small", "left").describe(("position", "colour")) == "a blue shape on the left"

def test_lora_starts_as_the_base_model_and_merges_exactly():
    torch.manual_seed(0)
    model = llama.Llama(llama.LlamaConfig.preset("tiny")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        base = model(ids)
        train.add_lora(model, rank=4, alpha=8.0)
        assert torch.equal(model(ids), base)  # B = 0 at the start
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
        assert len(trainable) == 2 * 7 * len(model.model.layers)  # q k v o gate up down of every block
        for m in model.modules():
            if isinstance(m, train.LoRALinear):
                m.lora_b.normal_(std=0.05)
        adapted = model(ids)
        assert (adapted - base).abs().max() > 1e-3
        train.merge_lora(model)
        assert not any(isinstance(m, train.LoRALinear) for m in model.modules())
        assert sum(isinstance(m, nn.Linear) for m in model.model.layers.modules()) == 7 * len(model.model.layers)
        torch.testing.assert_close(model(ids), adapted, atol=1e-4, rtol=1e-4)
    # the merged model has the official key layout again
    assert set(model.state_dict()) == set(llama.Llama(model.config).state_dict())

def test_caption_parser():
    assert parse_caption("a large blue triangle on the left") == {
        "size": "large", "colour": "blue", "shape": "triangle", "position": "left"}
    assert parse_caption("a large blue") == dict.fromkeys(ATTRIBUTES)

# --- the stages and the reports in --smoke ------------------------------------------------------------------------

def test_smoke_trains_the_llm_and_writes_the_reports(tmp_path, capsys):
    out = tmp_path / "run"
    train.main(["--tiny", "--smoke", "--threads", "1", "--out", str(out)])
    report = json.loads((out / "metrics.json").read_text())
    llm = report["metrics"]["llm"]
    for key in ["caption_exact", "caption_colour", "vqa_acc", "t2i_heldin_all", "t2i_heldout_all", "edit_heldin_all",
                "valid_span_rate", "image_code_loss"]:
        assert key in llm, key
    assert llm["image_code_loss"] > 0 and 0 <= llm["valid_span_rate"] <= 1
    assert {"llm_pretrain", "llm_lora", "llm_sft", "total"} <= set(report["timings_s"])
    assert report["machine"]["cpu_count"] and report["metrics"]["judge"]["clean_all"] == 1.0
    for name in train.FIGURES:
        assert Image.open(out / name).size[0] > 100, name
    curves = json.loads((out / "curves.json").read_text())
    assert set(curves) == {"clip", "qformer", "codebook", "decoder", "llm_pretrain", "llm_lora", "llm_sft"}
    assert all(c["loss"] and len(c["values"]) == train.SMOKE_STEPS for c in curves.values())
    assert len(report["metrics"]["tokenizer"]["code_probes"]) == 32 and 0 <= llm["pretrain_valid_span_rate"] <= 1
    assert len(llm["image_code_loss_by_position"]) == len(llm["pretrain_image_code_loss_by_position"]) == 33
    index = json.loads((out / "eval" / "index.json").read_text())
    assert {r["task"] for r in index} == {"t2i", "edit"}
    for r in index:
        assert r["file"] is None or (out / "eval" / r["file"]).exists()
        assert r["prompt"] and set(r["target"]) == {"shape", "colour", "size", "position"}
        assert r["held_out"] == ((r["target"]["shape"], r["target"]["colour"]) in HELD_OUT_PAIRS)
    # the LLM folder is what sample.py reads: weights, config and the tokenizer files
    model = llama.Llama.from_pretrained(out / "llama")
    tok = Tokenizer(out / "llama")
    assert model.config.vocab_size == len(tok) and tok.image_vocab.n_codes == report["metrics"]["tokenizer"]["n_codes"]
    assert "llm/caption_exact" in capsys.readouterr().out  # the results table
    # a --no-causal run beside it writes the same figures, and draws the first run's probes next to its own
    other = tmp_path / "bidirectional"
    train.main(["--tiny", "--smoke", "--threads", "1", "--no-causal", "--out", str(other), "--compare", str(out)])
    for name in train.FIGURES:
        assert (other / name).exists(), name
    with pytest.raises(SystemExit, match="--compare"):
        train.main(["--tiny", "--smoke", "--threads", "1", "--stages", "0", "--out", str(other), "--overwrite",
                    "--compare", str(tmp_path / "missing")])
