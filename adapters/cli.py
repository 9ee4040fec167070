"""Subcommands of ``l2grader`` that make and judge adapters (registered by :mod:`serve.cli`)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the adapter subcommands (train, evaluate, synth-data) to the ``l2grader`` parser."""
