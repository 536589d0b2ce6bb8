"""A capacity group is labelled by the shape its cells actually have, not by the model config's name:
a grid that overrides a named model's layers or width (`model=l1_d16 model.n_layer=1,2`) gives two
groups, `l1_d16` and `l2_d16`, not two groups both called `l1_d16`."""

import numpy as np

from measure.sweep import capacity_groups

KEYS = ("model.name", "model.n_layer", "model.n_embd", "precision.name", "data.vocab_size")


def columns(n_layers, n_embd, name="l1_d16") -> dict:
    n = len(n_layers)
    return {"cell_id": np.array([f"c{i}" for i in range(n)], dtype=object),
            "model.name": np.array([name] * n, dtype=object),
            "model.n_layer": np.array(n_layers, dtype=np.float64),  # int columns read back as floats
            "model.n_embd": np.array(n_embd, dtype=np.float64),
            "precision.name": np.array(["fp32"] * n, dtype=object),
            "data.vocab_size": np.array([64.0] * n)}


def test_groups_are_labelled_by_the_actual_shape():
    groups = capacity_groups(columns([1, 1, 2, 2], [16, 16, 16, 16]), KEYS)
    assert [g.label for g in groups] == ["l1_d16 fp32", "l2_d16 fp32"]
    assert [int(g.rows.sum()) for g in groups] == [2, 2]


def test_a_model_named_after_its_shape_keeps_its_label():
    groups = capacity_groups(columns([8], [128], name="l8_d128"), KEYS)
    assert [g.label for g in groups] == ["l8_d128 fp32"]


def test_a_table_without_the_shape_columns_falls_back_to_the_name():
    cols = columns([1], [16], name="custom")
    del cols["model.n_layer"], cols["model.n_embd"]
    assert [g.label for g in capacity_groups(cols, KEYS)] == ["custom fp32"]
