"""DAFM score fusion (Dynamic Adaptive Fusion, arXiv 2511.05020) of K >= 2 frozen CIR models, on 2 CPU cores.

The paper fuses pre-computed similarity matrices (~10 GB of fp16 for CIRR) with a small convolutional network. Here
no Q x N matrix is ever held: every base model's query and gallery *embeddings* are computed once, and the
similarity vectors are recomputed on the fly, a tile of queries at a time, so memory is O(tile x N x K) plus the
embeddings.

Pipeline for one tile of B queries against the N gallery images::

    raw[b, k, n]   = base_k.similarity(query_k[b], gallery_k[n])               # each model's own score
    z[b, k, n]     = (raw - mean_bk) / std_bk                                   # per query and model, over the gallery
    stats[b, k, :] = (top-1 z, top-1 - top-2, top-1 - mean of top-k,           # the shape of model k's score
                      entropy of softmax(beta * top-k z), log std_bk)           # distribution for query b
    w[b, :]        = softmax(MLP(stats[b]))                                     # query-aware model weights, sum to 1
    x              = w[b, k] * z[b, k, n]                                       # K channels per candidate
    x              = x + W2 relu(W1 x + b1)        (x blocks)                   # residual refinement, 1x1 convolutions
    fused[b, n]    = w_out . x + b_out                                          # 1x1 convolution to one score

The package, bottom to top (each module imports only those above it in this list):

- :mod:`~cirfusion.fusion.kernels`: raw scores (float32, float16 and int8 paths), the exact order-free normalisation
  and statistics, fingerprints, block sizing; plain float64 references the tests compare the fast paths with;
- :mod:`~cirfusion.fusion.network`: :class:`FusionNet`, the ~1-2 k-parameter network;
- :mod:`~cirfusion.fusion.tables`: :class:`SplitTable`, a split's embeddings encoded once, and the metrics of a base
  or fused model read from them;
- :mod:`~cirfusion.fusion.fit`: :class:`FusionConfig` (the one source of fitting defaults), the losses, the
  shortlists, the fit loop with the dynamic temperature, :func:`fuse`;
- :mod:`~cirfusion.fusion.experiments`: explanations (per-query gate weights, exact Shapley contributions from
  :mod:`~cirfusion.fusion.shapley`) and the incremental analysis;
- :mod:`~cirfusion.fusion.compat`: which checkpoints can be fused;
- :mod:`~cirfusion.fusion.orchestrate`: :func:`fuse_checkpoints`, used by ``cirfusion fuse`` and the quickstart.

The fused model itself, :class:`cirfusion.methods.dafm.DAFM`, is a method like any other: it imports the kernels and
the network, and no module here imports it (fitting builds it through the method registry), so there is no cycle.
"""

from .compat import check_compatible, dataset_family, pick_base, read_bases
from .experiments import (
    addition_orders,
    contribution_summary,
    explain,
    explain_all,
    explanation_summary,
    fusion_diagnostics,
    incremental_analysis,
    incremental_orders,
    metric_from_per_query,
    oracle_choice,
    oracle_predictability,
    order_of_addition,
    pick_per_query,
    plot_incremental,
    query_scores,
    score_statistics,
    shapley_contributions,
    simplex_grid,
    spread,
    weighted_per_query,
)
from .fit import (
    POSITIVE_LOSSES,
    FitResult,
    FusionConfig,
    Shortlists,
    baseline_model,
    fit,
    full_loss,
    fuse,
    fused_model,
    multi_positive_nce,
    next_tau,
    prepare_shortlists,
    shortlist_loss,
)
from .kernels import (
    BLOCK_ELEMS,
    NUM_STATS,
    SCORE_DTYPES,
    SINGLE_THREAD_ELEMS,
    STAT_NAMES,
    FusionError,
    Normalised,
    base_scores,
    block_rows,
    dot_or_maxsim,
    fixed_point,
    image_fingerprint,
    int8_copy,
    integer_sum,
    normalise_scores,
    observe_score_blocks,
    reference_dot_or_maxsim,
    reference_normalise,
    score_stats,
    single_thread_if_small,
    standardise,
    storage_dtype,
    uses_default_similarity,
)
from .network import FusionNet, count_parameters
from .orchestrate import FuseSplits, FusionRun, fuse_checkpoints
from .tables import SplitTable, evaluate_base, evaluate_fused, per_query_base, per_query_fused

__all__ = [
    "BLOCK_ELEMS",
    "NUM_STATS",
    "POSITIVE_LOSSES",
    "SCORE_DTYPES",
    "SINGLE_THREAD_ELEMS",
    "STAT_NAMES",
    "FitResult",
    "FuseSplits",
    "FusionConfig",
    "FusionError",
    "FusionNet",
    "FusionRun",
    "Normalised",
    "Shortlists",
    "SplitTable",
    "addition_orders",
    "base_scores",
    "baseline_model",
    "block_rows",
    "check_compatible",
    "contribution_summary",
    "count_parameters",
    "dataset_family",
    "dot_or_maxsim",
    "evaluate_base",
    "evaluate_fused",
    "explain",
    "explain_all",
    "explanation_summary",
    "fit",
    "fixed_point",
    "full_loss",
    "fuse",
    "fuse_checkpoints",
    "fused_model",
    "fusion_diagnostics",
    "image_fingerprint",
    "incremental_analysis",
    "incremental_orders",
    "int8_copy",
    "integer_sum",
    "metric_from_per_query",
    "multi_positive_nce",
    "next_tau",
    "normalise_scores",
    "observe_score_blocks",
    "oracle_choice",
    "oracle_predictability",
    "order_of_addition",
    "per_query_base",
    "per_query_fused",
    "pick_base",
    "pick_per_query",
    "plot_incremental",
    "prepare_shortlists",
    "query_scores",
    "read_bases",
    "reference_dot_or_maxsim",
    "reference_normalise",
    "score_statistics",
    "score_stats",
    "shapley_contributions",
    "shortlist_loss",
    "simplex_grid",
    "single_thread_if_small",
    "spread",
    "standardise",
    "storage_dtype",
    "uses_default_similarity",
    "weighted_per_query",
]
