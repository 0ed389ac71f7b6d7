package pci_test

import (
	"testing"
	"time"

	"github.com/gosandbox/sandbox/virtio/virtiotest"
)

func afterTimeout() <-chan time.Time { return time.After(virtiotest.WaitTimeout) }

// waitMSI waits until an MSI with data has fired.
func waitMSI(t *testing.T, h *virtiotest.Host, data uint32) {
	t.Helper()
	timeout := afterTimeout()
	for h.MSICount(data) == 0 {
		select {
		case <-h.Interrupted():
		case <-timeout:
			t.Fatalf("no MSI with data %#x", data)
		}
	}
}
