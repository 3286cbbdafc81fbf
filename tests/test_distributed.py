"""The multi-GPU path, run on two CPU processes: `accelerate launch` with gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "two_rank_train.py"


def test_two_ranks_keep_equal_adapters_after_every_step(tmp_path):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "0", str(SCRIPT), str(tmp_path),  # port 0: a free one
    ]
    root = Path(__file__).parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for record in ranks:
        assert [r["step"] for r in record] == [1, 2, 3, 4]
        assert all(r["world"] == 2 for r in record)
        assert all(r["max_difference"] == 0.0 for r in record), record  # equal after every step
        assert record[-1]["moved"] > 1e-3  # and they did train
    # Each rank trained on its own rows (its own loss), so equality comes from averaging the gradients.
    assert any(a["loss"] != b["loss"] for a, b in zip(*ranks, strict=True))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # rank 0 alone writes the log and checkpoints
