"""Test infrastructure: a real local Kubernetes control plane (etcd, kube-apiserver, kube-scheduler,
kube-controller-manager built from source by hack/build-tools.sh) and a local test kubelet.

Not part of the product. `python -m tests.cluster up|down` backs `make cluster-up` / `make cluster-down`.
"""
