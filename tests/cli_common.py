"""What the main-job tests share (test_cli.py, test_distributed.py): a tiny demo data set and a random3d run."""
from auvcore.app.cli import main
from auvcore.data.demo import build_demo


def tiny_demo(tmp_path_factory, n_cases: int):
    """A small demo data set (120×120×72 mm cases, 30 % corrupted, seed 1) in a fresh temporary folder."""
    return build_demo(tmp_path_factory.mktemp("demo") / "data", n_cases=n_cases, corrupt_fraction=0.3, seed=1,
                      size_mm=(120.0, 120.0, 72.0))


def score_random3d(data, out, *extra) -> int:
    """`auvcore score DATA --encoder random3d --out OUT --no-progress [extra]`; its exit code."""
    return main(["score", str(data), "--encoder", "random3d", "--out", str(out), "--no-progress", *extra])
