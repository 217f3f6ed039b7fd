"""The table of a run's networks (pipeline.run.networks), the run layout and the sparse run files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from conceptclef.category_models import ConceptModel
from conceptclef.core.config import Config, ExtraGlobalModel, TrainingConfig
from conceptclef.core.runfiles import atomic_save_sparse, load_arrays, load_sparse
from conceptclef.pipeline.run.layout import RunLayout
from conceptclef.pipeline.run.networks import Role, every_kind_settings, run_networks
from conceptclef.router import ModalityRouter, SingleCategoryRouter


class _AlwaysTrained:
    """A model class whose work folder always holds a trained model (no checkpoint needed)."""

    @staticmethod
    def is_trained(work_dir: Path) -> bool:
        return True

    @classmethod
    def load(cls, work_dir: Path, device: str = "auto", feature_store: object = None) -> "_AlwaysTrained":
        return cls()


def _config(init_from: str = "weights") -> Config:
    return Config(
        extra_global_models=(ExtraGlobalModel(name="big", image_size=48, backbone="test_resnet"),),
        category_model=TrainingConfig(init_from=init_from),  # type: ignore[arg-type]
    )


def test_one_entry_per_network_in_training_order(tmp_path):
    layout = RunLayout(tmp_path)
    networks = run_networks(layout, _config(), ["DRCT", "DRXR", "DRUS"], without_model=["DRUS"])
    assert [(n.name, n.role) for n in networks] == [
        ("router", Role.ROUTER), ("global", Role.GLOBAL), ("global-big", Role.EXTRA_GLOBAL), ("DRCT", Role.CATEGORY), ("DRXR", Role.CATEGORY),
    ]
    assert [n.work_dir.name for n in networks] == ["router", "global", "global-big", "category-DRCT", "category-DRXR"]
    assert networks[0].model_class is ModalityRouter and all(n.model_class is ConceptModel for n in networks[1:])
    assert [n.image_size for n in networks] == [224, 224, 48, 224, 224]
    assert [n.category for n in networks] == [None, None, None, "DRCT", "DRXR"]
    assert [n.settings_key for n in networks] == ["router", "global_model", "extra_global_models.big", "category_model", "category_model"]
    assert networks[2].settings.backbone == "test_resnet" and networks[3].settings == Config().category_model
    assert all(n.depends_on == () for n in networks)
    # One category: the router has nothing to learn.
    assert run_networks(layout, Config(), ["ONLY"])[0].model_class is SingleCategoryRouter


def test_every_kind_of_network_is_checked_before_a_new_run():
    keys = [key for key, _ in every_kind_settings(_config())]
    assert keys == ["router", "global_model", "extra_global_models.big", "category_model"]


def test_a_specialist_is_stale_while_the_global_model_it_started_from_is_retrained_or_changed(tmp_path):
    layout = RunLayout(tmp_path)
    networks = {n.name: n for n in run_networks(layout, _config("global"), ["DRCT"])}
    specialist = dataclasses.replace(networks["DRCT"], model_class=_AlwaysTrained)
    assert specialist.depends_on == ("global",)
    assert specialist.stale_reason(layout) == "not trained"  # no validation predictions yet
    specialist.files.validation_predictions.parent.mkdir(parents=True)
    specialist.files.validation_predictions.write_bytes(b"")
    assert specialist.is_finished()
    assert specialist.stale_reason(layout, retraining={"global"}) == "global is retrained"
    # No global checkpoint (nor init.json) to have started from: out of date.
    assert specialist.stale_reason(layout) == "started from an older global model"
    independent = dataclasses.replace(run_networks(layout, _config(), ["DRCT"])[-1], model_class=_AlwaysTrained)
    assert independent.stale_reason(layout, retraining={"global"}) is None


def test_the_global_model_is_finished_only_with_its_training_embeddings(tmp_path):
    layout = RunLayout(tmp_path)
    global_model = dataclasses.replace(run_networks(layout, Config(), ["A", "B"])[1], model_class=_AlwaysTrained)
    layout.global_dir.mkdir()
    global_model.files.validation_predictions.write_bytes(b"")
    assert not global_model.is_finished()
    global_model.files.train_embeddings.write_bytes(b"")
    assert global_model.is_finished()


def test_layout_keeps_the_file_names_runs_have_on_disk(tmp_path):
    layout = RunLayout(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in (
        layout.lock_path, layout.fingerprint_path, layout.category_record_path, layout.extra_global_dir("b"),
        layout.fallback_path("DRCO"), layout.knn_index_path, layout.out_of_fold_path, layout.validation_truth_path,
        layout.concept_statistics_path, layout.ensemble_record_path, layout.files(layout.global_dir).train_embeddings,
        layout.files(layout.router_dir).validation_predictions, layout.files(layout.category_dir("DRCT")).init_record,
    )] == [
        ".lock", "data.json", "categories.json", "global-b", "category-DRCO/fallback.json", "ensemble/knn_index.npz",
        "ensemble/oof_predictions.npz", "ensemble/valid_truth.npz", "ensemble/concept_statistics.npz", "ensemble/ensemble.json",
        "global/train_embeddings.npz", "router/valid_predictions.npz", "category-DRCT/init.json",
    ]


def test_sparse_run_files_round_trip_with_the_saved_keys(tmp_path):
    matrix = sp.csr_matrix(np.array([[0.0, 0.25, 0.0], [0.5, 0.0, 0.75]], dtype=np.float32))
    atomic_save_sparse(tmp_path / "probs.npz", matrix, image_ids=np.array(["a", "b"]))
    loaded, others = load_sparse(tmp_path / "probs.npz")
    assert (loaded != matrix).nnz == 0 and loaded.dtype == np.float32 and list(others["image_ids"]) == ["a", "b"]
    assert set(load_arrays(tmp_path / "probs.npz")) == {"data", "indices", "indptr", "shape", "image_ids"}
    # Binary matrices (truth, kNN labels) keep no data array: ones come back.
    atomic_save_sparse(tmp_path / "truth.npz", matrix, binary=True)
    assert "data" not in load_arrays(tmp_path / "truth.npz")
    truth, _ = load_sparse(tmp_path / "truth.npz")
    assert truth.shape == (2, 3) and truth.dtype == np.float32 and truth.toarray().tolist() == [[0, 1, 0], [1, 0, 1]]


def test_cross_fitted_runs_hold_the_table_once_per_fold_in_fold_folders(tmp_path):
    from conceptclef.core.config import DevelopmentConfig
    from conceptclef.pipeline.run.networks import development_networks

    layout = RunLayout(tmp_path)
    config = dataclasses.replace(_config(init_from="global"), development=DevelopmentConfig(scheme="cross_fit", folds=3))
    networks = development_networks(layout, config, ["DRCT", "DRXR"])
    assert len(networks) == 3 * 5
    assert [n.fold for n in networks] == [0] * 5 + [1] * 5 + [2] * 5
    assert networks[6].work_dir == tmp_path / "folds" / "fold-1" / "global"
    assert networks[8].job_name == "DRCT@fold-1" and networks[8].dependency_jobs == ("global@fold-1",)
    assert networks[8].description == "the DRCT model of fold 1"
    assert len({n.job_name for n in networks}) == len(networks)
    # The split scheme keeps the one table in the run folder.
    assert [n.work_dir.parent for n in development_networks(layout, _config(), ["DRCT"])] == [tmp_path] * 4


def test_fold_jobs_wait_only_for_their_own_folds_global_model(tmp_path):
    from conceptclef.core.config import DevelopmentConfig
    from conceptclef.pipeline.run.networks import development_networks
    from conceptclef.pipeline.stages.train_all import ModelJob, dependency_waves

    config = dataclasses.replace(_config(init_from="global"), extra_global_models=(), development=DevelopmentConfig(scheme="cross_fit", folds=2))
    jobs = [ModelJob(network, None, 10) for network in development_networks(RunLayout(tmp_path), config, ["DRCT"])]
    waves = [[job.name for job in wave] for wave in dependency_waves(jobs)]
    assert waves == [["router@fold-0", "global@fold-0", "router@fold-1", "global@fold-1"], ["DRCT@fold-0", "DRCT@fold-1"]]


def test_a_network_records_the_settings_it_trained_with_and_sees_them_change(tmp_path):
    import json

    from conceptclef.core.runfiles import atomic_write_json

    layout = RunLayout(tmp_path)
    network = dataclasses.replace(run_networks(layout, Config(), ["DRCT"])[1], model_class=_AlwaysTrained)
    assert not network.settings_changed()  # trained before the record existed: unchanged
    atomic_write_json(network.files.settings_record, network.settings_record)
    assert not network.settings_changed()
    edited = dataclasses.replace(network, settings=dataclasses.replace(network.settings, learning_rate=0.5))
    assert edited.settings_changed()
    assert json.loads(network.files.settings_record.read_text())["training"]["learning_rate"] == network.settings.learning_rate
    reseeded = dataclasses.replace(network, run_seed=network.run_seed + 1)
    assert reseeded.settings_changed()


def test_final_fit_networks_follow_the_table_in_their_own_folders(tmp_path):
    from conceptclef.core.config import DevelopmentConfig
    from conceptclef.pipeline.run.networks import development_networks

    layout = RunLayout(tmp_path)
    config = dataclasses.replace(_config("global"), development=DevelopmentConfig(scheme="final_fit"))
    networks = development_networks(layout, config, ["DRCT", "DRXR"])
    split, final = networks[: len(networks) // 2], networks[len(networks) // 2 :]
    assert [n.name for n in final] == [n.name for n in split] and not any(n.final_fit for n in split)
    assert [n.job_name for n in final] == ["router@final-fit", "global@final-fit", "global-big@final-fit", "DRCT@final-fit", "DRXR@final-fit"]
    assert [n.work_dir.relative_to(tmp_path / "final-fit") for n in final] == [n.work_dir.relative_to(tmp_path) for n in split]
    # each waits for its split network (the budget) and, a specialist, for the final-fit global model
    assert final[0].dependency_jobs == ("router",)
    assert final[3].dependency_jobs == ("DRCT", "global@final-fit")
    assert final[3].split_network(layout) == split[3]
    assert final[1].outputs == ("knn_index",) and final[0].outputs == () and split[1].outputs == ("validation_predictions", "train_embeddings")
    assert final[3].description == "the DRCT model (final fit)"
    # the final fit's layout reads the run's record of where the categories came from
    assert layout.final_fit.category_record_path == layout.category_record_path == layout.fold(1).category_record_path
