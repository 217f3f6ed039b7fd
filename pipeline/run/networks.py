"""The table of a run's networks: one entry per network, walked by every command.

Each network of a run is one `Network`: its name (for `--only`, logs and errors), its work
folder in the run directory, its model class, its role (router, global, extra global, category),
the training images it learns from, the networks it depends on (a specialist started from the
global model) and, through its role's `NetworkKind`, the files that mark it finished and the
config table that holds its settings. `train-all` (what to train, in which order, what is out of
date), `predict` (what to load), the stacker's inputs (whose validation predictions to read), the
preflight checks (whose weights and device) and the ablation (through the stacker's inputs and
`predict`) all walk `run_networks`, so a new kind of network is one `NetworkKind` entry and one
branch of `run_networks`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Protocol, Sequence

from conceptclef.category_models import ConceptModel
from conceptclef.core.config import Config, ExtraGlobalModel, TrainingConfig
from conceptclef.core.runfiles import read_json
from conceptclef.pipeline.run.layout import NetworkFiles, RunLayout
from conceptclef.pipeline.run.specialist_init import started_from_current_global, starts_from_global
from conceptclef.router import router_class_for
from conceptclef.training.checkpoints import RunFiles
from conceptclef.training.estimator import fingerprinted_settings

__all__ = [
    "EXTRA_GLOBAL_PREFIX",
    "NETWORK_KINDS",
    "Network",
    "NetworkKind",
    "Role",
    "TrainedNetwork",
    "development_networks",
    "every_kind_settings",
    "extra_global_name",
    "extra_global_training",
    "run_networks",
    "split_run_identity",
]


class TrainedNetwork(Protocol):
    """What the pipeline asks of a model class: whether its work folder holds a trained model, and loading it."""

    @staticmethod
    def is_trained(work_dir: Path) -> bool: ...

    @classmethod
    def load(cls, work_dir: Path, device: str = ..., feature_store: Any = ...) -> Any: ...


class Role(enum.Enum):
    ROUTER = "router"  # softmax modality classifier: which category model an image goes to
    GLOBAL = "global"  # concept model over every training image; its embeddings are the kNN index
    EXTRA_GLOBAL = "extra global"  # another backbone or image size over every image ([[extra_global_models]])
    CATEGORY = "category"  # concept model of one category's images (a specialist)


@dataclass(frozen=True)
class NetworkKind:
    """What every network of one role shares."""

    role: Role
    config_section: str  # the config table with its settings ([[extra_global_models]] entries add to [global_model])
    outputs: tuple[str, ...]  # `NetworkFiles` fields that must exist once it has finished
    trains_on: str  # its training images, for readers and logs


NETWORK_KINDS: dict[Role, NetworkKind] = {
    kind.role: kind
    for kind in (
        NetworkKind(Role.ROUTER, "router", ("validation_predictions",), "every training image with a category"),
        NetworkKind(Role.GLOBAL, "global_model", ("validation_predictions", "train_embeddings"), "every training image"),
        NetworkKind(Role.EXTRA_GLOBAL, "global_model", ("validation_predictions",), "every training image, at its own image size"),
        NetworkKind(Role.CATEGORY, "category_model", ("validation_predictions",), "the training images of its category"),
    )
}


@dataclass(frozen=True)
class Network:
    """One network of a run (see the module docstring)."""

    name: str  # "router", "global", "global-<name>" or the category
    kind: NetworkKind
    work_dir: Path
    model_class: type[TrainedNetwork]
    settings: TrainingConfig
    image_size: int
    category: str | None = None  # trains on this category's images; None: on every training image
    depends_on: tuple[str, ...] = ()  # networks whose trained weights it starts from
    seed: int | None = None  # seeds its init, shuffling and augmentation; None: the run's seed
    fold: int | None = None  # cross_fit: trains on the other folds and predicts this one (RUN/folds/fold-<k>/)
    run_seed: int = 0  # the run's seed (what `seed` None stands for)
    final_fit: bool = False  # final_fit: the split-run network of the same name, trained again on train + valid (RUN/final-fit/)

    @property
    def role(self) -> Role:
        return self.kind.role

    @property
    def job_name(self) -> str:
        """Unique across the run: its name, with the fold for a fold network ("global@fold-2") and
        the final fit for a final-fit network ("global@final-fit")."""
        if self.final_fit:
            return f"{self.name}@{FINAL_FIT_SUFFIX}"
        return self.name if self.fold is None else f"{self.name}@fold-{self.fold}"

    @property
    def dependency_jobs(self) -> tuple[str, ...]:
        """The job names of the networks it depends on (in its own fold; a final-fit network also
        on its split-run network, whose steps it replays)."""
        if self.final_fit:
            return (self.name, *(f"{name}@{FINAL_FIT_SUFFIX}" for name in self.depends_on))
        return tuple(name if self.fold is None else f"{name}@fold-{self.fold}" for name in self.depends_on)

    def layout(self, run: RunLayout) -> RunLayout:
        """The layout its paths live in: the run's, its fold's or the final fit's."""
        if self.final_fit:
            return run.final_fit
        return run if self.fold is None else run.fold(self.fold)

    def split_network(self, run: RunLayout) -> "Network":
        """A final-fit network's split-run network: the same entry in the run's own folders."""
        return dataclasses.replace(self, final_fit=False, work_dir=run.root / self.work_dir.relative_to(run.final_fit.root))

    @property
    def outputs(self) -> tuple[str, ...]:
        """`NetworkFiles` fields that exist once it has finished: its kind's; a final-fit network
        predicts nothing for the stacker, its global model keeps the test kNN index."""
        if not self.final_fit:
            return self.kind.outputs
        return ("knn_index",) if self.role is Role.GLOBAL else ()

    @property
    def settings_record(self) -> dict[str, Any]:
        """What decides how it trains, as recorded in its work folder once trained."""
        return {
            "training": fingerprinted_settings(self.settings),
            "image_size": self.image_size,
            "seed": self.run_seed if self.seed is None else self.seed,
        }

    def settings_changed(self) -> bool:
        """Trained with other settings than the config's now (a network trained before the record
        existed has none and counts as unchanged)."""
        path = self.files.settings_record
        return path.is_file() and read_json(path) != json.loads(json.dumps(self.settings_record))

    @property
    def settings_key(self) -> str:
        """Where its settings are in the config: router, global_model, extra_global_models.<name>, category_model."""
        if self.role is Role.EXTRA_GLOBAL:
            return f"extra_global_models.{self.name.removeprefix(EXTRA_GLOBAL_PREFIX)}"
        return self.kind.config_section

    @property
    def files(self) -> NetworkFiles:
        return RunLayout.files(self.work_dir)

    @property
    def description(self) -> str:
        """How errors name it: "the router", "the global model", "the extra global model global-b", "the DRCT model"."""
        if self.fold is not None:
            return f"{dataclasses.replace(self, fold=None).description} of fold {self.fold}"
        if self.final_fit:
            return f"{dataclasses.replace(self, final_fit=False).description} (final fit)"
        if self.role is Role.ROUTER:
            return "the router"
        if self.role is Role.GLOBAL:
            return "the global model"
        if self.role is Role.EXTRA_GLOBAL:
            return f"the extra global model {self.name}"
        return f"the {self.name} model"

    def is_trained(self) -> bool:
        """Its model can be loaded (what `predict` needs)."""
        return self.model_class.is_trained(self.work_dir)

    def is_finished(self) -> bool:
        """Trained, and its outputs for the stacker are saved (what train-all leaves)."""
        return self.is_trained() and all(getattr(self.files, output).is_file() for output in self.outputs)

    def outdated_reason(self, layout: RunLayout) -> str | None:
        """Why a trained network no longer matches what it depends on (None: it does); `layout` is the run's."""
        if "global" in self.depends_on and not started_from_current_global(self.layout(layout), self.work_dir):
            return "started from an older global model"
        if self.final_fit:
            record = self.files.replay_record
            split_dir = self.split_network(layout).work_dir
            if not record.is_file() or read_json(record).get("split_run") != split_run_identity(split_dir):
                return f"its split-run network {split_dir} changed since (another step budget)"
        return None

    def stale_reason(self, layout: RunLayout, retraining: Collection[str] = ()) -> str | None:
        """Why train-all must (re)train it, None when it is current: not finished, or a network it
        depends on is retrained now (`retraining`) or changed since it was trained."""
        if not self.is_finished():
            return "not trained"
        if self.settings_changed():
            return f"its settings in {RunLayout(layout.root).config_path.name} differ from those it was trained with"
        retrained = [name for name in self.dependency_jobs if name in retraining]
        if retrained:
            return f"{', '.join(retrained)} is retrained"
        return self.outdated_reason(layout)


def development_networks(layout: RunLayout, config: Config, categories: Sequence[str], without_model: Collection[str] = ()) -> list[Network]:
    """Every network the run trains: `run_networks`; with `[development] scheme = "cross_fit"`
    the same table once per fold (fold 0's networks first); with "final_fit" the table, then its
    final-fit networks."""
    if config.development.scheme == "final_fit":
        return run_networks(layout, config, categories, without_model) + run_networks(layout, config, categories, without_model, final_fit=True)
    if config.development.scheme != "cross_fit":
        return run_networks(layout, config, categories, without_model)
    return [network for fold in range(config.development.folds) for network in run_networks(layout, config, categories, without_model, fold)]


def run_networks(
    layout: RunLayout,
    config: Config,
    categories: Sequence[str],
    without_model: Collection[str] = (),
    fold: int | None = None,
    final_fit: bool = False,
) -> list[Network]:
    """The run's networks in training order: router, global, extra global models, then one per
    category (but those in `without_model`, which use the global model); with `fold`, that
    fold's networks (in RUN/folds/fold-<k>/); with `final_fit`, the final-fit networks (in RUN/final-fit/)."""
    where = layout.final_fit if final_fit else layout if fold is None else layout.fold(fold)
    networks = _networks(where, config, categories, without_model)
    return [dataclasses.replace(network, fold=fold, run_seed=config.seed, final_fit=final_fit) for network in networks]


FINAL_FIT_SUFFIX = "final-fit"  # job names of final-fit networks: "global@final-fit"


def split_run_identity(work_dir: Path) -> dict[str, Any] | None:
    """What a final fit's budget depends on in its split-run network: the job fingerprint and best
    epoch of its finished run (None: a network with no training run, the one-category router)."""
    state = RunFiles(work_dir).read_state()
    if not state:
        return None
    return {"fingerprint": state.get("fingerprint"), "best_epoch": state.get("best_epoch")}


def _networks(layout: RunLayout, config: Config, categories: Sequence[str], without_model: Collection[str]) -> list[Network]:
    image_size = config.data.image_size
    networks = [
        Network("router", NETWORK_KINDS[Role.ROUTER], layout.router_dir, router_class_for(list(categories)), config.router, image_size),
        Network("global", NETWORK_KINDS[Role.GLOBAL], layout.global_dir, ConceptModel, config.global_model, image_size),
    ]
    for extra in config.extra_global_models:
        networks.append(
            Network(
                extra_global_name(extra),
                NETWORK_KINDS[Role.EXTRA_GLOBAL],
                layout.extra_global_dir(extra.name),
                ConceptModel,
                extra_global_training(extra),
                extra.image_size or image_size,
                seed=extra.seed if extra.seed >= 0 else None,
            )
        )
    depends_on = ("global",) if starts_from_global(config) else ()
    for category in categories:
        if category not in without_model:
            networks.append(
                Network(
                    category,
                    NETWORK_KINDS[Role.CATEGORY],
                    layout.category_dir(category),
                    ConceptModel,
                    config.category_model,
                    image_size,
                    category=category,
                    depends_on=depends_on,
                )
            )
    return networks


def every_kind_settings(config: Config) -> list[tuple[str, TrainingConfig]]:
    """The settings key and settings of every network `config` may train, categories not yet known
    (a new run's preflight checks, made before the data are read)."""
    return [
        ("router", config.router),
        ("global_model", config.global_model),
        *[(f"extra_global_models.{extra.name}", extra_global_training(extra)) for extra in config.extra_global_models],
        ("category_model", config.category_model),
    ]


EXTRA_GLOBAL_PREFIX = "global-"


def extra_global_name(extra: ExtraGlobalModel) -> str:
    """Its name for `--only`, in logs and in the run (RUN/global-<name>/)."""
    return f"{EXTRA_GLOBAL_PREFIX}{extra.name}"


def extra_global_training(extra: ExtraGlobalModel) -> TrainingConfig:
    """The plain TrainingConfig of an extra global model (what its estimator and checkpoint hold)."""
    names = {item.name for item in dataclasses.fields(TrainingConfig)}
    return TrainingConfig(**{name: getattr(extra, name) for name in names})
