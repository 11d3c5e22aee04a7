"""Running raymed on a Ray cluster: job submission through the Ray Jobs API (`raymed submit`,
`raymed jobs`); the Kubernetes side (KubeRay manifests, container image) lives in `k8s/` and the
`Dockerfile` at the repository root.
"""
