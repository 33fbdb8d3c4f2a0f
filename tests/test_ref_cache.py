"""minidpo.ref_cache: precomputed reference log-probs found again by content (a new in-memory dataset, a new run),
equal to the in-loop reference forward, and keyed by what changes them."""

import torch
from datasets import Dataset

from records_data import to_trl
from minidpo.embedded import build_tiny_model, build_tokenizer, make_preference_records
from minidpo.trainer import MiniDPOConfig, MiniDPOTrainer


def test_reference_cache_is_reused_across_runs(tmp_path, monkeypatch):
    data = [to_trl(r) for r in make_preference_records(6, seed=7)]
    cache = tmp_path / "cache"
    kw = dict(precompute_ref_log_probs=True, ref_cache_dir=str(cache), precompute_ref_batch_size=4)
    tok = build_tokenizer()

    def trainer():
        args = MiniDPOConfig(output_dir=str(tmp_path / "out"), report_to="none", max_length=512, **kw)
        return MiniDPOTrainer(build_tiny_model(tok, seed=0), args=args, train_dataset=Dataset.from_list(data),
                              processing_class=tok)

    first = trainer()
    files = list((cache / "ref-logps").glob("*.pt"))
    assert len(files) == 1
    computed, compute = [], MiniDPOTrainer._compute_ref_logps_sorted
    monkeypatch.setattr(MiniDPOTrainer, "_compute_ref_logps_sorted",
                        lambda *a: computed.append(1) or compute(*a))
    second = trainer()  # a new run, new in-memory dataset: read from disk
    assert not computed
    assert first.train_dataset["ref_chosen_logps"] == second.train_dataset["ref_chosen_logps"]
    # length-sorted precompute equals the in-loop reference forward of the same batch
    model = first.model
    batch = first.data_collator([first.train_dataset[i] for i in range(len(data))])
    chosen, rejected = first.compute_ref_log_probs(model, batch)
    torch.testing.assert_close(chosen, batch["ref_chosen_logps"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rejected, batch["ref_rejected_logps"], rtol=1e-5, atol=1e-6)
    # another max_length is another key
    args = MiniDPOConfig(output_dir=str(tmp_path / "out"), report_to="none", max_length=256, **kw)
    MiniDPOTrainer(build_tiny_model(tok, seed=0), args=args, train_dataset=Dataset.from_list(data),
                   processing_class=tok)
    assert len(computed) == 1




def test_reference_cache_misses_on_another_scoring_version_or_architecture(tmp_path, monkeypatch):
    """Same weights and pairs, but a bumped scoring-code version, or the same weights as a Mistral with a sliding
    window instead of a Llama: each is a new key (the Llama's values would be wrong for the Mistral)."""
    from transformers import MistralConfig, MistralForCausalLM

    from minidpo import ref_cache

    data = [to_trl(r) for r in make_preference_records(4, seed=7)]
    tok = build_tokenizer()
    cache = tmp_path / "cache"
    computed, compute = [], MiniDPOTrainer._compute_ref_logps_sorted
    monkeypatch.setattr(MiniDPOTrainer, "_compute_ref_logps_sorted", lambda *a: computed.append(1) or compute(*a))

    def trainer(model):
        args = MiniDPOConfig(output_dir=str(tmp_path / "out"), report_to="none", max_length=512,
                             precompute_ref_log_probs=True, ref_cache_dir=str(cache))
        return MiniDPOTrainer(model, args=args, train_dataset=Dataset.from_list(data), processing_class=tok)

    llama = build_tiny_model(tok, seed=0)
    trainer(llama)
    trainer(build_tiny_model(tok, seed=0))
    assert len(computed) == 1  # the same model again: read from the cache
    monkeypatch.setattr(ref_cache, "SCORING_VERSION", "minidpo.scoring/test-bump")
    trainer(build_tiny_model(tok, seed=0))
    assert len(computed) == 2
    config = MistralConfig(**{k: v for k, v in llama.config.to_dict().items() if k in MistralConfig().to_dict()},
                           sliding_window=8)
    mistral = MistralForCausalLM(config)
    mistral.load_state_dict(llama.state_dict())
    trainer(mistral)
    assert len(computed) == 3
    assert len(list((cache / "ref-logps").glob("*.pt"))) == 3


def test_an_unwritable_or_damaged_cache_never_stops_training(tmp_path, capsys):
    """A cache folder that cannot be written is one warning line (the values are in memory); a damaged cache file
    is recomputed; a temporary left by a killed writer goes with the next write."""
    import socket
    import subprocess
    import sys
    from types import SimpleNamespace

    from minidpo import ref_cache

    main = SimpleNamespace(is_main_process=True)
    logps = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    (tmp_path / "a-file").write_text("x")
    ref_cache.write(tmp_path / "a-file" / "ref-logps" / "k.pt", logps, main)
    assert "WARNING: cannot cache the reference log-probs in" in capsys.readouterr().out

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "ref-logps"
    folder.mkdir()
    orphan = folder / f".k.pt.tmp-{socket.gethostname()}-{dead.pid}.pt"
    orphan.write_bytes(b"half")
    ref_cache.write(folder / "k.pt", logps, main)
    assert sorted(p.name for p in folder.iterdir()) == ["k.pt"]
    assert torch.equal(ref_cache._load(folder / "k.pt"), logps)
    (folder / "k.pt").write_bytes((folder / "k.pt").read_bytes()[:40])  # cut short
    assert ref_cache._load(folder / "k.pt") is None
    assert "cannot be read" in capsys.readouterr().out
