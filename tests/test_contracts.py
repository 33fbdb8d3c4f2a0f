"""The private TRL / Transformers / Datasets members minidpo relies on (minidpo/contracts.py) still exist and behave
as used, and the pins in pyproject.toml admit only the minor versions this was tested on."""

import re
import tomllib

import pytest
import torch

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
    """pyproject.toml pins trl and transformers below their next minor version, around what is installed."""
    import transformers
    import trl

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for module in (trl, transformers):
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
