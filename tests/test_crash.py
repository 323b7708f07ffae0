"""SIGKILL a writer at random moments: the catalog must hold exactly the committed batches, and finishing
the job must give the same catalog as an uninterrupted run."""
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from shards import Catalog
from tests.crash_writer import BATCH, batch

BATCHES = 30
HELPER = Path(__file__).with_name("crash_writer.py")


def snapshot(path) -> dict:
    with Catalog.open(path) as catalog:
        return {item.id: (item.code.tobytes(), item.features.tobytes(), item.meta["batch"]) for item in catalog}


def run_writer(path, first, last, env):
    return subprocess.Popen([sys.executable, str(HELPER), str(path), str(first), str(last)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_while_adding_loses_only_the_batch_in_flight(tmp_path, cli_env):
    reference = tmp_path / "reference"
    assert run_writer(reference, 0, BATCHES, cli_env).wait() == 0
    expected = snapshot(reference)
    assert len(expected) == BATCHES * BATCH
    rng = random.Random(1234)
    killed_mid_run = 0
    for trial in range(6):
        path = tmp_path / f"trial{trial}"
        process = run_writer(path, 0, BATCHES, cli_env)
        target = rng.randrange(-1, BATCHES - 4)  # kill after this batch is reported (-1: before any is)
        printed = []
        while target >= 0 and len(printed) <= target:
            line = process.stdout.readline()
            if not line:
                break
            printed.append(int(line))
        time.sleep(rng.uniform(0, 0.05))  # land anywhere in the next batch's add
        process.send_signal(signal.SIGKILL)
        out, _ = process.communicate()
        printed += [int(line) for line in out.split()]
        if not (path / "manifest.json").exists():
            continue  # killed before the catalog existed
        state = snapshot(path)
        batches = sorted({b for _, _, b in state.values()})
        committed = len(batches)
        killed_mid_run += 0 < committed < BATCHES
        # Whole batches only, in order; every printed batch is there (at most one more committed unprinted).
        assert batches == list(range(committed))
        assert len(state) == committed * BATCH
        assert len(printed) <= committed <= len(printed) + 1
        assert all(state[k] == expected[k] for k in state)
        assert run_writer(path, committed, BATCHES, cli_env).wait() == 0
        assert snapshot(path) == expected
        with Catalog.open(path) as catalog:  # and it searches like the reference
            queries = batch(3)[1][:5]
            with Catalog.open(reference) as ref:
                for a, b in zip(catalog.coarse(queries, m=50), ref.coarse(queries, m=50)):
                    assert np.array_equal(a.ids, b.ids)
    assert killed_mid_run >= 2, "too few kills landed while adding: the test would prove nothing"
