# The raymed image: Ray 2.60 + raymed, run by every manifest in k8s/ (head, workers, RayJob
# entrypoints, RayService replicas).
#
#   docker build -t ghcr.io/OWNER/raymed:0.1.0 .
#   docker push ghcr.io/OWNER/raymed:0.1.0
#
# The base image's Ray must be a version pyproject.toml accepts (ray[train,tune,serve]>=2.60) and
# its Python one that raymed supports (3.11). torch from PyPI bundles its CUDA libraries, so this one
# image runs on CPU and GPU nodes alike (GPU nodes need only the NVIDIA driver and device plugin).
# For Ray's CUDA base image instead:
#   docker build --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu -t ghcr.io/OWNER/raymed:0.1.0-gpu .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311
FROM ${RAY_IMAGE}

# The Ray images run as user `ray` (group `users`) with HOME /home/ray.
WORKDIR /home/ray/raymed
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users raymed/ raymed/
# Search spaces and Serve configs, for `raymed tune --space /home/ray/raymed/tune_spaces/...`
# and `serve run /home/ray/raymed/serve/raymed.yaml`.
COPY --chown=ray:users tune_spaces/ tune_spaces/
COPY --chown=ray:users serve/ serve/

# The README's install command (without the test extra).
RUN python -m pip install --no-cache-dir "torch==2.13.0" -e .
