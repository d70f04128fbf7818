"""The external side of Dagster Pipes: score-model training in a process of its own (or a Kubernetes pod).

Launched by the ``score_checkpoint`` asset when ``compute.pipes: subprocess`` (``PipesSubprocessClient``); any
Pipes client that can run ``python -m spatial_assets.orchestration.pipes_worker`` with this package installed can
launch it elsewhere (e.g. ``dagster_k8s.PipesK8sClient`` on a GPU node, see docs/DEPLOY.md). It reads its inputs from
the Pipes extras, streams its progress lines to the Dagster log, trains into the resumable state folder, saves the
finished model (safetensors + JSON) into ``extras['model_out']`` and reports what it did as a custom message. It
imports ``dagster_pipes`` only (not dagster).
"""

from __future__ import annotations

import json


def main() -> None:
    import anndata as ad
    from dagster_pipes import open_dagster_pipes

    from ..generative import train_score_model
    from ..params import ScoreModelParams

    with open_dagster_pipes() as pipes:
        extras = pipes.extras
        params = ScoreModelParams(**json.loads(extras["params_json"]))
        reference = ad.read_zarr(extras["reference_store"])
        pipes.log.info(
            f"external training: {reference.n_obs} reference cells, device {extras['device']}, "
            f"state {extras['state_folder']}"
        )
        model = train_score_model(
            reference,
            extras["cell_type_key"],
            params,
            extras["state_folder"],
            device=extras["device"],
            log=pipes.log.info,
        )
        model.save(extras["model_out"])
        pipes.report_custom_message({"train_step": int(model.train_step), "model_out": extras["model_out"]})


if __name__ == "__main__":
    main()
