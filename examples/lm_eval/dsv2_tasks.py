"""Datasets of the example tasks, read from the JSON files beside this one (no hub download): what the task
YAMLs' `custom_dataset: !function dsv2_tasks.load_...` call."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).parent


def _load(name: str) -> datasets.DatasetDict:
    rows = json.loads((HERE / name).read_text())
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_mc(**kwargs) -> datasets.DatasetDict:
    return _load("dsv2_mc.json")


def load_gen(**kwargs) -> datasets.DatasetDict:
    return _load("dsv2_gen.json")
