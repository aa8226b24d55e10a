# melanoma-dist image, CPU variant: the Ray head and worker image of k8s/ (KubeRay) and
# cluster/ (Ray cluster launcher). GPU variant: Dockerfile.gpu.
#
#   docker build -t registry.example.com/melanoma-dist:0.1.0-ray2.58.0-cpu .
#
# Tag: <package version>-ray<Ray version>-<cpu|gpu>; k8s/ pins this tag and its rayVersion
# to the Ray of launch/requirements.txt (tests/test_k8s_manifests.py checks both).
# The stack is installed by launch/setup.sh, exactly as on a workstation: pinned
# requirements and constraints, then Horovod compiled against that TensorFlow.
FROM python:3.11-slim

# wget: KubeRay's health probes; rsync: the cluster launcher's file sync into the
# container; g++/cmake/make: compiling Horovod (setup.sh).
RUN apt-get update \
 && apt-get install -y --no-install-recommends bash wget rsync g++ cmake make \
 && rm -rf /var/lib/apt/lists/*

# Non-root user; k8s/ manifests run Pods as runAsUser 1000.
RUN groupadd --gid 1000 ray && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ray

WORKDIR /opt/melanoma-dist
COPY --chown=1000:1000 . .
USER 1000:1000
RUN bash launch/setup.sh && rm -rf /home/ray/.cache
ENV PATH=/opt/melanoma-dist/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2
WORKDIR /home/ray
