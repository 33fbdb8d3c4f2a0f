"""The private TRL / Transformers / Accelerate / Datasets members minidpo relies on (minidpo/contracts.py) still exist
and behave as used (the fused-head call and the log-prob sums it feeds by behaviour, with a spy model), every private
name of MiniDPOTrainer is listed, and the pins in pyproject.toml admit only the minor versions this was tested on."""

import inspect
import re
import tomllib

import pytest
import torch
from trl.trainer.utils import FusedCausalLMOutput

from helpers import REPO
from minidpo import contracts


@pytest.mark.parametrize("member", contracts.PRIVATE_MEMBERS, ids=str)
def test_private_member_still_there(member):
    problem = contracts.problem(member)
    assert problem is None, (f"{member}: {problem}. minidpo relies on it: {member.why}. Adapt minidpo to the new "
                             "version (and minidpo/contracts.py), or keep the pin in pyproject.toml.")


def test_a_renamed_member_is_reported():
    """The checks can fail: made-up members of each kind are named, with what is wrong."""
    gone = [contracts.Member("trl:DPOTrainer", "_renamed_in_a_later_release", kind, params)
            for kind, params in (("attribute", ()), ("method", ()), ("calls", ()))]
    assert [contracts.problem(m) for m in gone] == ["no longer assigned by DPOTrainer", "is gone", "is gone"]
    assert "takes no processing_class" in contracts.problem(
        contracts.Member("trl:DPOTrainer", "compute_loss", "method", ("processing_class",)))
    assert contracts.problem(contracts.Member("trl:DPOTrainer", "_save_checkpoint", "calls",
                                              ("create_model_card", "upload_everything"))) \
        == "no longer calls upload_everything"
    assert "gone" in contracts.problem(contracts.Member("trl.no_such_module", "x", "function"))
    assert contracts.problems() == []


def test_pins_admit_only_the_tested_minor_versions():
    """pyproject.toml pins trl, transformers and accelerate below their next minor version, around what is
    installed."""
    import accelerate
    import transformers
    import trl

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for module in (trl, transformers, accelerate):
        spec = next(d for d in deps if re.match(rf"{module.__name__}\b", d))
        low, high = re.fullmatch(rf"{module.__name__}>=(\d+\.\d+),<(\d+\.\d+)", spec).groups()
        major, minor = (int(x) for x in module.__version__.split(".")[:2])
        assert low == f"{major}.{minor}" and high == f"{major}.{minor + 1}", (spec, module.__version__)


def test_attention_implementation_is_read_at_every_forward():
    """Packed pair rows swap `config._attn_implementation` for one forward: every layer must look it up per call."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from minidpo.embedded import build_tiny_model, build_tokenizer

    model = build_tiny_model(build_tokenizer(), num_layers=2)
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    AttentionInterface.register("contract_counting", counting)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        model.config._attn_implementation = "contract_counting"
        got = model(input_ids=ids).logits
        model.config._attn_implementation = "sdpa"
    assert len(calls) == 2  # one per layer, chosen at call time
    torch.testing.assert_close(got, expected)


def test_fused_lm_head_gives_per_token_log_probs():
    from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head

    from minidpo.embedded import build_tiny_model, build_tokenizer

    model = build_tiny_model(build_tokenizer())
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    labels = ids.masked_fill(torch.tensor([[1, 1, 0, 0, 0]], dtype=torch.bool), -100)
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        full = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
    assert isinstance(out, FusedCausalLMOutput) and out.log_probs.shape == (1, 4)
    torch.testing.assert_close(out.log_probs[0, 1:], full[1:])  # scored positions: labels 6, 7, 8
    assert out.log_probs[0, 0] == 0  # an unscored position


def test_every_private_name_of_the_trainer_is_listed():
    """Each `_` name MiniDPOTrainer defines itself (overrides, its own helpers, `_tag_names`) and each method it
    overrides is in contracts.PRIVATE_MEMBERS: an override under a base class that defines it, a helper of its own
    under "own" (checked there: no base takes the name)."""
    from minidpo.trainer import MiniDPOTrainer

    bases = inspect.getmro(MiniDPOTrainer)[1:]
    listed = {}
    for m in contracts.PRIVATE_MEMBERS:
        if m.owner.partition(":")[2]:
            listed.setdefault(m.name, set()).add((contracts._resolve(m.owner), m.kind))
    defined = [name for name, value in vars(MiniDPOTrainer).items()
               if (name.startswith("_") and not (name.startswith("__") and name.endswith("__")))
               or (callable(value) and any(name in vars(b) for b in bases))]
    assert "_prepare_dataset" in defined and "_tag_names" in defined and "compute_loss" in defined  # the probe works
    unlisted = []
    for name in defined:
        overrides = any(name in vars(b) for b in bases)
        ok = [(owner, kind) for owner, kind in listed.get(name, ())
              if owner in bases and (kind == "own") != overrides]
        if not ok:
            unlisted.append(f"{name} ({'override' if overrides else 'own'})")
    assert not unlisted, (f"MiniDPOTrainer defines {', '.join(unlisted)}, not listed in minidpo/contracts.py: add "
                          "each with why minidpo needs it (an override under the base class that defines it, a "
                          "helper of minidpo's own with kind 'own')")


def test_own_names_are_refused_once_a_base_takes_them():
    assert contracts.problem(contracts.Member("trl:DPOTrainer", "_compute_loss", "own")) \
        == "is now defined by DPOTrainer too"
    assert contracts.problem(contracts.Member("trl:DPOTrainer", "_metrics", "own")) \
        == "is now defined by DPOTrainer too"  # assigned in a base's __init__
    assert contracts.problem(contracts.Member("trl:DPOTrainer", "_precompute_model", "own")) is None
    assert contracts.problem(contracts.Member("trl:DPOTrainer", "_compute_loss", "source", ("no such text",))) \
        == "no longer has 'no such text'"


class _SpyModel(torch.nn.Module):
    """Stands in for a model with TRL's fused LM head: records each call, returns given per-token log-probs."""

    def __init__(self, log_probs):
        super().__init__()
        self.log_probs = log_probs
        self.calls = []

    def forward(self, **kwargs):
        self.calls.append(kwargs)
        n = self.log_probs.shape
        return FusedCausalLMOutput(log_probs=self.log_probs.clone(), entropy=torch.zeros(n),
                                   mean_logits=torch.zeros(n), is_top1=torch.zeros(n, dtype=torch.bool))


def _stock_trainer(tmp_path, **kw):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from minidpo.embedded import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    data = Dataset.from_list([{"prompt": "Hi", "chosen": " Hello there", "rejected": " Go away"}] * 2)
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, beta=0.5, **kw)
    return DPOTrainer(build_tiny_model(tok), ref_model=build_tiny_model(tok), args=args, train_dataset=data,
                      processing_class=tok)


# one pair: chosen row then rejected row, 6 positions; the fused head gives 5 per-token log-probs a row
_IDS = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 10, 11, 0, 0]])
_COMPLETION = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]])
_PER_TOKEN = torch.tensor([[0.0, -0.5, -1.0, -0.25, 0.0], [0.0, -2.0, -1.5, 0.0, 0.0]])


def _batch(**extra):
    return {"input_ids": _IDS, "attention_mask": (_IDS != 0).long(), "completion_mask": _COMPLETION, **extra}


def test_trl_scores_through_the_fused_head_and_sums_its_log_probs(tmp_path):
    """What makes minidpo's loss MiniMind's length-averaged one: stock TRL calls `model(..., labels=,
    fused_lm_head=True)` and sums the `.log_probs` it returns into each sequence's log-prob (minidpo's forward has
    divided them by the scored-token count, so the sum is the mean). Checked on stock `DPOTrainer.compute_loss` with
    a spy model whose per-token log-probs are known: the loss is the hand-derived sigmoid DPO loss on their sums."""
    import torch.nn.functional as F

    trainer = _stock_trainer(tmp_path, precompute_ref_log_probs=True)
    trainer.model.train()
    spy = _SpyModel(_PER_TOKEN)
    ref_chosen, ref_rejected = torch.tensor([-2.0]), torch.tensor([-3.0])
    loss = trainer.compute_loss(spy, _batch(ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected))

    (call,) = spy.calls
    assert call["fused_lm_head"] is True
    torch.testing.assert_close(call["labels"], _IDS.masked_fill(_COMPLETION == 0, -100))
    assert "completion_mask" not in call and "ref_chosen_logps" not in call
    chosen, rejected = -0.5 - 1.0 - 0.25, -2.0 - 1.5  # the sums of the rows' log-probs
    expected = -F.logsigmoid(torch.tensor(0.5 * ((chosen - -2.0) - (rejected - -3.0))))
    torch.testing.assert_close(loss, expected)


def test_trl_reference_log_probs_are_chosen_and_rejected_sums(tmp_path):
    """`compute_ref_log_probs(model, batch)` (the sorted precompute calls it) scores through the fused head and
    returns (chosen sums, rejected sums) of its `.log_probs`."""
    trainer = _stock_trainer(tmp_path)
    spy = _SpyModel(_PER_TOKEN)
    chosen, rejected = trainer.compute_ref_log_probs(spy, _batch())
    (call,) = spy.calls
    assert call["fused_lm_head"] is True
    torch.testing.assert_close(call["labels"], _IDS.masked_fill(_COMPLETION == 0, -100))
    torch.testing.assert_close(chosen, torch.tensor([-1.75]))
    torch.testing.assert_close(rejected, torch.tensor([-3.5]))
