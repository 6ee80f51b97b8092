"""Figure readability: tick labels never overlap, annotations adapt to cell size, titles say what is drawn."""

from __future__ import annotations

import itertools

import pytest
from test_report import BERT_TYPES, LLAMA_TYPES, synthetic_plan, synthetic_spectra

from lamda_spectra.report.figures import cumulative_energy_figure, spectra_figure
from lamda_spectra.report.heatmaps import energy_heatmap, rank_map
from lamda_spectra.report.strategies import allocate_strategies, strategies_figure
from lamda_spectra.report.tables import module_grid

TEN_TYPES = {f"block.proj_{index}": (32, 32) for index in range(10)}


def make_grid(layers, types, **kwargs):
    spectra = synthetic_spectra(layers, types, **kwargs)
    return module_grid(synthetic_plan(spectra), spectra)


def visible_labels(labels):
    return [label for label in labels if label.get_visible() and label.get_text()]


def assert_no_overlap(figure, labels):
    renderer = figure.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in visible_labels(labels)]
    for first, second in itertools.combinations(boxes, 2):
        assert not first.overlaps(second), (first, second)


def annotations(figure):
    return [text for ax in figure.axes for text in ax.texts]


@pytest.mark.parametrize("layers", [1, 6, 64, 128])
def test_heatmap_row_labels_do_not_overlap(layers):
    figure = rank_map(make_grid(layers, LLAMA_TYPES), "m", {"strategy": "energy", "budget": "avg:8"}, 0)
    figure.draw_without_rendering()
    ax = figure.axes[0]
    assert_no_overlap(figure, ax.get_yticklabels())
    assert_no_overlap(figure, ax.get_xticklabels())
    assert visible_labels(ax.get_yticklabels())[0].get_text() == "0"


def test_heatmap_ten_long_type_labels_do_not_overlap():
    figure = energy_heatmap(make_grid(4, TEN_TYPES), "m", 8)
    figure.draw_without_rendering()
    labels = figure.axes[0].get_xticklabels()
    assert len(visible_labels(labels)) == 10
    assert_no_overlap(figure, labels)


def test_heatmap_annotates_small_grids():
    figure = energy_heatmap(make_grid(6, BERT_TYPES), "m", 8)
    texts = annotations(figure)
    assert len(texts) == 36
    assert all(5.5 <= text.get_fontsize() <= 8 for text in texts)
    assert "left out" not in figure.get_suptitle()


def test_heatmap_shrinks_annotations_for_80_layers():
    figure = energy_heatmap(make_grid(80, LLAMA_TYPES), "m", 8)
    texts = annotations(figure)
    assert len(texts) == 80 * 7
    assert 5.5 <= texts[0].get_fontsize() < 8


def test_heatmap_skips_annotations_for_128_layers():
    figure = energy_heatmap(make_grid(128, LLAMA_TYPES), "m", 8)
    assert annotations(figure) == []
    assert "values left out because the cells are too small (see modules.csv)" in figure.get_suptitle()


def test_heatmap_other_row_is_labelled():
    grid = make_grid(3, LLAMA_TYPES, others={"lm_head": (64, 64)})
    assert grid.rows == ["0", "1", "2", "other"]
    figure = rank_map(grid, "m", {"strategy": "energy", "budget": "avg:8"}, 0)
    assert [label.get_text() for label in figure.axes[0].get_yticklabels()][-1] == "other"
    assert "grey: no module of this type in the block" in figure.get_suptitle()


def test_spectra_title_says_top_values_only():
    figure = spectra_figure(make_grid(2, BERT_TYPES, top_k=12), "m")
    assert "top 12 singular values only: rerun lamda-plan with --full-spectrum" in figure.get_suptitle()


def test_spectra_title_says_full_spectrum():
    figure = spectra_figure(make_grid(2, BERT_TYPES, top_k=None), "m")
    assert "every singular value (full spectrum)" in figure.get_suptitle()


def test_spectra_one_panel_per_type_and_colour_bar():
    figure = spectra_figure(make_grid(64, LLAMA_TYPES), "m")
    panels = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title().split()[0] for ax in panels] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert panels[0].get_xscale() == "log"
    assert panels[0].get_yscale() == "log"
    colorbar = [ax for ax in figure.axes if ax.get_ylabel() == "layer (block index)"]
    assert len(colorbar) == 1
    figure.draw_without_rendering()
    assert_no_overlap(figure, colorbar[0].get_yticklabels())


def test_cumulative_energy_marks_ranks():
    grid = make_grid(2, BERT_TYPES, top_k=None)
    figure = cumulative_energy_figure(grid, "m", 8)
    first = figure.axes[0]
    offsets = first.collections[-1].get_offsets()
    expected = grid.table[grid.table["label"] == "q"][["rank", "captured_energy"]].to_numpy(dtype=float)
    assert offsets.tolist() == expected.tolist()
    assert figure.legends[0].get_texts()[0].get_text() == "base rank r0 = 8"


def test_strategies_share_budget():
    spectra = synthetic_spectra(3, BERT_TYPES, top_k=None)
    plan = synthetic_plan(spectra)
    allocations = allocate_strategies(plan, spectra)
    assert list(allocations) == ["uniform", "energy", "waterfill"]
    # avg:8 over 18 modules.
    assert [result.totals["rank_sum"] for result in allocations.values()] == [144, 144, 144]
    assert set(allocations["uniform"].ranks.values()) == {8}


def test_strategies_failure_is_noted():
    spectra = synthetic_spectra(3, BERT_TYPES, top_k=None)
    plan = synthetic_plan(spectra)
    grid = module_grid(plan, spectra)
    allocations = allocate_strategies(plan, spectra)
    allocations["waterfill"] = "budget infeasible"
    figure = strategies_figure(grid, allocations, plan.settings, "m")
    assert "waterfill failed: budget infeasible" in figure.get_suptitle()
    assert len(figure.legends[0].get_texts()) == 2
