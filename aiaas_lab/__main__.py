"""`aiaas-lab` / `python -m aiaas_lab`: `demo` (train and predict locally) and `serve` (the remote backend)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aiaas-lab demo", description="Train the seed MLP on digits and synthetic-mnist, then predict.")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv)

    import aiaas_lab

    for data, epochs in (("digits", max(opts.epochs * 2, 1)), ("synthetic-mnist", opts.epochs)):
        print(f"\n== mlp on {data}: {epochs} epochs ==")
        result = aiaas_lab.train("mlp", data, val=0.2, epochs=epochs, seed=opts.seed,
                                 normalize=True, progress="text")
        print(result)
        from .engine.datasets import load_builtin_dataset

        X, y = load_builtin_dataset(data, opts.seed)
        labels = aiaas_lab.predict(result.model, X[:10], classes=True)
        print(f"predicted {labels.tolist()}\n   actual {y[:10].tolist()}")
        print(f"final val_accuracy on {data}: {result.history[-1]['val_accuracy']:.3f}")
        if result.status != "completed":
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: aiaas-lab {demo,serve} [options]\n\n"
              "  demo   train the seed MLP on digits and synthetic-mnist locally, then predict\n"
              "  serve  run the remote training and inference server (aiaas-lab serve --help)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        return _demo(rest)
    if command == "serve":
        from .server import serve_main

        return serve_main(rest)
    print(f"aiaas-lab: unknown command {command!r}; expected demo or serve", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
