//go:build tools

// Package controlplane only exists so that go.mod in this folder records the
// modules behind the binaries hack/build-controlplane builds: go mod tidy keeps
// a requirement only while some file imports it, and this file is never built.
package controlplane

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
