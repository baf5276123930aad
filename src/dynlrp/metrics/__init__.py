"""Faithfulness metrics: the DynamicLRP paper's section 5 as a module.

Perturbation curves (Most-Relevant-First / Least-Relevant-First occlusion), ABPC,
comprehensiveness and sufficiency (section 5.3, Tables 2 and 3), and the extractive-QA
attribution metrics (section 5.2, Table 1). :func:`evaluate` runs several attribution
methods -- dynlrp presets and the baselines of :mod:`dynlrp.baselines` -- on the same inputs
and returns a report with a Markdown table and MoRF/LeRF plots.

>>> curves = metrics.perturbation_curves(model, images, relevance, features="pixel",
...                                      occlusion=metrics.Blur(51, 20.0), step=1024)
>>> curves.summary()["abpc"]

Only torch is needed; tqdm (progress bars) and matplotlib (plots) are used when installed.
See ``docs/faithfulness.md``.
"""

from __future__ import annotations

from .features import Elements, Features, Patches, Pixels, Tokens, reduce_channels
from .occlusion import Baseline, Blur, Occlusion, TokenReplace, gaussian_blur, gaussian_kernel1d
from .perturbation import (
    SCORES,
    PerturbationCurves,
    abpc,
    area,
    comprehensiveness,
    perturbation_curves,
    sufficiency,
)
from .qa import QAMetrics, predicted_spans, qa_metrics
from .report import (
    Attributions,
    FaithfulnessReport,
    MethodResult,
    attribute_all,
    evaluate,
    merge_reports,
    predict_targets,
    score_attributions,
)

__all__ = [
    "perturbation_curves", "PerturbationCurves", "abpc", "area", "comprehensiveness", "sufficiency", "SCORES",
    "Features", "Pixels", "Patches", "Tokens", "Elements", "reduce_channels",
    "Occlusion", "Blur", "Baseline", "TokenReplace", "gaussian_blur", "gaussian_kernel1d",
    "qa_metrics", "QAMetrics", "predicted_spans",
    "evaluate", "FaithfulnessReport", "MethodResult", "predict_targets", "attribute_all",
    "score_attributions", "Attributions", "merge_reports",
]
