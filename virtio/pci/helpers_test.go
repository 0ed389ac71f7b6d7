package pci_test

import (
	"time"

	"github.com/gosandbox/sandbox/virtio/virtiotest"
)

func afterTimeout() <-chan time.Time { return time.After(virtiotest.WaitTimeout) }
