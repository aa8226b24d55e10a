"""`melanoma-dist launch TARGET`: run the cross-validation here, on a Ray cluster, or on Kubernetes.

    melanoma-dist launch local --config configs/quick-cpu.yaml             # embedded Ray on this machine
    melanoma-dist launch local --smoke-test                                 # tiny generated data, 2 folds
    melanoma-dist launch ray --address http://HEAD:8265 --config cfg.yaml  # Ray Jobs API, follows the logs
    melanoma-dist launch k8s --overlay gpu --dry-run                       # print the KubeRay manifests
    melanoma-dist launch k8s --overlay gpu --config cfg.yaml --image REGISTRY/melanoma-dist:TAG

Modules, one job each: `command` (options and dispatch), `local`, `smoke` (the
`--smoke-test` data), `jobs` (Ray Jobs API), `k8s` (render and apply the manifests
of k8s/). This package imports nothing heavy until a target runs.
"""

from melanoma_dist.submit.command import add_launch_arguments, cmd_launch

__all__ = ["add_launch_arguments", "cmd_launch"]
