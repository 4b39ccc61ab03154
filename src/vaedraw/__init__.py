"""vaedraw: teach a variational autoencoder to draw handwritten digits, then draw new ones.

The Python API mirrors the command line:

    from vaedraw import build_config, train, load_run
    cfg = build_config("default", overrides={"train.steps": 2000})
    run_dir = train(cfg, "runs/mnist")
    run = load_run(run_dir)
    x = run.sample(64)                 # [64, 1, 28, 28] pixel means in [0, 1]
"""

__version__ = "0.1.0"

from .config import RunConfig, build_config, preset  # noqa: E402
from .run import Run, load_run  # noqa: E402


def train(*args, **kwargs):
    """See vaedraw.train.train (imported lazily: it pulls in the data and plotting modules)."""
    from .train import train as _train

    return _train(*args, **kwargs)


__all__ = ["RunConfig", "Run", "build_config", "load_run", "preset", "train", "__version__"]
