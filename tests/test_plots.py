"""The accuracy plots' shared style and wording: labels that never collide, titles that say what ran."""

from __future__ import annotations

from capsnet_core.plots import readable_ticks
from services.results.plot_labels import budget_text, curve_label, plot_title


def test_ticks_drop_angles_that_would_collide_but_keep_both_ends() -> None:
    assert readable_ticks([0, 15, 30, 35, 45]) == [0, 15, 30, 35, 45]      # 5° of a 45° range: room
    wide = readable_ticks([0, 15, 30, 35, 45, 60, 90, 180])
    assert wide[0] == 0 and wide[-1] == 180 and not (30 in wide and 35 in wide)
    assert all(b - a >= 180 / 13 for a, b in zip(wide, wide[1:], strict=False))
    assert readable_ticks([35]) == [35] and readable_ticks([]) == []


def test_titles_and_legends_name_the_job_model_config_and_budget() -> None:
    spec = {"kind": "train", "model": "capsnet", "epochs": 2, "train_subset": 4000, "augment": "shift2",
            "model_config": {"routing_iterations": 1}}
    assert budget_text(spec) == "2 epochs × 4,000 images, shift2"
    assert plot_title("demo-capsnet", "train", "capsnet", spec) == (
        "demo-capsnet · train capsnet (routing_iterations=1) · 2 epochs × 4,000 images, shift2")
    assert curve_label("j-1", "eval", "lenet5", {"kind": "eval"}, 0.4531) == "lenet5, eval j-1, AUC 45.3 %"
    full = {"kind": "train", "model": "lenet5", "epochs": 1, "val_split": 5000}
    assert budget_text(full) == "1 epoch × 55,000 images"  # the validation images are not trained on


def test_every_accuracy_figure_spans_0_to_100_with_a_chance_line() -> None:
    import matplotlib.pyplot as plt

    from capsnet_core.plots import CHANCE, _accuracy_axes

    fig, ax = plt.subplots()
    ax.plot([0, 35], [99.0, 84.0])  # a 15-point drop must not fill the frame
    _accuracy_axes(ax, [0, 30, 35], "t")
    assert ax.get_ylim() == (0, 101)
    assert any(list(line.get_ydata()) == [CHANCE, CHANCE] and line.get_linestyle() == "--" for line in ax.get_lines())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0°", "30°", "35°"]
    plt.close(fig)
