// Package sandbox runs untrusted code in KVM microVMs that live inside the
// calling process: no daemon, no cgo, one `go get`.
//
// The public API (New, Run, Exec, Close) lands with the guest agent; today the
// module provides the VMM core in package vmm.
package sandbox
