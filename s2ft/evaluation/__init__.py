"""Evaluation: generation or option log-likelihood accuracy on the benchmark tasks, and the held-out loss."""

from s2ft.evaluation.evaluate import MODES, evaluate, prepare_tasks, summarize, write_predictions
from s2ft.evaluation.extract import extract, extract_label, extract_letter, extract_number, is_correct, parse_gold
from s2ft.evaluation.generate import Generation, generate
from s2ft.evaluation.heldout import heldout_item_losses, heldout_loss, mean_token_loss
from s2ft.evaluation.loglik import Score, encode_pairs, score_pairs
from s2ft.evaluation.options import OptionParseError, parse_options

__all__ = [
    "MODES",
    "Generation",
    "OptionParseError",
    "Score",
    "encode_pairs",
    "evaluate",
    "extract",
    "extract_label",
    "extract_letter",
    "extract_number",
    "generate",
    "heldout_item_losses",
    "heldout_loss",
    "is_correct",
    "mean_token_loss",
    "parse_gold",
    "parse_options",
    "prepare_tasks",
    "score_pairs",
    "summarize",
    "write_predictions",
]
