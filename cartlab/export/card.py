"""The model card (README.md) of an exported cartlab model: what it is, how it was trained, and
its downstream scores with the protocol that produced each, so a reader can reproduce them.

    ---                                  Hugging Face metadata: library, pipeline, tags
    # cartlab cart model
    ## Architecture                      family, shape, hooks, stored / effective parameters
    ## Training                          run id, checkpoint step, tokens seen, data build
    ## Downstream scores                 one column per protocol (`cartlab.eval.protocol`), each
                                         protocol written out beneath the table
    ## Loading                           with cartlab installed, or trust_remote_code without it
"""
from __future__ import annotations

from pathlib import Path

SHAPE_FIELDS = ("d_model", "n_heads", "prelude_layers", "n_loops", "n_layers", "vocab_size")


def model_card(hf_config, ckpt: Path, config: dict, scores=None) -> str:
    """README.md for an export of checkpoint `ckpt` (its cartlab `config`: model, train, run_id);
    `scores`: the run's downstream rows (`cartlab.results.downstream`), or None."""
    from cartlab.checkpoint import step_of
    from cartlab.model import LMConfig
    from cartlab.model.accounting import account

    model = hf_config.cartlab
    kind, hooks = model.get("kind"), list(model.get("hooks") or [])
    train = config.get("train") or {}
    seq_len = int(train.get("seq_len") or hf_config.max_position_embeddings or 1024)
    acc = account(LMConfig.from_dict(model), seq_len=seq_len)
    step = step_of(ckpt)
    per_step = int(train.get("batch_size", 0)) * int(train.get("grad_accum", 1)) * seq_len
    shape = ", ".join(f"{k}={model[k]}" for k in SHAPE_FIELDS if model.get(k) is not None)
    tags = ", ".join(["cartlab", str(kind), *hooks])
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", f"tags: [{tags}]", "---", "",
        f"# cartlab {kind} model", "",
        "## Architecture", "",
        f"- family: `{kind}` ({shape})",
        f"- hooks: {', '.join(f'`{h}`' for h in hooks) or 'none'}",
        f"- parameters: {acc.stored_params:,} stored, {acc.effective_params:,.0f} applied per token",
    ]
    if hf_config.n_loops is not None:
        lines.append(f"- loops: trained at R={hf_config.n_loops}; pass `n_loops=R` to `from_pretrained`, a forward "
                     f"or `generate` for another R, `exit=`/`exit_threshold=` for a per-token exit rule")
    lines += ["", "## Training", "",
              f"- run `{config.get('run_id')}`, checkpoint `{ckpt.name}`",
              f"- tokens seen: {step * per_step:,} ({step} steps x {per_step:,} tokens per step and process)"
              if step is not None and per_step else "- tokens seen: not recorded in the checkpoint",
              f"- data: {describe_data(train.get('data'))}", ""]
    lines += scores_section(scores)
    lines += ["", "## Loading", "", "```python",
              "import cartlab  # with cartlab installed: its own code, no trust_remote_code",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              'model = AutoModelForCausalLM.from_pretrained("DIR")',
              'tokenizer = AutoTokenizer.from_pretrained("DIR")', "```", "",
              "Without cartlab, the folder's `modeling_cartlab.py` (generated from cartlab's model modules; it "
              "needs torch and transformers >= 5) runs with `trust_remote_code=True`:", "",
              "```", "lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --tasks TASKS", "```", ""]
    return "\n".join(lines)


def describe_data(data) -> str:
    """The training data as the run's config names it: a recipe (cartlab data build) or a folder."""
    if not isinstance(data, dict):
        return "not recorded in the checkpoint"
    where = f"recipe `{data['recipe']}`" if data.get("recipe") else f"folder `{data.get('dir')}`"
    return f"{where} (`cartlab data build`), windows read in `{data.get('mode', 'sequential')}` order"


def scores_section(scores) -> list[str]:
    """The downstream scores as markdown: one column per protocol, each protocol written out."""
    from cartlab.eval.protocol import score_table
    from cartlab.tables import markdown_table

    head = ["## Downstream scores", ""]
    if scores is None or scores.empty:
        return head + ["No downstream scores were stored for this run when it was exported (`cartlab eval RUN "
                       "--preset local` stores them, with their protocol, in the results database)."]
    table, legend = score_table(scores)
    table = table.reset_index().drop(columns="run_id")
    return head + [markdown_table(table), "", "Protocols (`cartlab.eval.protocol`):", "",
                   *[f"- **{c}**: {p}" for c, p in zip(legend.column, legend.protocol)]]
