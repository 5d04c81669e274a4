//go:build tools

// The package xtask builds from this pin.
package tools

import _ "github.com/coredns/coredns"
