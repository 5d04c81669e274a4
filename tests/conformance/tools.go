//go:build tools

// The packages xtask builds from this pin: `go mod tidy` keeps their
// requirements. Apart from tests/k8s because the e2e suite and
// kube-proxy bring dependencies (ginkgo, nftables, netlink) the control
// plane does not need, and a change of that pin rebuilds all of it.
package tools

import (
	_ "github.com/onsi/ginkgo/v2/ginkgo"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/test/e2e"
	_ "k8s.io/kubernetes/test/images/regression-issue-74839"
)
