"""docs/usage.md's offline commands (digits, and the plots of their records) run in the order the page shows
them, in a fresh folder: each file a command reads was written by an earlier one. (The README's one offline
command, scripts/quickstart.sh, is run by test_scripts.py.)"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USAGE = ROOT / "docs" / "usage.md"


def shell_commands(path: Path) -> list[str]:
    """The commands of the page's ```shell blocks, in order: continuation lines joined, comments dropped."""
    cmds = []
    for block in re.findall(r"^```shell\n(.*?)^```", path.read_text(), flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(re.sub(r"(^|\s)#.*$", "", line).split())  # as written: bash reads the quotes
            if line:
                cmds.append(line)
    return cmds


def offline(cmd: str) -> bool:
    return re.search(r"\bdigits\b", cmd) is not None or cmd.startswith("python plot_summary.py")


def runnable(cmd: str) -> str:
    """``cmd`` as this checkout runs it: its python, its scripts, one epoch (the files a command writes do not
    depend on how long it trains), and no MongoDB (the record still goes to runs/, which the plots read)."""
    py = shlex.quote(sys.executable)
    cmd = re.sub(r"--epochs \d+", "--epochs 1", cmd)
    cmd = re.sub(r" --mongo-url \S+| --mongo-db \S+", "", cmd)
    cmd = re.sub(r"^torchrun ", f"{py} -m torch.distributed.run ", cmd)
    cmd = re.sub(r"^python (\S+\.py)", lambda m: f"{py} {ROOT / m[1]}", cmd)
    cmd = re.sub(r"(?<= )main\.py ", f"{ROOT / 'main.py'} ", cmd)  # torchrun's script
    return re.sub(r"\bbash scripts/", f"bash {ROOT}/scripts/", cmd)


def test_usage_lists_the_offline_walk_through():
    cmds = [c for c in shell_commands(USAGE) if offline(c)]
    tools = [w for c in cmds for w in c.split() if w.endswith((".py", ".sh"))]
    assert len(cmds) >= 6, cmds  # training, the sweep, the MongoDB example, torchrun and three plots
    assert "main.py" in tools and "plot_summary.py" in tools, tools
    assert not any("--epochs" not in c and c.startswith("torchrun") for c in cmds), "torchrun: 200 epochs"


@pytest.mark.slow
def test_usage_digits_commands_run_in_order(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHON=sys.executable, OMP_NUM_THREADS="1", COLUMNS="200")
    env.pop("SACRED_MONGO_URL", None)
    for cmd in filter(offline, shell_commands(USAGE)):
        p = subprocess.run(["bash", "-c", runnable(cmd)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=900)
        assert p.returncode == 0, f"{cmd}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "checkpoint" / "resnet20" / "digits_ddp" / "ckpt_best.pth").exists()
