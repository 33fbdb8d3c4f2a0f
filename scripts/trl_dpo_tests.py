"""Run TRL's own DPO trainer tests against MiniDPOTrainer, offline, and count what passes.

    python scripts/trl_dpo_tests.py --trl-tests PATH/TO/trl/tests [--work DIR] [-k EXPR] [--modes stock,default,summed]

PATH/TO/trl/tests is the `tests/` folder of a TRL checkout (kept outside this repository; nothing of it is copied in).
Its `test_dpo_trainer.py` runs three times, in a work folder:
  stock    TRL's `DPOTrainer` / `DPOConfig`, as the file is written;
  default  `trl.DPOTrainer` / `trl.DPOConfig` replaced by `MiniDPOTrainer` / `MiniDPOConfig` (length-averaged);
  summed   the same with `MiniDPOConfig(length_normalize=False)`, TRL's summed log-ratios.
The tests download tiny models and datasets from the Hub (`trl-internal-testing/...`); here every one of them is a
stand-in built offline: a tiny random model of the named architecture with the embedded ChatML tokenizer, saved in a
Hub cache layout (so `from_pretrained("trl-internal-testing/...")` finds it with HF_HUB_OFFLINE=1), and small
synthetic datasets with the column layouts TRL's tests read (served by a patched `datasets.load_dataset`). A test
that needs something no stand-in provides (vision models, remote code, liger, bitsandbytes) fails or skips in every
mode alike; the table counts the tests that pass with stock TRL and says which of those fail in the other modes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SNAPSHOT = "0" * 40
# Our own ChatML template with tools, tool calls and tool turns, shaped like the Qwen 2.5 one the tests expect: no
# bos token, a default system message, "<|im_start|>assistant\n" ... "<|im_end|>\n" turns.
CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' -%}{%- set system = messages[0].content -%}"
    "{%- else -%}{%- set system = 'You are a helpful assistant.' -%}{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system -}}"
    "{%- if tools -%}{{- '\\n\\nTools:' -}}{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{%- endif -%}{{- '<|im_end|>\\n' -}}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' and loop.first -%}"
    "{%- elif message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' + (message.content if message.content is string else '') -}}"
    "{%- if message.tool_calls is defined and message.tool_calls -%}{%- for call in message.tool_calls -%}"
    "{{- '<tool_call>' + (call.function | tojson) + '</tool_call>' -}}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# hub id -> (config class, config kwargs beyond the shared tiny shape)
MOE = dict(num_experts_per_tok=2)
MODELS = {
    "tiny-Qwen2ForCausalLM-2.5": ("Qwen2Config", {}),
    "tiny-Qwen3MoeForCausalLM": ("Qwen3MoeConfig", dict(num_experts=4, moe_intermediate_size=32, **MOE)),
    "tiny-GptOssForCausalLM": ("GptOssConfig", dict(num_local_experts=4, head_dim=8, **MOE)),
    "tiny-Cohere2ForCausalLM": ("Cohere2Config", {}),
    "tiny-Glm4MoeForCausalLM": ("Glm4MoeConfig", dict(n_routed_experts=4, moe_intermediate_size=32,
                                                       first_k_dense_replace=1, n_group=1, topk_group=1, **MOE)),
    "tiny-Olmo3ForCausalLM": ("Olmo3Config", {}),
    "tiny-NemotronHForCausalLM-nano": ("NemotronHConfig", dict(num_hidden_layers=4, mamba_num_heads=4, mamba_head_dim=8,
                                                               n_groups=1, ssm_state_size=16, head_dim=8)),
    "tiny-Lfm2ForCausalLM": ("Lfm2Config", {}),
    "tiny-Lfm2ForCausalLM-2.5": ("Lfm2Config", {}),
}
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048)


def build_tokenizer():
    from minidpo.embedded import build_tokenizer as embedded_tokenizer

    tok = embedded_tokenizer()
    tok.bos_token = None
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_models(cache: Path) -> None:
    import torch
    import transformers

    tok = build_tokenizer()
    for name, (config_cls, extra) in MODELS.items():
        folder = cache / f"models--trl-internal-testing--{name}"
        snapshot = folder / "snapshots" / SNAPSHOT
        if (snapshot / "config.json").is_file():
            continue
        config = getattr(transformers, config_cls)(vocab_size=len(tok), **{**TINY, **extra},
                                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.save_pretrained(snapshot)
        tok.save_pretrained(snapshot)
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(SNAPSHOT)


def _turns(i: int) -> tuple[str, str, str]:
    topics = ["the sky", "water", "a cat", "the sun", "music", "a tree", "bread", "snow"]
    t = topics[i % len(topics)]
    return f"Tell me about {t}.", f"{t.capitalize()} is lovely. Hope this helps!", f"{t.capitalize()}? Go away."


def build_datasets(root: Path) -> None:
    """The configurations of trl-internal-testing/zen, toolcall and harmony that the DPO tests load, as JSON lines."""
    def user(c):
        return {"role": "user", "content": c}

    def assistant(c):
        return {"role": "assistant", "content": c}

    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}},
                                                            "required": ["city"]}}}
    rows = {
        ("zen", "standard_preference"): lambda q, a, b: {"prompt": q, "chosen": " " + a, "rejected": " " + b},
        ("zen", "conversational_preference"): lambda q, a, b: {"prompt": [user(q)], "chosen": [assistant(a)],
                                                               "rejected": [assistant(b)]},
        ("zen", "standard_implicit_prompt_preference"): lambda q, a, b: {"chosen": f"{q} {a}", "rejected": f"{q} {b}"},
        ("zen", "conversational_implicit_prompt_preference"): lambda q, a, b: {
            "chosen": [user(q), assistant(a)], "rejected": [user(q), assistant(b)]},
        ("zen", "standard_unpaired_preference"): lambda q, a, b: {"prompt": q, "completion": " " + a, "label": True},
        ("harmony", "preference"): lambda q, a, b: {"prompt": [user(q)], "chosen": [assistant(a)],
                                                    "rejected": [assistant(b)]},
        ("toolcall", "preference"): lambda q, a, b: {
            "prompt": [user(f"What is the weather in Paris? {q}"),
                       {"role": "assistant", "content": "",
                        "tool_calls": [{"type": "function",
                                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                       {"role": "tool", "name": "get_weather", "content": "22 degrees, sunny"}],
            "chosen": [assistant("It is 22 degrees and sunny in Paris.")], "rejected": [assistant(b)],
            "tools": json.dumps([tool])},
    }
    for (name, config), make in rows.items():
        folder = root / name / config
        folder.mkdir(parents=True, exist_ok=True)
        for split, n, offset in (("train", 17, 0), ("test", 3, 100)):
            with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for i in range(n):
                    f.write(json.dumps(make(*_turns(i + offset)), ensure_ascii=False) + "\n")


CONFTEST = '''
"""Written by minidpo's scripts/trl_dpo_tests.py: offline datasets, and the trainer substitution of this mode."""
import os
from pathlib import Path

import datasets
import pytest

_ROOT = Path(os.environ["MINIDPO_TRL_DATA"])
_load_dataset = datasets.load_dataset


def load_dataset(path, name=None, split=None, streaming=False, **kwargs):
    if not str(path).startswith("trl-internal-testing/"):
        return _load_dataset(path, name, split=split, streaming=streaming, **kwargs)
    folder = _ROOT / str(path).split("/", 1)[1] / name
    if not folder.is_dir():
        raise FileNotFoundError(f"no stand-in for {path} {name}")
    files = {p.stem: str(p) for p in folder.glob("*.jsonl")}
    return _load_dataset("json", data_files=files, split=split, streaming=streaming)


datasets.load_dataset = load_dataset


@pytest.fixture(autouse=True)
def _use_cpu_without_a_gpu(monkeypatch):
    """As TRL's own test setup does: its configs default to bf16, which Transformers refuses on a CPU without
    use_cpu, so every config gets use_cpu=True on a machine without a GPU."""
    import torch
    from trl.trainer.base_config import _BaseConfig

    if torch.cuda.is_available():
        return
    post_init = _BaseConfig.__post_init__

    def with_cpu(self):
        self.use_cpu = True
        post_init(self)

    monkeypatch.setattr(_BaseConfig, "__post_init__", with_cpu)


MODE = os.environ.get("MINIDPO_TRL_MODE", "stock")
if MODE != "stock":
    import dataclasses

    import trl
    import trl.trainer.dpo_trainer

    from minidpo import MiniDPOConfig, MiniDPOTrainer

    if MODE == "summed":
        @dataclasses.dataclass
        class MiniDPOConfig(MiniDPOConfig):  # noqa: F811
            length_normalize: bool = False

    trl.DPOTrainer, trl.DPOConfig = MiniDPOTrainer, MiniDPOConfig
'''


# What test_dpo_trainer.py imports from TRL's tests/testing_utils.py, which itself imports helpers a given TRL
# release may not have: only these, written against the installed packages.
TESTING_UTILS = '''
"""Written by minidpo's scripts/trl_dpo_tests.py: the names test_dpo_trainer.py imports from testing_utils."""
import pytest
import torch
from transformers import is_bitsandbytes_available
from transformers.utils import is_kernels_available, is_peft_available, is_vision_available

from trl.import_utils import is_liger_kernel_available


class TrlTestCase:
    @pytest.fixture(autouse=True)
    def set_tmp_dir(self, tmp_path):
        self.tmp_dir = str(tmp_path)


def is_ampere_or_newer():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


require_bitsandbytes = pytest.mark.skipif(not is_bitsandbytes_available(), reason="test requires bitsandbytes")
require_kernels = pytest.mark.skipif(not is_kernels_available(), reason="test requires kernels")
require_liger_kernel = pytest.mark.skipif(not is_liger_kernel_available(), reason="test requires liger-kernel")
require_peft = pytest.mark.skipif(not is_peft_available(), reason="test requires peft")
require_vision = pytest.mark.skipif(not is_vision_available(), reason="test requires vision")
'''


def run_mode(mode: str, work: Path, tests: Path, keyword: str | None, env: dict) -> dict:
    """{test id: (outcome, first line of the failure)} of one mode."""
    folder = work / f"run-{mode}"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "tests").mkdir(parents=True)
    shutil.copy(tests / "test_dpo_trainer.py", folder / "tests" / "test_dpo_trainer.py")
    (folder / "tests" / "__init__.py").write_text("")
    (folder / "tests" / "testing_utils.py").write_text(TESTING_UTILS, encoding="utf-8")
    (folder / "conftest.py").write_text(CONFTEST, encoding="utf-8")
    report = folder / "report.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(report),
           "tests/test_dpo_trainer.py", "-o", "addopts="]
    if keyword:
        cmd += ["-k", keyword]
    proc = subprocess.run(cmd, cwd=folder, env={**env, "MINIDPO_TRL_MODE": mode}, capture_output=True, text=True)
    (folder / "output.txt").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if not report.is_file():
        sys.exit(f"{mode}: pytest wrote no report:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname').split('.')[-1]}::{case.get('name')}"
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                detail = (node.get("message") or "").strip().splitlines()[0][:200] if node.get("message") else ""
                break
        results[test_id] = (outcome, detail)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trl-tests", required=True, type=Path, help="the tests/ folder of a TRL checkout")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "minidpo-trl-tests")
    p.add_argument("--modes", default="stock,default,summed")
    p.add_argument("-k", dest="keyword", help="pytest -k expression (a subset of the tests)")
    p.add_argument("--json", type=Path, help="write every outcome of every mode here")
    args = p.parse_args(argv)
    if not (args.trl_tests / "test_dpo_trainer.py").is_file():
        sys.exit(f"{args.trl_tests} has no test_dpo_trainer.py: pass the tests/ folder of a TRL checkout")
    work = args.work.resolve()
    cache, data = work / "hub", work / "datasets"
    build_models(cache)
    build_datasets(data)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_CACHE": str(cache), "HF_HOME": str(work / "hf-home"), "MINIDPO_TRL_DATA": str(data),
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results = {}
    for mode in modes:
        results[mode] = run_mode(mode, work, args.trl_tests.resolve(), args.keyword, env)
        counts = {o: sum(1 for v in results[mode].values() if v[0] == o) for o in ("passed", "failed", "error",
                                                                                   "skipped")}
        print(f"[trl-tests] {mode}: {counts} ({work / f'run-{mode}' / 'output.txt'})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if "stock" not in results:
        return 0
    passing = sorted(t for t, (o, _) in results["stock"].items() if o == "passed")
    print("\n| mode | tests passing with stock TRL that pass here |\n| --- | ---: |")
    for mode in modes:
        print(f"| {mode} | {sum(results[mode].get(t, ('missing',))[0] == 'passed' for t in passing)} / "
              f"{len(passing)} |")
    for mode in modes:
        lost = [t for t in passing if results[mode].get(t, ("missing", ""))[0] != "passed"]
        for t in lost:
            print(f"{mode}: {t}: {results[mode].get(t, ('missing', ''))[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
