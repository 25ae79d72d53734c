"""Hugging Face checkpoints in and out: logits and greedy tokens against the reference library."""

import json

import pytest
import torch

from lmcore.generate import generate
from lmcore.nn import ModelConfig, TransformerLM
from lmcore.nn.hf import architecture_of

transformers = pytest.importorskip("transformers")

VOCAB = 96


def reference_model(kind: str, **extra):
    """A small random-weight model of the reference library (built from a config, no download)."""
    torch.manual_seed(0)
    if kind == "pythia":
        config = transformers.GPTNeoXConfig(**{**dict(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160,
            max_position_embeddings=64, rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
            hidden_act="gelu", layer_norm_eps=1e-5, tie_word_embeddings=False), **extra})
        model = transformers.GPTNeoXForCausalLM(config)
    else:
        config = transformers.Qwen3Config(**{**dict(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, intermediate_size=96, max_position_embeddings=64, rope_theta=1e6, rms_norm_eps=1e-6,
            tie_word_embeddings=True), **extra})
        model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():  # random norms and biases too, so a swapped or dropped one shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.float().eval()


def ids(n=2, t=20):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(1))


def reference_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


CASES = [("pythia", {}), ("pythia", {"use_parallel_residual": False}), ("pythia", {"attention_bias": False}),
         ("qwen3", {}), ("qwen3", {"tie_word_embeddings": False}), ("qwen3", {"num_key_value_heads": 4})]


@pytest.mark.parametrize("kind, extra", CASES)
@pytest.mark.parametrize("backend", ["sdpa", "vectorized"])
def test_loaded_checkpoint_matches_the_reference(tmp_path, kind, extra, backend):
    ref = reference_model(kind, **extra)
    ref.save_pretrained(tmp_path / "ckpt")
    model = TransformerLM.from_pretrained(tmp_path / "ckpt", attention_backend=backend)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=1e-5, rtol=1e-5)
    prompt = x[0, :5].tolist()
    assert generate(model, [prompt], 12, temperature=0) == [reference_greedy(ref, prompt, 12)]


@pytest.mark.parametrize("kind", ["pythia", "qwen3"])
def test_saved_checkpoint_loads_in_the_reference(tmp_path, kind):
    ref = reference_model(kind)
    ref.save_pretrained(tmp_path / "a")
    model = TransformerLM.from_pretrained(tmp_path / "a")
    with torch.no_grad():  # change the weights so the round trip cannot pass by reading the old folder
        for p in model.parameters():
            p.mul_(1.5)
    model.save_pretrained(tmp_path / "b")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b").float().eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x), atol=1e-5, rtol=1e-5)
    prompt = x[1, :4].tolist()
    assert generate(model, [prompt], 10, temperature=0) == [reference_greedy(back, prompt, 10)]
    assert json.loads((tmp_path / "b" / "config.json").read_text())["architectures"] == [type(ref).__name__]


def test_presets_save_to_their_family():
    assert architecture_of(ModelConfig.preset("pythia-160m")) == "GPTNeoXForCausalLM"
    assert architecture_of(ModelConfig.preset("qwen3-4b")) == "Qwen3ForCausalLM"
    with pytest.raises(ValueError, match="qk_norm"):
        architecture_of(ModelConfig.preset("tiny"))  # lmcore's own architecture is neither


def test_sharded_checkpoint_is_read_whole(tmp_path):
    ref = reference_model("qwen3")
    ref.save_pretrained(tmp_path / "s", max_shard_size="40KB")
    assert (tmp_path / "s" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "s").glob("*.safetensors"))) > 1
    model = TransformerLM.from_pretrained(tmp_path / "s")
    x = ids(1, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=1e-5, rtol=1e-5)


def test_bad_folders_are_refused_clearly(tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(FileNotFoundError, match="does not exist"):
        TransformerLM.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TransformerLM.from_pretrained(tmp_path / "empty")
    ref = reference_model("pythia")
    ref.save_pretrained(tmp_path / "c")
    path = tmp_path / "c" / "model.safetensors"
    state = load_file(path)
    good = dict(state)
    del state["gpt_neox.layers.1.mlp.dense_h_to_4h.bias"]
    save_file(state, path)
    with pytest.raises(ValueError, match="lacks 1 tensor.*dense_h_to_4h.bias"):
        TransformerLM.from_pretrained(tmp_path / "c")
    state = dict(good, **{"gpt_neox.layers.0.attention.dense.weight": torch.zeros(64, 32)})
    save_file(state, path)
    with pytest.raises(ValueError, match=r"attention.dense.weight' has shape \(64, 32\).*\(64, 64\)"):
        TransformerLM.from_pretrained(tmp_path / "c")
    save_file(dict(good, extra=torch.zeros(1)), path)
    with pytest.raises(ValueError, match="no place for.*extra"):
        TransformerLM.from_pretrained(tmp_path / "c")
    path.unlink()
    with pytest.raises(FileNotFoundError, match="no .*safetensors"):
        TransformerLM.from_pretrained(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    (tmp_path / "c" / "config.json").write_text(json.dumps(dict(cfg, architectures=["LlamaForCausalLM"])))
    with pytest.raises(ValueError, match="architecture 'LlamaForCausalLM'"):
        TransformerLM.from_pretrained(tmp_path / "c")


def test_save_never_overwrites_unasked(tmp_path):
    model = TransformerLM(ModelConfig.preset("qwen3-0.6b", vocab_size=64, d_model=32, n_layers=1, n_heads=2,
                                             n_kv_heads=1, d_head=16, d_ff=48, context_length=16))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    model.save_pretrained(tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
