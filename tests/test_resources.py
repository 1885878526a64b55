"""The cores a run may use: CPU affinity capped by a cgroup quota, and torch's threads lowered to match."""

import os

import pytest
import torch

from hfcompress import resources


@pytest.mark.parametrize("cpu_max,affinity,expected", [
    ("max 100000\n", {0, 1, 2, 3}, 4),            # no quota: the affinity
    ("150000 100000\n", {0, 1, 2, 3}, 2),         # 1.5 cores of quota: 2 threads
    ("50000 100000\n", {0, 1, 2, 3}, 1),
    ("800000 100000\n", {0, 1}, 2),               # a quota above the affinity: the affinity
    (None, {0, 3}, 2),                            # no cgroup file
])
def test_usable_cpus_follow_affinity_and_cgroup_quota(tmp_path, monkeypatch, cpu_max, affinity, expected):
    if cpu_max is not None:
        (tmp_path / "cpu.max").write_text(cpu_max)
    monkeypatch.setattr(resources, "CGROUP", tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: affinity, raising=False)
    assert resources.usable_cpus() == expected


def test_torch_threads_are_lowered_to_the_usable_cores_unless_the_user_set_them(monkeypatch):
    before = torch.get_num_threads()
    lines = []
    try:
        torch.set_num_threads(4)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(resources, "usable_cpus", lambda: 1)
        assert resources.match_threads(lines.append) == 1 and "torch threads: 1" in lines[0]
        torch.set_num_threads(4)
        monkeypatch.setenv("OMP_NUM_THREADS", "4")
        assert resources.match_threads(lines.append) == 4 and len(lines) == 1
    finally:
        torch.set_num_threads(before)
