"""Training-curve and overlay figures for the docs, from a run's TensorBoard logs and the bundle's own masks.

python -m tools.plots curve --log_dir output --output_png docs/training_curve.png
python -m tools.plots overlay --image IMG --label LABEL --mask MASK --output_png overlay.png
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def _scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    multiplexer = EventMultiplexer().AddRunsFromDirectory(log_dir)
    multiplexer.Reload()
    scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for run, tags in multiplexer.Runs().items():
        for tag in tags.get("scalars", []):
            scalars[tag] += [(event.step, event.value) for event in multiplexer.Scalars(run, tag)]
    return {tag: sorted(values) for tag, values in scalars.items()}


def curve(log_dir: str, output_png: str, iterations_per_epoch: int | None = None, title: str = "") -> str:
    """Training loss (mean per epoch) and validation Dice per epoch from TensorBoard logs in `log_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = _scalars(log_dir)
    loss = scalars["train_loss"]
    val_epochs = [step for step, _ in scalars["val_mean_dice"]]
    per_epoch = iterations_per_epoch or loss[-1][0] // max(val_epochs[-1], 1)
    losses: dict[int, list[float]] = defaultdict(list)
    for step, value in loss:
        losses[(step - 1) // per_epoch + 1].append(value)
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(sorted(losses), [np.mean(losses[e]) for e in sorted(losses)])
    ax_loss.set(xlabel="epoch", ylabel="training loss (mean per epoch)", yscale="log")
    for tag, label in [
        ("val_dice_anterior", "anterior"),
        ("val_dice_posterior", "posterior"),
        ("val_mean_dice", "mean (key metric)"),
    ]:
        if tag in scalars:
            ax_dice.plot(*zip(*scalars[tag]), label=label)
    ax_dice.set(xlabel="epoch", ylabel="validation Dice (original grid)", ylim=(0.5, 1.0))
    ax_dice.legend(loc="lower right")
    ax_dice.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output_png, dpi=110)
    return output_png


def overlay(image: str, label: str, mask: str, output_png: str, axis: int = 2) -> str:
    """One slice (the one with most labelled voxels) of `image` with the label's and the mask's outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    volumes = [np.asarray(nib.load(path).dataobj) for path in (image, label, mask)]
    index = int(np.argmax((volumes[1] > 0).sum(axis=tuple(a for a in range(3) if a != axis))))
    img, lab, pred = (np.take(v, index, axis=axis).T for v in volumes)
    fig, axes = plt.subplots(1, 2, figsize=(7, 4))
    for ax, seg, name in zip(axes, (lab, pred), ("label", "prediction")):
        ax.imshow(img, cmap="gray", origin="lower")
        for value, color in ((1, "tab:orange"), (2, "tab:cyan")):
            ax.contour(seg == value, levels=[0.5], colors=color, linewidths=1.2)
        ax.set_title(f"{name} (orange anterior, cyan posterior)", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(output_png, dpi=110)
    return output_png


if __name__ == "__main__":
    import fire

    fire.Fire({"curve": curve, "overlay": overlay})
