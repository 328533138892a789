"""Padding through an exported model (issue 29 acceptances 1 and 2, transformers side): with
left padding and transformers' attention mask, batched `generate()` of 4 prompts of different
lengths equals one prompt at a time (with and without the cache) for CART, an ablation, Dense and
LRT (whose weights are all perturbed, so its memory matters); plain `lm_eval --model hf` runs a
generation task with batch_size=4 offline and decodes what batch_size=1 decodes.

    python -m pytest -q tests/test_export_padding.py
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need
import torch
from test_export import VARIANTS, no_cartlab_env, write_checkpoint

from cartlab.export.write import export

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread", "hf_offline")]

NAMES = ("cart", "unfreeze_kv", "dense", "lrt")
PROMPTS = ("Once upon a time there was a little fox", "The sun", "A list is a mutable sequence type in", "Cats")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("export_padding")
    return {name: export(write_checkpoint(root / name, VARIANTS[name], tiny_data, seed=i), root / "hf" / name,
                         log=lambda s: None) for i, name in enumerate(NAMES)}


def left_padded(tok, texts):
    rows = [tok(t)["input_ids"] for t in texts]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return rows, ids, mask


def test_exported_batched_generation_equals_single(folders):
    import cartlab  # noqa: F401 - registers the model type: no remote code
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in NAMES:
        model = AutoModelForCausalLM.from_pretrained(folders[name]).eval()
        model.generation_config.eos_token_id = None
        rows, ids, mask = left_padded(AutoTokenizer.from_pretrained(folders[name]), PROMPTS)
        for use_cache in (True, False):
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=use_cache,
                                     pad_token_id=0)
                for i, r in enumerate(rows):
                    single = model.generate(torch.tensor([r]), max_new_tokens=6, do_sample=False, use_cache=use_cache,
                                            pad_token_id=0)
                    assert out[i, -6:].tolist() == single[0, -6:].tolist(), (name, use_cache, i)


def test_exported_lrt_padded_forward_with_gradients_equals_each_row_alone(folders):
    """Outside `no_grad` the exported LRT runs its interleaved schedule at S = T, padded too."""
    import cartlab  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folders["lrt"]).eval()
    rows, ids, mask = left_padded(AutoTokenizer.from_pretrained(folders["lrt"]), PROMPTS)
    logits = model(ids, attention_mask=mask).logits  # (B, T, V)
    assert logits.requires_grad
    for i, r in enumerate(rows):
        torch.testing.assert_close(logits[i, -len(r):], model(torch.tensor([r])).logits[0], atol=1e-4, rtol=1e-4)


def test_plain_lm_eval_runs_a_generation_task_at_batch_size_4(folders, tmp_path, repo):
    need("lm_eval")
    need("accelerate", "lm-eval's hf model needs accelerate (pip install -e '.[eval]')")
    lm_eval_bin = Path(sys.executable).with_name("lm_eval")
    command = [str(lm_eval_bin)] if lm_eval_bin.is_file() else [sys.executable, "-m", "lm_eval"]
    outputs = {}
    for batch in (4, 1):
        out = tmp_path / f"bs{batch}"
        proc = subprocess.run([*command, "--model", "hf", "--model_args",
                               f"pretrained={folders['cart']},trust_remote_code=True", "--tasks", "cartlab_gen",
                               "--include_path", "data/tasks", "--device", "cpu", "--batch_size", str(batch),
                               "--output_path", str(out), "--log_samples"],
                              cwd=repo, env=no_cartlab_env(tmp_path), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        [samples] = out.rglob("samples_cartlab_gen_*.jsonl")
        outputs[batch] = {json.loads(line)["doc_id"]: json.loads(line)["resps"] for line in samples.read_text().splitlines()}
    assert len(outputs[4]) == 8 and outputs[4] == outputs[1]
