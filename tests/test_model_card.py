"""The model card lists the training data as readable lines (no raw manifest JSON)."""

from workflows.train.export import data_line, model_card


def _info(datasets):
    return {"base_model": "all-minilm-l6-v2", "run_name": "r", "num_workers": 2, "steps": 6, "checkpoint": "/c",
            "export": "best", "datasets": datasets, "dev_metrics": {"dev_spearman": 0.8}, "config": {"x": 1}}


def test_training_data_lines_name_rows_objective_and_source():
    named = {"label": "en-sts", "rows": 600, "objective": {"kind": "cosent"}, "weight": 1.0,
             "manifest": {"source": {"source": "stsb", "split": "train", "lang": None, "limit": 600}}}
    committed = {"label": "de-sts", "rows": 212, "objective": {"kind": "cosent"}, "weight": 0.5,
                 "manifest": {"uri": "s3://b/runs/q/synthesize/abc", "output": "data", "kind": "scored_pairs",
                              "manifest": {"kind": "synthesize", "config_hash": "f00d", "shards": ["s"] * 50,
                                           "counts": {"de": {"kept": 212}}}}}
    assert data_line(named) == ("- **en-sts**: 600 rows, objective `cosent`, weight 1.0, from `stsb` "
                                "(split train, limit 600)")
    assert data_line(committed) == ("- **de-sts**: 212 rows, objective `cosent`, weight 0.5, from "
                                    "`s3://b/runs/q/synthesize/abc` (output `data`, kind scored_pairs, a synthesize "
                                    "output, config hash f00d)")
    card = model_card(_info([named, committed]))
    section = card.split("## Training data")[1].split("## Dev metrics")[0]
    assert "{" not in section and "shards" not in section and "embedforge_training.json" in section
