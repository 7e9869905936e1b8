"""`%aiaas predict --classes` in a real kernel returns (and shows) the training's own labels,
for a DataFrame with text columns and text labels, on any rows."""

from __future__ import annotations

SETUP = """
import numpy as np, pandas as pd
rng = np.random.default_rng(0)
city = rng.choice(["paris", "rome", "oslo"], 240)
income = rng.normal(50, 15, 240)
df = pd.DataFrame({"city": city, "income": income, "label": np.where(income > 50, "rich", "poor")})
features = df.drop(columns=["label"])
"""


def test_predict_classes_gives_original_labels_on_any_rows(kernel):
    kernel.check(SETUP)
    kernel.check("r = %aiaas train mlp --data df --target label --normalize --epochs 15 --lr 0.01 --seed 0 --no-widget")
    out = kernel.check(
        "one = %aiaas predict r --data features.iloc[[0]] --classes\n"
        "some = %aiaas predict r --data features.head(3) --classes\n"
        "every = %aiaas predict r --data features --classes --no-widget\n"
        "print(type(one).__name__, one.tolist() == every[:1].tolist(), some.tolist() == every[:3].tolist(),"
        " sorted(set(every.tolist())), float((every == df['label'].to_numpy()).mean()) > 0.85)")
    assert out.stdout.split("\n")[-2] == "ndarray True True ['poor', 'rich'] True", out.stdout
    # The view of the predictions (displayed for the first two) names the labels themselves.
    views = [d.get("text/plain", "") for d in out.displays]
    assert len(views) == 2 and all(v.startswith("predictions:") for v in views), views
    assert views[0].split()[-1] == out.stdout.split()[0] or views[0].split()[-1] in ("poor", "rich"), views


def test_classes_on_a_regression_model_is_a_usage_error(kernel):
    kernel.check("import torch\nreg = %aiaas train mlp --data (torch.randn(64, 3), torch.randn(64)) --epochs 1 --no-widget")
    out = kernel.run("%aiaas predict reg --data torch.randn(2, 3) --classes")
    assert out.stderr.startswith("UsageError: --classes:") and "regression" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
