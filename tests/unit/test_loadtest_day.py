"""extproc loadtest --day: the workload's whole diurnal day compressed into a short run."""

from __future__ import annotations

import argparse

import pytest

from extproc.commands import loadtest
from extproc.lab.workload import example, generate


def test_day_compresses_the_whole_curve_into_the_run():
    clinical = example("clinical")
    day = clinical.duration_s
    short = loadtest.with_day(clinical, day / 4)
    assert short.duration_s == day / 4 and clinical.duration_s == day  # the shipped example is untouched
    plan = generate(short, 20.0, seed=1)
    full = generate(clinical, 20.0, seed=1)
    assert plan and all(p.at < day / 4 for p in plan)
    # the same curve, four times faster: about a quarter of the day's requests (think times between
    # a session's turns are not compressed, so its follow-ups spread a little later)
    assert 0.15 < len(plan) / len(full) < 0.35
    busy_half = sum(1 for p in plan if day / 4 * 0.15 <= p.at < day / 4 * 0.65)
    assert busy_half > len(plan) / 2  # the peak (at 0.4 of the day) is still in the run
    assert loadtest.with_day(clinical, None) is clinical
    with pytest.raises(loadtest.LoadtestError, match="--day"):
        loadtest.with_day(clinical, 0)


def test_duration_defaults_to_the_day():
    parser = argparse.ArgumentParser()
    loadtest.add_arguments(parser)
    args = parser.parse_args(["--workload", "clinical", "--out", "x", "--day", "90"])
    assert args.duration is None and args.day == 90
