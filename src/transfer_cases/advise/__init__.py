"""Which case for my data: score every stage of the body without training, then decide.

`logme` / `h_score` and `linear_probe_accuracy` score feature matrices; `score_stages` scores the
pooled features of every stage (pretrained and a random control whose BatchNorm statistics
`estimate_batchnorm_statistics` fits to the user's images); `decide` turns the scores and the
samples per class into an `Advice`; `write_advice` / `print_advice` show it.
"""

from transfer_cases.advise.advisor import Advisor, advise_from_config
from transfer_cases.advise.auto import resolve_auto_case
from transfer_cases.advise.control import estimate_batchnorm_statistics
from transfer_cases.advise.decide import Advice, decide
from transfer_cases.advise.logme import h_score, logme, logme_details
from transfer_cases.advise.probe import ProbeResult, linear_probe_accuracy
from transfer_cases.advise.report import print_advice, read_advice, train_command, write_advice
from transfer_cases.advise.scores import StageScores, score_stages

__all__ = [
    "Advice",
    "Advisor",
    "ProbeResult",
    "StageScores",
    "advise_from_config",
    "decide",
    "estimate_batchnorm_statistics",
    "h_score",
    "linear_probe_accuracy",
    "logme",
    "logme_details",
    "print_advice",
    "read_advice",
    "resolve_auto_case",
    "score_stages",
    "train_command",
    "write_advice",
]
