"""Every analysis figure, under one name: each lives with the analysis it draws, and this module
re-exports it so notebooks can keep calling `plots.plot_x`. Each takes results-schema frames and
returns a matplotlib Figure; nothing is shown or saved (call fig.savefig yourself).

    fig = plots.plot_scaling_fit(res.runs, res.eval_log, x="flops", where={"stage": "stage2", "n_loops": 6})

Where each lives:

    cartlab.analysis.scaling        plot_scaling_fit, plot_scaling_groups (power-law fits; FLOPs axis
                                    from the model accounting, cartlab.analysis.runs)
    cartlab.analysis.scaling_study  plot_iso_loss, plot_compute_frontier, plot_law_residuals (the joint law)
    cartlab.analysis.spectral       plot_radius_trajectories (the LTI gate's radius, section 6)
    cartlab.analysis.loops          plot_loop_profiles, plot_loop_contraction, plot_loop_trajectories
    cartlab.analysis.depth          plot_depth_profiles, plot_variable_r_profile (test-time depth)
    cartlab.analysis.adaptive       plot_frontier, plot_convergence (exit rules, fixed points: issue 27)
    cartlab.analysis.stats          plot_train_loss (smoothed), plot_loss_curves, plot_validation_curves,
                                    plot_train_dynamics (seed mean +/- 1 sd over training)
    cartlab.analysis.screen         plot_r_reversal (screen vs full training)
    cartlab.analysis.decompose      plot_gap_waterfall (the CART-Dense gap, section 8)
    cartlab.analysis.compute        plot_loss_vs_flops, plot_lrt_gap (matched compute, LRT's probe)
    cartlab.analysis.figures        figure_png and the helpers the figures share

`config_label` (schema) is here too, for the notebooks that label tables with it.
"""
from __future__ import annotations

from cartlab.analysis.adaptive import plot_convergence, plot_frontier
from cartlab.analysis.compute import plot_loss_vs_flops, plot_lrt_gap
from cartlab.analysis.decompose import plot_gap_waterfall
from cartlab.analysis.depth import plot_depth_profiles, plot_variable_r_profile
from cartlab.analysis.figures import figure_png
from cartlab.analysis.loops import plot_loop_contraction, plot_loop_profiles, plot_loop_trajectories
from cartlab.analysis.scaling import plot_scaling_fit, plot_scaling_groups
from cartlab.analysis.scaling_study import plot_compute_frontier, plot_iso_loss, plot_law_residuals
from cartlab.analysis.schema import config_label
from cartlab.analysis.screen import plot_r_reversal
from cartlab.analysis.spectral import plot_radius_trajectories
from cartlab.analysis.stats import (
    plot_loss_curves, plot_train_dynamics, plot_train_loss, plot_validation_curves,
)

__all__ = [
    "config_label", "figure_png", "plot_compute_frontier", "plot_convergence", "plot_depth_profiles", "plot_frontier", "plot_gap_waterfall",
    "plot_iso_loss", "plot_law_residuals", "plot_loop_contraction", "plot_loop_profiles", "plot_loop_trajectories",
    "plot_loss_curves", "plot_loss_vs_flops", "plot_lrt_gap", "plot_r_reversal", "plot_radius_trajectories",
    "plot_scaling_fit", "plot_scaling_groups", "plot_train_dynamics", "plot_train_loss", "plot_validation_curves",
    "plot_variable_r_profile",
]
