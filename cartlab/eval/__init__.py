"""lm-evaluation-harness integration (paper sections 7.4, 7.5): the registered `cartlab` model
(`cartlab.eval.lm.CartlabLM`) and `cartlab eval` (`cartlab.eval.run.evaluate`).

lm-eval's own command line works with the `cartlab` model through `python -m cartlab.eval`
(`cartlab/eval/__main__.py` imports the model, then hands over to lm-eval's CLI), run from the
repository root:

    python -m cartlab.eval run --model cartlab --model_args checkpoint=runs/RUN,n_loops=8 \\
        --tasks cartlab_mc --include_path data/tasks --device cpu --batch_size 8

In your own script, `import cartlab.eval.lm` before calling lm_eval registers the model the same
way. An exported folder (`cartlab export`) is scored by lm-eval's own hf model instead
(`cartlab.eval.exported.ExportLM`, what `cartlab eval EXPORTED_DIR` uses). Importing this
package is cheap; lm_eval and torch load with `cartlab.eval.lm`.
"""
