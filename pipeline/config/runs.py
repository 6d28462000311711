"""The `models:` section checked against the architecture registry (pipeline/models).

Apart from pipeline.config.params so that the stages that never build a deprojector
(captions, gap, extract) do not import the architectures: an edit to one of them reruns only
the stages that train, load or list runs."""

from __future__ import annotations

from pipeline.config.params import ModelSpec
from pipeline.core.sections import check
from pipeline.models import ARCHITECTURES, COMPOSITES, hyperparameters


def check_runs(models: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
    """Each run's `type` registered, its hyperparameters known to that type, and each
    composite's `members` 2 or more distinct trained runs; the error names the key."""
    known = ", ".join([*sorted(ARCHITECTURES), *sorted(COMPOSITES)])
    for name, spec in models.items():
        check(
            spec.type in ARCHITECTURES or spec.type in COMPOSITES,
            f"models.{name}.type",
            f"one of {known}",
            spec.type,
        )
        if spec.type in COMPOSITES:
            check(
                not spec.train and set(spec.hparams) == {"members"},
                f"models.{name}",
                f"{{type: {spec.type}, members: [RUN, RUN, ...]}} and nothing else (it "
                "trains nothing)",
                {
                    "type": spec.type,
                    **spec.hparams,
                    **({"train": spec.train} if spec.train else {}),
                },
            )
            continue
        allowed = hyperparameters(spec.type)
        for key in spec.hparams:
            check(
                key in allowed,
                f"models.{name}.{key}",
                f"a hyperparameter of {spec.type} ({', '.join(allowed)}) or `train`",
                key,
            )
    trained = [n for n, s in models.items() if s.type not in COMPOSITES]
    for name, spec in models.items():
        if spec.type in COMPOSITES:
            members = spec.hparams["members"]
            check(
                isinstance(members, list)
                and len(members) >= 2
                and len(set(map(str, members))) == len(members)
                and all(m in trained for m in members),
                f"models.{name}.members",
                f"2 or more distinct trained runs of `models` ({', '.join(trained)})",
                members,
            )
    return models
